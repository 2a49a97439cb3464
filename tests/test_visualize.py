"""dynamixer visualize: draws exactly the matrices DynaMixerOp.mixing_matrix generates; clear errors."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models._hub import save_for_hf

import dynamixer  # noqa: F401
from dynamixer.cli import main
from dynamixer.visualize import block_mixing_matrices, load_image, load_model, visualize

TINY = dict(patch_size=4, embed_dims=(16, 16), depths=(1, 2), stage_strides=(1, 1), num_segments=(2, 4),
            reduced_dims=2)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_cifar_t', **TINY)
    with torch.no_grad():  # sharper than the init, so the matrices are far from uniform
        for module in model.modules():
            if isinstance(module, dynamixer.models.DynaMixerOp):
                module.generate.weight.normal_(0, 2.)
    path = tmp_path_factory.mktemp('run') / 'model'
    save_for_hf(model, path, safe_serialization=True)
    return path


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp('img') / 'img.png'
    yy, xx = np.mgrid[:40, :36]  # smooth as a photo (random noise would be warned about), not 32x32: resized
    pixels = np.stack([xx * 6, yy * 5, (xx + yy) * 3], -1) + rng.integers(0, 20, (40, 36, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def reference_matrices(model, x, stage, block):
    """The block's normed input computed by hand, through mixing_matrix."""
    with torch.no_grad():
        h = model.stem(x)
        for i in range(stage):
            h = model.stages[i](h)
        s = model.stages[stage]
        h = s.downsample(h)
        for j in range(block):
            h = s.blocks[j](h)
        layer = s.blocks[block]
        h = layer.norm1(h)
        _, H, W, C = h.shape
        mixer = layer.token_mixer
        rows = mixer.row_mix.mixing_matrix(h.reshape(H, W, C))
        cols = mixer.column_op.mixing_matrix(h.transpose(1, 2).reshape(W, H, C))
    return rows.numpy(), cols.numpy()


def test_draws_mixing_matrix_output(model_dir, image, tmp_path):
    out = tmp_path / 'pic' / 'mix.png'
    result = visualize(str(model_dir), str(image), block='1.1', token='2,5', output=str(out))
    assert out.is_file() and out.stat().st_size > 5000
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    model = load_model(str(model_dir))
    x, shown = load_image(model, str(image))
    assert x.shape == (1, 3, 32, 32) and shown.shape == (32, 32, 3)
    rows, cols = reference_matrices(model, x, 1, 1)  # (H, S, W, W), (W, S, H, H)
    assert rows.shape == (8, 4, 8, 8) and cols.shape == (8, 4, 8, 8)
    np.testing.assert_allclose(result['row_matrices'], rows[2], atol=1e-6)
    np.testing.assert_allclose(result['col_matrices'], cols[5], atol=1e-6)
    np.testing.assert_allclose(result['row_weights'], rows[2, :, 5, :], atol=1e-6)
    np.testing.assert_allclose(result['col_weights'], cols[5, :, 2, :], atol=1e-6)
    np.testing.assert_allclose(result['row_matrices'].sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(result['col_matrices'].sum(-1), 1, atol=1e-5)
    assert result['row_matrices'].max() > 0.3  # far from uniform (1/8): the picture has something to show

    mats = block_mixing_matrices(model, x, 0, 0)  # the whole block: every row and column
    rows0, cols0 = reference_matrices(model, x, 0, 0)
    np.testing.assert_allclose(mats['rows'], rows0, atol=1e-6)
    np.testing.assert_allclose(mats['cols'], cols0, atol=1e-6)
    np.testing.assert_allclose(mats['logits'], model(x).detach().numpy(), atol=1e-5)


def test_cli_writes_png_and_takes_run_dir(model_dir, image, tmp_path, capsys):
    out = tmp_path / 'cli.png'
    assert main(['visualize', str(image), '--model-dir', str(model_dir.parent), '--output', str(out)]) == 0
    assert out.is_file()
    assert 'token 4,4' in capsys.readouterr().out  # the centre token by default


@pytest.mark.parametrize('extra,message', [
    (['--block', '2.0'], 'stage 2 does not exist'),
    (['--block', '1.2'], 'stage 1 has blocks 0-1'),
    (['--block', 'one'], 'STAGE.BLOCK'),
    (['--token', '8,0'], 'outside'),
    (['--token', '3'], 'ROW,COL'),
])
def test_bad_block_or_token(model_dir, image, tmp_path, capsys, extra, message):
    code = main(['visualize', str(image), '--model-dir', str(model_dir), '--output', str(tmp_path / 'x.png'), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'x.png').exists()


def test_missing_inputs(model_dir, image, tmp_path, capsys):
    assert main(['visualize', str(image), '--model-dir', str(tmp_path / 'nope')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert main(['visualize', str(tmp_path / 'nope.jpg'), '--model-dir', str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.jpg' does not exist" in err and len(err.splitlines()) == 1
