"""dynamixer export: a timm local-dir model folder to ONNX (checked with onnxruntime), TorchScript, ExportedProgram."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import dynamixer  # noqa: F401
from dynamixer.cli import main
from dynamixer.export import export_model, load_model_dir

TINY = dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], num_segments=[2, 4, 4, 4], num_classes=5)


def save_model_dir(folder, architecture='dynamixer_cifar_t', **model_args):
    """A timm local-dir folder: config.json (architecture, model_args, pretrained_cfg) + model.safetensors."""
    torch.manual_seed(0)
    args = dict(TINY, **model_args)
    model = timm.create_model(architecture, **args).eval()
    cfg = dict(model.pretrained_cfg)
    cfg.pop('architecture', None)
    cfg['num_classes'] = model.num_classes  # else timm re-initialises the head when loading
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'config.json').write_text(json.dumps(
        {'architecture': architecture, 'model_args': args, 'pretrained_cfg': cfg}, default=list))
    save_file(model.state_dict(), str(folder / 'model.safetensors'))
    return model


def test_local_dir_round_trip(tmp_path):
    model = save_model_dir(tmp_path / 'model')
    loaded = load_model_dir(str(tmp_path / 'model'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_onnx_matches_torch_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = save_model_dir(tmp_path / 'model')
    out = tmp_path / 'exported' / 'model.onnx'
    assert main(['export', '--model-dir', str(tmp_path / 'model'), '--format', 'onnx', str(out)]) == 0
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.endswith('.tmp.onnx')]
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (batch, 5)
        assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize('model_args', [dict(generation='static', fusion='sum'),
                                        dict(generation='dense', share_row_col=True), dict(img_size=(32, 24))])
def test_onnx_other_configurations(tmp_path, model_args):
    pytest.importorskip('onnxruntime')
    model = timm.create_model('dynamixer_cifar_t', **TINY, **model_args)
    result = export_model(model, str(tmp_path / 'm.onnx'), 'onnx')
    assert result['ok'] and result['max_abs_diff'] <= 1e-4


def test_dynamic_img_size_exports_at_the_chosen_size(tmp_path):
    pytest.importorskip('onnxruntime')
    model = timm.create_model('dynamixer_cifar_t', dynamic_img_size=True, **TINY)
    result = export_model(model, str(tmp_path / 'm.onnx'), 'onnx', img_size=(40, 24))
    assert result['ok'] and result['input_size'] == [3, 40, 24]
    fixed = timm.create_model('dynamixer_cifar_t', **TINY)
    with pytest.raises(ValueError, match='accepts only that size'):
        export_model(fixed, str(tmp_path / 'f.onnx'), 'onnx', img_size=(40, 24))


@pytest.mark.parametrize('fmt,name', [('torchscript', 'model.pt'), ('exported-program', 'model.pt2')])
def test_torchscript_and_exported_program(tmp_path, fmt, name):
    model = save_model_dir(tmp_path / 'model')
    out = tmp_path / name
    assert main(['export', '--model-dir', str(tmp_path / 'model'), '--format', fmt, str(out)]) == 0
    x = torch.randn(3, 3, 32, 32)
    loaded = torch.jit.load(str(out)) if fmt == 'torchscript' else torch.export.load(str(out)).module()
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


def test_errors(tmp_path, capsys):
    assert main(['export', '--model-dir', str(tmp_path / 'missing'), str(tmp_path / 'm.onnx')]) == 2
    (tmp_path / 'empty').mkdir()
    assert main(['export', '--model-dir', str(tmp_path / 'empty'), str(tmp_path / 'm.onnx')]) == 2
    assert 'config.json' in capsys.readouterr().err
    assert not (tmp_path / 'm.onnx').exists()


def test_onnx_without_onnx_installed_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnx' else real(name, *a))
    save_model_dir(tmp_path / 'model')
    assert main(['export', '--model-dir', str(tmp_path / 'model'), str(tmp_path / 'm.onnx')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pip install "dynamixer[export]"' in err and 'needs onnx:' in err
    assert not (tmp_path / 'm.onnx').exists()
