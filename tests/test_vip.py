"""The ViP baseline (Permute-MLP token mixer in DynaMixer's network) and training peers from timm by name."""
import json
from pathlib import Path

import pytest
import timm
import torch

import dynamixer
from conftest import make_image_folder
from dynamixer import cli
from dynamixer.models import MODEL_ARGS, PermuteMixer, permute_mixer_params


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('img_size', [32, 48, (32, 48), 16])
def test_vip_forward_backward_at_the_sizes_it_is_built_for(img_size):
    torch.manual_seed(0)
    model = timm.create_model('vip_cifar_xs', img_size=img_size)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, h, w, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    mixers = [m for m in model.modules() if isinstance(m, PermuteMixer)]
    assert len(mixers) == sum(MODEL_ARGS['vip_cifar_xs']['depths'])
    for mixer in mixers:  # every branch takes part in the output
        for layer in (mixer.height_mix, mixer.width_mix, mixer.channel_mix, mixer.proj):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='built for'):
        model(torch.randn(1, 3, h + 4, w))


def test_permute_mixer_mixes_each_segment_of_each_column_with_one_layer():
    """The height layer maps segment s of column j from the same segment of the same column (likewise rows), one
    layer shared by all segments and lines: checked against a direct loop over segments."""
    torch.manual_seed(0)
    dim, (H, W), S = 12, (4, 5), 3
    mixer = PermuteMixer(dim, (H, W), num_segments=S, fusion='sum').eval()
    x = torch.randn(2, H, W, dim)
    seg = dim // S
    expected = torch.zeros(2, H, W, dim)
    with torch.no_grad():
        got = mixer(x)
        for s in range(S):
            part = x[..., s * seg:(s + 1) * seg]
            columns = part.permute(0, 2, 1, 3).reshape(2, W, H * seg)  # column j: H positions x seg channels
            expected[..., s * seg:(s + 1) * seg] += mixer.height_mix(columns).view(2, W, H, seg).permute(0, 2, 1, 3)
            rows = part.reshape(2, H, W * seg)
            expected[..., s * seg:(s + 1) * seg] += mixer.width_mix(rows).view(2, H, W, seg)
        expected = mixer.proj(expected + mixer.channel_mix(x))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('dim,lines,segments,fusion', [(96, (8, 8), 4, 'reweight'), (192, (4, 4), 8, 'reweight'),
                                                      (48, (6, 10), 6, 'sum')])
def test_permute_mixer_parameter_count_formula(dim, lines, segments, fusion):
    mixer = PermuteMixer(dim, lines, num_segments=segments, fusion=fusion)
    assert _params(mixer) == permute_mixer_params(dim, lines, segments, fusion)


def test_vip_parameters_within_ten_percent_of_its_dynamixer():
    vip, dyn = timm.create_model('vip_cifar_xs'), timm.create_model('dynamixer_cifar_xs')
    assert _params(vip) != _params(dyn)
    assert abs(_params(vip) / _params(dyn) - 1) < 0.10
    # the same network around a different token mixer: the difference is exactly the mixers'
    dyn_mixers = sum(_params(m.token_mixer) for m in dyn.modules() if hasattr(m, 'token_mixer'))
    vip_mixers = sum(_params(m.token_mixer) for m in vip.modules() if hasattr(m, 'token_mixer'))
    assert _params(dyn) - dyn_mixers == _params(vip) - vip_mixers
    expected = sum(permute_mixer_params(dim, (8 // stride, 8 // stride), s) * depth for dim, stride, s, depth in
                   ((96, 1, 4, 2), (192, 2, 8, 4)))
    assert vip_mixers == expected


def test_vip_rejects_dynamixer_only_options():
    for bad in (dict(dynamic_img_size=True), dict(share_row_col=True), dict(generation='static')):
        with pytest.raises(ValueError, match='permute'):
            timm.create_model('vip_cifar_xs', **bad)
    with pytest.raises(ValueError, match='token_mixer'):
        timm.create_model('dynamixer_cifar_xs', token_mixer='nope')


def test_vip_is_listed_and_saves_and_loads_as_a_folder(tmp_path):
    assert 'vip_cifar_xs' in dynamixer.list_models()
    model = timm.create_model('vip_cifar_xs', num_classes=3).eval()
    from dynamixer.model_dir import save_model_dir
    save_model_dir(model, tmp_path / 'model', ['a', 'b', 'c'])
    loaded = timm.create_model(f'local-dir:{tmp_path / "model"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def _train(capsys, tmp_path: Path, *extra: str):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=6, size=16).parent
    out = tmp_path / 'run'
    code = cli.main(['train', '--data', str(data), '--val-split', '0.25', '--output', str(out), '--no-progress',
                     '--workers', '0', '--epochs', '1', '--batch-size', '6', *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def test_train_a_timm_model_by_name(tmp_path, capsys):
    code, out, err, run = _train(capsys, tmp_path, '--model', 'mixer_s16_224', '--model-kwargs', 'img_size=16',
                                 'patch_size=4', 'embed_dim=32', 'num_blocks=2')
    assert code == 0, err
    assert 'epoch 1/1' in out and 'val_top1' in out
    config = json.loads((run / 'model' / 'config.json').read_text())
    assert config['architecture'] == 'mixer_s16_224'
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16]
    assert config['model_args']['patch_size'] == 4  # which the entry point fixes at 16
    from dynamixer.model_dir import load_model_dir
    model = load_model_dir(str(run / 'model'))
    assert model.stem.proj.kernel_size == (4, 4) and len(model.blocks) == 2
    assert model.pretrained_cfg['label_names'] == ['cat', 'dog', 'fox']
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    code = cli.main(['predict', '--model-dir', str(run), str(next((tmp_path / 'data' / 'train' / 'dog').iterdir()))])
    assert code == 0 and 'dog' in capsys.readouterr().out


def test_train_the_vip_baseline_under_a_recipe(tmp_path, capsys):
    code, out, err, run = _train(capsys, tmp_path, '--model', 'vip_cifar_xs', '--img-size', '16')
    assert code == 0, err
    assert json.loads((run / 'model' / 'config.json').read_text())['architecture'] == 'vip_cifar_xs'


def test_an_unknown_model_name_is_one_line(tmp_path, capsys):
    code, _, err, _ = _train(capsys, tmp_path, '--model', 'mixer_s16_22')
    assert code == 2
    assert err.strip().count('\n') == 0 and 'Traceback' not in err, err
    assert "unknown --model 'mixer_s16_22'" in err and "did you mean 'mixer_s16_224'" in err
