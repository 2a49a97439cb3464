"""dynamixer bench on a tiny model: JSON fields, ratios computed from the two measurements, sweep, CLI."""
import json
import time

import pytest
import torch

from dynamixer import bench
from dynamixer.cli import main

TINY = dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], num_segments=[2, 4, 4, 4], num_classes=5)


@pytest.fixture(scope='module')
def result():
    threads = torch.get_num_threads()
    try:
        return bench.benchmark('dynamixer_cifar_t', batch_size=2, train_batch_size=3, img_size=32, warmup=1,
                               iters=3, threads=1, model_args=TINY, memory=True, quiet=True)
    finally:
        torch.set_num_threads(threads)


def test_fields(result):
    assert result['params'] > 0 and result['gmacs'] > 0 and result['matmul_peak_gflops'] > 0
    assert result['machine']['threads'] == 1 and result['machine']['torch'] == torch.__version__
    assert result['config']['model'] == 'dynamixer_cifar_t' and result['config']['model_args'] == TINY
    for mode, batch in (('inference', 2), ('train', 3)):
        entry = result[mode]
        assert entry['batch_size'] == batch
        for impl in ('fast', 'reference'):
            e = entry[impl]
            assert len(e['times_s']) == 3 and e['median_s'] > 0
            assert e['img_per_s'] == pytest.approx(batch / e['median_s'])
            assert e['peak_fraction'] == pytest.approx(e['gflops'] / result['matmul_peak_gflops'])
            assert e['peak_memory_mb'] > 0
        assert entry['memory_method'] in ('rss_high_water_mark', 'ru_maxrss', 'cuda_max_allocated')


def test_ratios_come_from_the_two_measurements(result):
    for mode in ('inference', 'train'):
        entry = result[mode]
        assert entry['speedup'] == pytest.approx(entry['reference']['median_s'] / entry['fast']['median_s'])
        assert entry['memory_ratio'] == pytest.approx(
            entry['fast']['peak_memory_mb'] / entry['reference']['peak_memory_mb'])
    flops = 2 * result['gmacs'] * 1e9 * 3 * 3  # training: batch 3, 3x the forward
    assert result['train']['fast']['gflops'] == pytest.approx(flops / result['train']['fast']['median_s'] / 1e9)


def test_table_shows_both_and_the_ratio(result):
    table = bench.format_table(result)
    assert 'fast vs reference' in table and 'reference' in table
    assert f"{result['inference']['speedup']:.2f}x" in table
    slower = dict(result, inference=dict(result['inference'], speedup=0.0123))  # no measured ratio prints so
    row = [line for line in bench.format_table(slower).splitlines() if '**0.01x**' in line]
    assert len(row) == 1 and '(slower)' in row[0] and 'faster' not in row[0]  # never "0.01x faster"


def test_cli_json_sweep(capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(['bench', '--model', 'dynamixer_cifar_t', '--sweep', '24,32,48', '--img-size', '32',
                   '--batch-size', '2', '--warmup', '0', '--iters', '1', '--threads', '1', '--quiet',
                   '--model-args', json.dumps(TINY), '--json'])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r['img_size']: r for r in out['sweep']}
    assert sorted(rows) == [24, 32, 48]
    assert rows[32]['fixed_gmacs_vs_base'] == pytest.approx(1.0)
    assert rows[48]['fixed_gmacs'] > rows[32]['fixed_gmacs'] > rows[24]['fixed_gmacs']
    assert rows[48]['dynamic_gmacs'] > rows[24]['dynamic_gmacs']
    assert all(r['fixed_ms_per_img'] > 0 and r['dynamic_ms_per_img'] > 0 for r in rows.values())


def _quick_bench(tmp_path, *extra: str):
    """``dynamixer bench`` inference on a tiny model, one run; (exit code, the JSON it wrote)."""
    threads = torch.get_num_threads()
    try:
        rc = main(['bench', '--model', 'dynamixer_cifar_t', '--img-size', '32', '--batch-size', '2', '--warmup', '0',
                   '--iters', '1', '--threads', '1', '--quiet', '--modes', 'inference', '--no-memory', *extra,
                   '--model-args', json.dumps(TINY), '--output', str(tmp_path / 'r.json')])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads((tmp_path / 'r.json').read_text()) if rc == 0 else None


def test_no_slicing_turns_the_fast_path_slicing_off(tmp_path):
    from dynamixer.models import FastPath
    rc, result = _quick_bench(tmp_path, '--no-slicing')
    assert rc == 0 and result['config']['inference_slice_bytes'] == 0
    assert FastPath().inference_slice_bytes > 0  # nothing global changed


def test_cli_table_and_errors(capsys, tmp_path):
    rc, result = _quick_bench(tmp_path)
    assert rc == 0
    assert 'fast vs reference' in capsys.readouterr().out
    assert result['inference']['speedup'] > 0
    assert result['config']['inference_slice_bytes'] > 0 and result['config']['cpu_fused_inference'] is True
    assert main(['bench', '--model-args', '{not json']) == 2
    assert main(['bench', '--precision', 'fp32', '--modes', 'nope', '--model', 'dynamixer_cifar_t']) == 2
    if not torch.cuda.is_available():
        assert main(['bench', '--device', 'cuda']) == 2
        assert 'no CUDA' in capsys.readouterr().err


def test_no_fusion_turns_the_fused_linears_off(tmp_path, capsys):
    rc, result = _quick_bench(tmp_path, '--no-fusion')
    assert rc == 0 and result['config']['cpu_fused_inference'] is False
    assert 'no fused linears' in capsys.readouterr().out


def test_no_onednn_turns_the_onednn_linears_off(tmp_path, capsys):
    rc, result = _quick_bench(tmp_path)
    assert rc == 0 and result['config']['onednn_linears'] is True
    rc, result = _quick_bench(tmp_path, '--no-onednn')
    assert rc == 0 and result['config']['onednn_linears'] is False
    rc, result = _quick_bench(tmp_path)
    assert rc == 0 and result['config']['onednn_linears'] is True  # the flag changed that run's model only
    assert 'no oneDNN linears' in capsys.readouterr().out


def test_no_triton_turns_the_triton_kernel_off(tmp_path):
    rc, result = _quick_bench(tmp_path, '--no-triton')
    assert rc == 0 and result['config']['triton_mix'] is False and result['config']['fast_path']['triton'] is False


def test_matmul_peak_is_the_speed_of_a_linear_layer():
    """The peak is measured in nn.Linear's layout: in fp16 on CPUs without fp16 matmul instructions, torch's
    plain ``a @ b`` takes a fallback about 40x slower, which made a model run at "5900 % of peak"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 512
        peak = bench.matmul_peak_gflops(torch.device('cpu'), 'fp16', size=n)
        a, b = torch.randn(n, n, dtype=torch.float16), torch.randn(n, n, dtype=torch.float16)
        torch.nn.functional.linear(a, b)
        best = float('inf')
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert peak >= 0.3 * 2 * n ** 3 / best / 1e9


def test_fp32_cpu_matmul_peak_also_times_the_onednn_linear_the_fast_path_uses(monkeypatch):
    """Otherwise the fast path's oneDNN linears could run above "100 % of peak"."""
    from dynamixer.models import fused
    if not fused._HAS_ONEDNN_LINEAR:
        pytest.skip('this torch build has no oneDNN linear kernels')
    shapes = []
    onednn = fused._onednn_linear
    monkeypatch.setattr(fused, '_onednn_linear', lambda a, b: shapes.append(tuple(a.shape)) or onednn(a, b))
    assert bench.matmul_peak_gflops(torch.device('cpu'), 'fp32', size=64, repeats=2) > 0
    assert shapes == [(64, 64)] * 3  # a warm-up and the timed repeats
    bench.matmul_peak_gflops(torch.device('cpu'), 'bf16', size=64, repeats=2)
    assert len(shapes) == 3  # oneDNN's fp32 linear does not stand for other precisions


def test_the_input_size_defaults_to_the_models_own(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = main(['bench', '--model', 'dynamixer_cifar_t', '--batch-size', '1', '--warmup', '0', '--iters', '1',
                   '--threads', '1', '--quiet', '--modes', 'inference', '--no-memory', '--no-reference',
                   '--output', str(tmp_path / 'r.json')])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / 'r.json').read_text())
    assert rc == 0 and list(result['config']['img_size']) == [32, 32]  # not the 224 of the paper's variants


def test_recipe_against_plain_times_each_side_with_its_own_optimiser(monkeypatch):
    """--baseline-fp32-eager: the reference trains in fp32 eager with torch's default AdamW, the fast model in the
    asked precision with the fused AdamW of dynamixer train; without it both use the default."""
    made = {}

    class Recording(bench.StepRunner):
        def __init__(self, model, mode, x, precision, compile, fused_optimizer=False):
            super().__init__(model, mode, x, precision, compile, fused_optimizer)
            made[model.fast_path.enabled] = (precision, bool(self.optimizer.defaults.get('fused')))
    monkeypatch.setattr(bench, 'StepRunner', Recording)
    threads = torch.get_num_threads()
    try:
        for baseline, expected in ((True, {True: ('bf16', True), False: ('fp32', False)}),
                                   (False, {True: ('bf16', False), False: ('bf16', False)})):
            made.clear()
            result = bench.benchmark('dynamixer_cifar_t', batch_size=2, img_size=32, precision='bf16', warmup=0,
                                     iters=1, threads=1, modes=('train',), memory=False, model_args=TINY,
                                     baseline_fp32_eager=baseline)
            assert made == expected and result['train']['speedup'] > 0
    finally:
        torch.set_num_threads(threads)


def test_compiled_steps_compile_through_compile_model(monkeypatch):
    """bench --compile (and ablate's throughput) time the model as dynamixer train --compile runs it."""
    import dynamixer.models
    compiled = []
    monkeypatch.setattr(dynamixer.models, 'compile_model', lambda model, **kw: compiled.append(model) or model)
    model = torch.nn.Linear(4, 2)
    bench.StepRunner(model, 'inference', torch.randn(3, 4), 'fp32', compile=True).step()
    bench.StepRunner(model, 'inference', torch.randn(3, 4), 'fp32', compile=False).step()
    assert compiled == [model]


PYRAMID = dict(depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32], num_segments=[2, 2, 4, 4], window_size=4)


def test_segmentation_times_the_segmenter_fast_against_plain_with_the_same_weights():
    """--task segmentation: the Segmenter on the pyramid, at a non-square size, both implementations the same
    function (the reference is the fast model's copy with every DynaMixer's fast path off)."""
    models = bench.build_models('dynamixer_pyramid_t', None, PYRAMID, torch.device('cpu'), task='segmentation')
    fast, ref = models['fast'], models['reference']
    assert fast is not ref and all(not m.fast_path.enabled for m in ref.modules() if hasattr(m, 'set_fast_path'))
    assert any(m.fast_path.enabled for m in fast.modules() if hasattr(m, 'set_fast_path'))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = fast.eval()(x)
        assert out.shape == (2, bench.SEGMENTATION_CLASSES, 40, 56)
        torch.testing.assert_close(out, ref.eval()(x), atol=1e-4, rtol=1e-4)
    threads = torch.get_num_threads()
    try:
        result = bench.benchmark('dynamixer_pyramid_t', batch_size=1, img_size=[40, 56], warmup=0, iters=1,
                                 threads=1, model_args=PYRAMID, memory=False, task='segmentation')
    finally:
        torch.set_num_threads(threads)
    assert result['config']['task'] == 'segmentation' and result['config']['img_size'] == [40, 56]
    assert result['gmacs'] > 0 and result['train']['speedup'] > 0 and result['inference']['batch_size'] == 1
    assert 'dynamixer_pyramid_t segmenter (FPN) 40x56px' in bench.format_table(result)


def test_default_batch_and_spread_warning():
    assert [bench.default_batch_size(s) for s in ((32, 32), (224, 224), (360, 480))] == [128, 32, 8]
    assert bench.spread_warning({'fast': [1.0, 1.5, 1.9], 'reference': [2.0, 2.1]}, 'x') is None
    warning = bench.spread_warning({'fast': [0.41, 5.36], 'reference': [2.0, 2.1]}, 'inference b8')
    assert warning.startswith('inference b8: the timed runs spread 13.1x (fast)') and 'reference' not in warning
