"""Benchmark the fast DynaMixer against the plain reference implementation (same weights), side by side.

For one variant, batch size, input size, precision, device and eager / ``--compile``: inference throughput,
training throughput (forward + backward + AdamW step), peak memory, parameters, GMACs, achieved GFLOP/s and
its fraction of this machine's dense-matmul peak (measured in the same run). The two implementations are
timed interleaved (fast, reference, reference, fast, ...) so that background load hits both alike; every
number is the median of ``--iters`` timed runs after ``--warmup`` untimed ones. ``--sweep`` instead measures
inference cost against resolution for a model built at each size and for one dynamic-size model.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the step. On CPU,
each measurement runs in a fresh subprocess: parameters, gradients and AdamW state are created first, the
kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` and the peak resident memory of
one step is reported above the resident memory just before it (activations and temporaries only).
"""
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
IMPLEMENTATIONS = ('fast', 'reference')


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f'[bench] {message}', file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = {'cpu': cpu_model(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'platform': platform.platform(), 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds')}
    try:
        info['load_average'] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def matmul_peak_gflops(device: torch.device, precision: str = 'fp32', size: Optional[int] = None,
                       repeats: int = 3) -> float:
    """Best of a few big square matmuls, in GFLOP/s (2 * n^3 per matmul), in the benchmark's precision and in
    ``nn.Linear``'s layout (``x @ W^T``): on CPUs without fp16 matmul instructions torch's CPU fp16 ``a @ b``
    falls back to a far slower kernel than that layout (docs/benchmarks.md). On CPU in fp32 the faster of
    ``F.linear`` (MKL) and oneDNN's linear, which the fast path also uses."""
    from dynamixer.models import fused
    dtype = PRECISIONS[precision] or torch.float32
    n = size or (8192 if device.type == 'cuda' else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [F.linear]
    if fused.onednn_fp32(a):
        kernels.append(fused._onednn_linear)
    best = float('inf')
    for kernel in kernels:
        kernel(a, b)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def count_macs(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-adds of one forward pass at batch 1 (FlopCounterMode / 2), on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2


def build_models(name: str, img_size: int, model_args: Dict[str, Any], device: torch.device,
                 implementations: Sequence[str] = IMPLEMENTATIONS, seed: int = 0,
                 fast_path: Optional[Dict[str, Any]] = None, task: str = 'classification'
                 ) -> Dict[str, torch.nn.Module]:
    """The fast model (its fast path set by ``fast_path``, FastPath fields) and, if asked, a reference copy with
    the same weights and its fast path off. For ``task='segmentation'`` the model is the ``Segmenter`` that
    ``dynamixer train`` builds on the backbone ``name`` (11 classes, as CamVid), which takes any input size."""
    import dynamixer  # noqa: F401  (registers the models)
    from dynamixer.models.reference import reference_model
    torch.manual_seed(seed)
    kwargs = dict(model_args)
    if task == 'segmentation':
        from dynamixer.models import DynaMixer
        from dynamixer.models.segmentation import Segmenter
        fast = Segmenter(backbone=name, num_classes=SEGMENTATION_CLASSES, backbone_args=kwargs).to(device)
        for module in fast.modules():
            if isinstance(module, DynaMixer):
                module.set_fast_path(**(fast_path or {}))
        return {impl: fast if impl == 'fast' else reference_model(fast) for impl in implementations}
    if img_size:
        kwargs.setdefault('img_size', img_size)
    fast = dynamixer.create_model(name, **kwargs).to(device).set_fast_path(**(fast_path or {}))
    models = {}
    for impl in implementations:
        models[impl] = fast if impl == 'fast' else reference_model(fast)
    return models


class StepRunner:
    """One implementation's inference or training step, optionally compiled."""

    def __init__(self, model: torch.nn.Module, mode: str, x: torch.Tensor, precision: str, compile: bool,
                 fused_optimizer: bool = False):
        self.model, self.mode, self.x, self.precision = model, mode, x, precision
        self.device = x.device
        from dynamixer.models import compile_model
        self.fn = compile_model(model) if compile else model
        self.optimizer = None
        self.scaler = None
        self.targets: Optional[torch.Tensor] = None
        self.set_to_none = True  # torch's default and dynamixer train's; the memory measurement keeps gradients
        if mode == 'train':
            model.train()
            # fused: all parameters updated in one kernel, as dynamixer train does; otherwise torch's default
            # (on CPU a loop over the parameters)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({'fused': True} if fused_optimizer
                                                                                 else {}))
            if precision == 'fp16' and self.device.type == 'cuda':
                self.scaler = torch.amp.GradScaler('cuda')
        else:
            model.eval()

    def prepare_state(self) -> None:
        """Gradients and optimizer state exist, so that a step's memory is activations and temporaries."""
        if self.optimizer is None:
            return
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()

    def _targets(self, out: torch.Tensor) -> torch.Tensor:
        """Fixed random labels for the loss the training tasks use (cross-entropy): one class per image, or per
        pixel of a segmentation model's ``(B, classes, H, W)`` logits."""
        if self.targets is None:
            generator = torch.Generator().manual_seed(0)
            size = (out.shape[0],) + tuple(out.shape[2:])
            self.targets = torch.randint(out.shape[1], size, generator=generator).to(out.device)
        return self.targets

    def step(self) -> None:
        if self.mode == 'inference':
            with torch.inference_mode(), _autocast(self.device, self.precision):
                self.fn(self.x)
        else:
            self.optimizer.zero_grad(set_to_none=self.set_to_none)
            with _autocast(self.device, self.precision):
                out = self.fn(self.x).float()
                loss = torch.nn.functional.cross_entropy(out, self._targets(out))
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
        _sync(self.device)


def time_interleaved(runners: Dict[str, StepRunner], warmup: int, iters: int, quiet: bool = True,
                     label: str = '') -> Dict[str, List[float]]:
    """Seconds per step of each runner, alternating the order every iteration."""
    names = list(runners)
    for i in range(warmup):
        for name in names:
            start = time.perf_counter()
            runners[name].step()
            _log(f'{label} warm-up {i + 1}/{warmup} {name}: {time.perf_counter() - start:.3f}s', quiet)
    times = {name: [] for name in names}
    for i in range(iters):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - start)
            _log(f'{label} run {i + 1}/{iters} {name}: {times[name][-1]:.3f}s', quiet)
    return times


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Number of graph breaks torch.compile would take in the forward pass."""
    import torch._dynamo
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return int(explanation.graph_break_count)


# ---------------------------------------------------------------------------------------------------- memory

def _read_status(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def fast_path_options(recompute_mixing: Optional[bool] = None, slicing: bool = True, fusion: bool = True,
                      triton: bool = True, onednn: bool = True) -> Dict[str, Any]:
    """The fast model's ``set_fast_path`` options for the bench flags (the defaults where a flag is not off)."""
    options: Dict[str, Any] = {}
    if recompute_mixing is not None:
        options['recompute_mixing'] = bool(recompute_mixing)
    if not slicing:
        options['inference_slice_bytes'] = 0
    if not fusion:
        options['cpu_fused_inference'] = False
    if not onednn:
        options['onednn_linears'] = False
    if not triton:
        options['triton'] = False
    return options


def measure_peak_memory(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory of one step for one implementation (run this in a fresh process on CPU)."""
    device = torch.device(cfg['device'])
    torch.set_num_threads(cfg['threads'])
    models = build_models(cfg['model'], cfg['img_size'], cfg['model_args'], device, [cfg['impl']], cfg['seed'],
                          cfg.get('fast_path'), cfg.get('task', 'classification'))
    model = models[cfg['impl']]
    x = torch.randn(cfg['batch_size'], 3, *_pair(cfg['img_size']), device=device)
    runner = StepRunner(model, cfg['mode'], x, cfg['precision'], compile=cfg['compile'],
                        fused_optimizer=cfg.get('fused_optimizer', False))
    runner.prepare_state()
    runner.set_to_none = False  # the gradients stay allocated: the step's peak is activations and temporaries
    if cfg['compile']:  # compile outside the measured step
        runner.step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        return {'peak_bytes': torch.cuda.max_memory_allocated(device) - before, 'method': 'cuda_max_allocated'}
    before = _read_status('VmRSS')
    if _reset_peak_rss() and before is not None:
        runner.step()
        return {'peak_bytes': _read_status('VmHWM') - before, 'method': 'rss_high_water_mark'}
    import resource  # fallback: lifetime peak of the process, less the resident memory before the step
    runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {'peak_bytes': peak - (before or 0), 'method': 'ru_maxrss'}


def peak_memory(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``measure_peak_memory`` in a fresh subprocess on CPU (in-process on CUDA)."""
    if cfg['device'].startswith('cuda'):
        return measure_peak_memory(cfg)
    cmd = [sys.executable, '-m', 'dynamixer.bench', '--_memory-worker', json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'memory measurement failed: {out.stderr.strip().splitlines()[-1:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- benchmark

def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _summary(times: List[float], batch: int, flops_per_step: float, peak: float) -> Dict[str, Any]:
    median = statistics.median(times)
    gflops = flops_per_step / median / 1e9
    return {'times_s': [round(t, 5) for t in times], 'median_s': median, 'img_per_s': batch / median,
            'gflops': gflops, 'peak_fraction': gflops / peak}


SEGMENTATION_CLASSES, SEGMENTATION_SIZE = 11, (360, 480)  # CamVid's


def default_batch_size(img_size: Sequence[int]) -> int:
    """A batch that keeps a step long enough to time and short enough to repeat: 128 at CIFAR sizes, 32 up to
    ImageNet's 224, 8 beyond (dense-prediction inputs)."""
    side = max(img_size)
    return 128 if side <= 64 else 32 if side <= 224 else 8


def spread_warning(times: Dict[str, Sequence[float]], label: str) -> Optional[str]:
    """A warning when one implementation's timed runs differ more than 2x: the machine was busy, and the
    medians (and their ratio) may not be the implementations' own."""
    spreads = {impl: max(t) / min(t) for impl, t in times.items() if t and min(t) > 0}
    wide = {impl: r for impl, r in spreads.items() if r > 2}
    if not wide:
        return None
    return (f'{label}: the timed runs spread ' + ', '.join(f'{r:.1f}x ({impl})' for impl, r in wide.items())
            + ' between fastest and slowest: the machine was busy; rerun on an idle machine or with more --iters.')


def benchmark(model: str = 'dynamixer_s', batch_size: Optional[int] = None, train_batch_size: Optional[int] = None,
              img_size: Optional[int] = None, precision: str = 'fp32', device: str = 'cpu', compile: bool = False,
              warmup: int = 2, iters: int = 5, threads: Optional[int] = None,
              modes: Sequence[str] = ('inference', 'train'), memory: bool = True, reference: bool = True,
              model_args: Optional[Dict[str, Any]] = None, seed: int = 0, quiet: bool = True,
              recompute_mixing: Optional[bool] = None, slicing: bool = True, fusion: bool = True,
              triton: bool = True, onednn: bool = True, baseline_fp32_eager: bool = False,
              task: str = 'classification') -> Dict[str, Any]:
    """Fast vs reference, as a JSON-able dict (see the module docstring). The fast model's own fast path
    (``FastPath``, nothing global) follows the flags: ``recompute_mixing`` (None: the default), ``slicing=False``
    runs CPU inference batches whole, ``fusion=False`` drops the fused oneDNN linears of CPU inference,
    ``onednn=False`` the oneDNN linears of CPU fp32, ``triton=False`` the Triton mixing kernel on CUDA.
    ``baseline_fp32_eager`` runs the reference in fp32 eager with torch's default AdamW whatever ``precision``
    and ``compile`` say, and the fast model with the fused AdamW of ``dynamixer train``, so that the speed-up is
    that of a whole recipe's training step (e.g. bf16 + compile) over the plain model's. ``task='segmentation'``
    times the ``Segmenter`` on the backbone ``model`` (at 360 x 480 unless ``img_size`` says otherwise)."""
    from dynamixer.models import triton_mix
    options = fast_path_options(recompute_mixing, slicing, fusion, triton, onednn)
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}.')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError('--device cuda asked for, but this machine has no CUDA GPU; use --device cpu.')
    for mode in modes:
        if mode not in ('inference', 'train'):
            raise ValueError(f"modes must be 'inference' and/or 'train', got {mode!r}.")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model_args = dict(model_args or {})
    impls = IMPLEMENTATIONS if reference else ('fast',)

    _log(f'measuring the {precision} matmul peak', quiet)
    peak = matmul_peak_gflops(dev, precision)
    _log(f'building {model} at {img_size or "its own input size"} ({", ".join(impls)})', quiet)
    models = build_models(model, img_size, model_args, dev, impls, seed, options, task)
    fast = models['fast']
    if task == 'segmentation':
        fast_path = dataclasses.asdict(next(m.fast_path for m in fast.modules() if hasattr(m, 'set_fast_path')))
        img_size = img_size or list(SEGMENTATION_SIZE)
    else:
        fast_path = dataclasses.asdict(fast.fast_path)
        img_size = img_size or list(fast.img_size)
    input_size = (3, *_pair(img_size))
    batch_size = batch_size or default_batch_size(input_size[1:])
    train_batch_size = train_batch_size or batch_size

    def setting(impl: str):  # (precision, compile, fused optimizer) of one implementation
        if baseline_fp32_eager:
            return ('fp32', False, False) if impl == 'reference' else (precision, compile, True)
        return precision, compile, False
    macs = count_macs(fast, input_size)
    result = {
        'machine': machine_info(dev),
        'config': {'model': model, 'task': task, 'batch_size': batch_size, 'train_batch_size': train_batch_size,
                   'img_size': img_size, 'precision': precision, 'device': device, 'compile': compile,
                   'warmup': warmup, 'iters': iters, 'model_args': model_args, 'seed': seed,
                   'baseline_fp32_eager': baseline_fp32_eager,
                   'recompute_mixing': fast_path['recompute_mixing'],
                   'inference_slice_bytes': fast_path['inference_slice_bytes'],
                   'cpu_fused_inference': fast_path['cpu_fused_inference'],
                   'onednn_linears': fast_path['onednn_linears'],
                   'triton_mix': fast_path['triton'] and triton_mix.triton is not None, 'fast_path': fast_path},
        'matmul_peak_gflops': peak,
        'params': sum(p.numel() for p in fast.parameters()),
        'gmacs': macs / 1e9,
        'flops_note': 'GFLOP/s = 2 * MACs per image * images / s; training counts 3x the forward (fwd + bwd)',
    }
    if compile:
        _log('counting graph breaks', quiet)
        result['graph_breaks'] = {impl: graph_breaks(m, torch.zeros(1, *input_size, device=dev))
                                  for impl, m in models.items()}
    for mode in modes:
        batch = batch_size if mode == 'inference' else train_batch_size
        x = torch.randn(batch, *input_size, device=dev)
        runners = {impl: StepRunner(m, mode, x, *setting(impl)) for impl, m in models.items()}
        label = f'{mode} b{batch}'
        start = time.perf_counter()
        times = time_interleaved(runners, warmup, iters, quiet, label)
        flops = 2 * macs * batch * (1 if mode == 'inference' else 3)
        entry = {impl: _summary(t, batch, flops, peak) for impl, t in times.items()}
        entry['batch_size'] = batch
        warning = spread_warning(times, label)
        if warning:
            entry['warning'] = warning
            print(f'warning: {warning}', file=sys.stderr)
        entry['wall_s'] = time.perf_counter() - start
        if reference:
            entry['speedup'] = entry['reference']['median_s'] / entry['fast']['median_s']
        if memory:
            for impl in impls:
                _log(f'{label} peak memory {impl}', quiet)
                mem = peak_memory(dict(model=model, task=task, img_size=img_size, model_args=model_args, device=device,
                                       impl=impl, batch_size=batch, mode=mode, precision=setting(impl)[0],
                                       compile=setting(impl)[1], fused_optimizer=setting(impl)[2],
                                       threads=torch.get_num_threads(), seed=seed,
                                       fast_path=options))
                entry[impl]['peak_memory_mb'] = mem['peak_bytes'] / 2 ** 20
                entry['memory_method'] = mem['method']
            if reference:
                entry['memory_ratio'] = entry['fast']['peak_memory_mb'] / entry['reference']['peak_memory_mb']
        result[mode] = entry
        del runners
    return result


def resolution_sweep(model: str = 'dynamixer_s', sizes: Sequence[int] = (160, 224, 320, 448), base_size: int = 224,
                     batch_size: int = 8, precision: str = 'fp32', device: str = 'cpu', warmup: int = 1,
                     iters: int = 3, threads: Optional[int] = None, model_args: Optional[Dict[str, Any]] = None,
                     seed: int = 0, quiet: bool = True) -> Dict[str, Any]:
    """Inference time against resolution: a model built at each size, and one built at ``base_size`` with
    ``dynamic_img_size=True`` (mixing in windows of its built line length), with their GMACs."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model_args = dict(model_args or {})
    dyn_args = dict(model_args, dynamic_img_size=True)
    dynamic = build_models(model, base_size, dyn_args, dev, ('fast',), seed)['fast']
    rows = []
    for size in sizes:
        _log(f'sweep {size}x{size}', quiet)
        fixed = build_models(model, size, model_args, dev, ('fast',), seed)['fast']
        x = torch.randn(batch_size, 3, size, size, device=dev)
        runners = {'fixed': StepRunner(fixed, 'inference', x, precision, False),
                   'dynamic': StepRunner(dynamic, 'inference', x, precision, False)}
        times = time_interleaved(runners, warmup, iters, quiet, f'sweep {size}')
        row = {'img_size': size,
               'fixed_gmacs': count_macs(fixed, (3, size, size)) / 1e9,
               'dynamic_gmacs': count_macs(dynamic, (3, size, size)) / 1e9}
        for name in ('fixed', 'dynamic'):
            median = statistics.median(times[name])
            row[f'{name}_ms_per_img'] = median / batch_size * 1e3
            row[f'{name}_img_per_s'] = batch_size / median
        rows.append(row)
        del fixed, runners
    base = next((r for r in rows if r['img_size'] == base_size), rows[0])
    for row in rows:
        for name in ('fixed', 'dynamic'):
            row[f'{name}_time_vs_base'] = row[f'{name}_ms_per_img'] / base[f'{name}_ms_per_img']
            row[f'{name}_gmacs_vs_base'] = row[f'{name}_gmacs'] / base[f'{name}_gmacs']
    return {'machine': machine_info(dev),
            'config': {'model': model, 'sizes': list(sizes), 'base_size': base_size, 'batch_size': batch_size,
                       'precision': precision, 'device': device, 'warmup': warmup, 'iters': iters,
                       'model_args': model_args, 'seed': seed},
            'sweep': rows}


# ----------------------------------------------------------------------------------------------------- tables

def format_table(result: Dict[str, Any]) -> str:
    cfg, machine = result['config'], result['machine']
    baseline = ('; the reference in fp32 eager with torch\'s default AdamW, the fast model with dynamixer train\'s '
                'fused AdamW' if cfg.get('baseline_fp32_eager') else '')
    model = cfg['model'] + (' segmenter (FPN)' if cfg.get('task') == 'segmentation' else '')
    size = 'x'.join(map(str, _pair(cfg['img_size'])))
    lines = [f"{model} {size}px {cfg['precision']} {cfg['device']} "
             f"{'compiled' if cfg['compile'] else 'eager'}, {machine['threads']} threads, torch {machine['torch']}"
             f"{', mixing matrices kept for backward' if cfg.get('recompute_mixing') is False else ''}"
             f"{', inference batches whole' if cfg.get('inference_slice_bytes') == 0 else ''}"
             f"{', no fused linears' if cfg.get('cpu_fused_inference') is False else ''}"
             f"{', no oneDNN linears' if cfg.get('onednn_linears') is False else ''}"
             f"{', no Triton kernel' if cfg.get('triton_mix') is False and cfg['device'].startswith('cuda') else ''}"
             f"{baseline}",
             f"{machine['cpu']}; params {result['params']:,}; {result['gmacs']:.3f} GMACs/img; "
             f"matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s"]
    if 'graph_breaks' in result:
        lines.append('graph breaks: ' + ', '.join(f'{k} {v}' for k, v in result['graph_breaks'].items()))
    header = '| mode | batch | impl | median s/step | img/s | GFLOP/s | % of peak | peak mem MB |'
    lines += ['', header, '|' + '---|' * 8]
    for mode in ('inference', 'train'):
        if mode not in result:
            continue
        entry = result[mode]
        for impl in IMPLEMENTATIONS:
            if impl not in entry:
                continue
            e = entry[impl]
            mem = f"{e['peak_memory_mb']:.0f}" if 'peak_memory_mb' in e else '-'
            lines.append(f"| {mode} | {entry['batch_size']} | {impl} | {e['median_s']:.3f} | {e['img_per_s']:.1f} | "
                         f"{e['gflops']:.1f} | {100 * e['peak_fraction']:.0f}% | {mem} |")
        if 'speedup' in entry:
            mem = f"{entry['memory_ratio']:.2f}x" if 'memory_ratio' in entry else '-'
            verdict = 'faster' if entry['speedup'] >= 1 else '(slower)'
            lines.append(f"| {mode} | {entry['batch_size']} | **fast vs reference** | **{entry['speedup']:.2f}x** "
                         f"{verdict} | | | | {mem} |")
    lines += [f"\nwarning: {result[mode]['warning']}" for mode in ('inference', 'train')
              if 'warning' in result.get(mode, {})]
    return '\n'.join(lines)


def format_sweep(result: Dict[str, Any]) -> str:
    cfg = result['config']
    lines = [f"{cfg['model']} inference, batch {cfg['batch_size']}, {cfg['precision']} {cfg['device']}; "
             f"dynamic = built at {cfg['base_size']} with dynamic_img_size=True",
             '', '| size | fixed GMACs | fixed ms/img | fixed time / GMACs vs base | dynamic GMACs | dynamic ms/img '
                 '| dynamic time / GMACs vs base |', '|' + '---|' * 7]
    for r in result['sweep']:
        lines.append(f"| {r['img_size']} | {r['fixed_gmacs']:.2f} | {r['fixed_ms_per_img']:.1f} | "
                     f"{r['fixed_time_vs_base']:.2f} / {r['fixed_gmacs_vs_base']:.2f} | {r['dynamic_gmacs']:.2f} | "
                     f"{r['dynamic_ms_per_img']:.1f} | {r['dynamic_time_vs_base']:.2f} / "
                     f"{r['dynamic_gmacs_vs_base']:.2f} |")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------- CLI


def run(args) -> int:
    import dynamixer
    if args.model not in dynamixer.list_models():
        dynamixer.create_model(args.model)  # a KeyError that suggests the closest name, before anything is timed
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as e:
        raise ValueError(f'--model-args is not valid JSON ({e}); give e.g. \'{{"depths": [1, 1, 1, 1]}}\'.')
    if args.img_size and len(args.img_size) > 2:
        raise ValueError(f'--img-size takes H or H W, got {len(args.img_size)} numbers.')
    img_size = None if not args.img_size else args.img_size[0] if len(args.img_size) == 1 else list(args.img_size)
    if args.sweep:
        if isinstance(img_size, list) or args.task != 'classification':
            raise ValueError('--sweep builds square classification models: give one --img-size and no --task.')
        result = resolution_sweep(args.model, args.sweep, img_size or 224, args.batch_size or 8, args.precision,
                                  args.device, args.warmup, args.iters, args.threads, model_args, args.seed,
                                  args.quiet)
        table = format_sweep(result)
    else:
        result = benchmark(args.model, args.batch_size, args.train_batch_size, img_size, args.precision,
                           args.device, args.compile, args.warmup, args.iters, args.threads,
                           [m.strip() for m in args.modes.split(',') if m.strip()], not args.no_memory,
                           not args.no_reference, model_args, args.seed, args.quiet,
                           recompute_mixing=False if args.keep_mixing else None, slicing=not args.no_slicing,
                           fusion=not args.no_fusion, triton=not args.no_triton, onednn=not args.no_onednn,
                           baseline_fp32_eager=args.baseline_fp32_eager, task=args.task)
        table = format_table(result)
    if args.output:
        from pathlib import Path
        from dynamixer.io import write_text
        write_text(Path(args.output), json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else table)
    return 0


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--_memory-worker':
        print(json.dumps(measure_peak_memory(json.loads(sys.argv[2]))))
        sys.exit(0)
    from dynamixer.cli import main
    sys.exit(main(['bench'] + sys.argv[1:]))
