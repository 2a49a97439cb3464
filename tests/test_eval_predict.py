"""dynamixer eval and dynamixer predict on a model folder written by dynamixer train."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_args
from dynamixer import cli
from dynamixer.data import load_splits


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """A tiny digits model, trained for two epochs."""
    out = tmp_path_factory.mktemp('run')
    assert cli.main(train_args(out, '--epochs', '2', '--batch-size', '128')) == 0
    return out


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reproduces_the_validation_of_training(trained, capsys, tmp_path):
    png = tmp_path / 'cm.png'
    code, out, err = _cli(capsys, 'eval', '--model-dir', str(trained / 'model'), '--data', 'digits',
                          '--workers', '0', '--json', '--confusion', str(png))
    assert code == 0, err
    metrics = json.loads(out)
    records = [json.loads(line) for line in (trained / 'metrics.jsonl').read_text().splitlines()]
    best = max(records, key=lambda r: r['val_top1'])  # the model folder holds the best epoch's weights
    assert metrics['count'] == 360
    assert metrics['top1'] == pytest.approx(best['val_top1'], abs=1e-6)
    assert metrics['top5'] == pytest.approx(best['val_top5'], abs=1e-6)
    assert metrics['loss'] == pytest.approx(best['val_loss'], rel=1e-5)
    assert set(metrics['per_class']) == {str(i) for i in range(10)}
    # per-class accuracies weighted by class counts give the overall top-1
    counts = np.bincount(load_splits('digits').val.targets)
    overall = sum(metrics['per_class'][str(c)] * counts[c] for c in range(10)) / counts.sum()
    assert overall == pytest.approx(metrics['top1'], abs=1e-6)
    assert png.read_bytes()[:4] == b'\x89PNG'

    code, out, _ = _cli(capsys, 'eval', '--model-dir', str(trained / 'model'), '--workers', '0')
    assert code == 0 and 'top-1' in out and 'per-class' in out
    assert (trained / 'confusion.png').is_file()  # default place: next to the model folder


def test_predict_uses_the_models_own_preprocessing(trained, capsys, tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    paths = []
    for i in range(3):
        path = tmp_path / f'digit{i}.png'
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(str(path))
    code, out, err = _cli(capsys, 'predict', '--model-dir', str(trained / 'model'), '--json', '--topk', '3', *paths)
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r['file'] for r in results] == paths
    import timm
    model = timm.create_model(f'local-dir:{trained / "model"}', pretrained=True).eval()
    for i, r in enumerate(results):
        probs = [t['prob'] for t in r['top']]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        # by hand: 1 channel, 0..1, normalised with mean 0.5 / std 0.5 (what the model folder says)
        x = torch.tensor(np.round(digits.images[i] * 255 / 16) / 255, dtype=torch.float32)[None, None]
        expected = model((x - 0.5) / 0.5).softmax(-1)[0]
        p, idx = expected.topk(3)
        assert [t['index'] for t in r['top']] == idx.tolist()
        assert probs == pytest.approx(p.tolist(), abs=1e-5)
        assert [t['label'] for t in r['top']] == [str(j) for j in idx.tolist()]

    code, out, _ = _cli(capsys, 'predict', '--model-dir', str(trained / 'model'), paths[0])
    assert code == 0 and out.splitlines()[0] == paths[0] and '%' in out.splitlines()[1]


def test_bad_inputs_are_one_line_errors(trained, capsys, tmp_path):
    not_image = tmp_path / 'notes.png'
    not_image.write_text('not an image')
    for argv, expect in [
        (['predict', '--model-dir', str(trained / 'model'), str(not_image)], 'could not read'),
        (['predict', '--model-dir', str(trained / 'model'), str(tmp_path / 'missing.png')], 'does not exist'),
        (['predict', '--model-dir', str(tmp_path), str(not_image)], 'config.json'),
        (['eval', '--model-dir', str(tmp_path / 'nowhere'), '--workers', '0'], 'config.json'),
    ]:
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and expect in err and 'Traceback' not in err and err.strip().count('\n') == 0, err


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    from functools import partial
    from dynamixer.evaluate import evaluate, tta_logits
    from dynamixer.tasks.metrics import ClassificationMetrics
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images, targets = torch.randn(64, 3, 4, 4), torch.randint(0, 5, (64,))
    loader = [(images[:40], targets[:40], []), (images[40:], targets[40:], [])]
    plain = evaluate(model, loader, torch.device('cpu'), ClassificationMetrics(5)).compute()
    tta = evaluate(model, loader, torch.device('cpu'), ClassificationMetrics(5),
                   infer=partial(tta_logits, tta='flip')).compute()
    with torch.no_grad():
        logits = (model(images) + model(images.flip(-1))) / 2
    assert tta['top1'] == pytest.approx((logits.argmax(1) == targets).float().mean().item() * 100)
    assert tta['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    assert tta['loss'] != pytest.approx(plain['loss'], rel=1e-3)  # the mirror really was looked at


def test_flip_shift_tta_adds_the_mirrored_pairs_shifted_one_pixel_diagonally():
    from dynamixer.evaluate import tta_logits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 6, 4))  # linear: views average as images
    x = torch.randn(3, 2, 5, 6)
    up_left = x[:, :, [1, 0, 1, 2, 3]][..., [1, 0, 1, 2, 3, 4]]  # reflection at the top and left edges
    down_right = x[:, :, [1, 2, 3, 4, 3]][..., [1, 2, 3, 4, 5, 4]]
    mean_view = (x + x.flip(-1)) / 4 + (up_left + up_left.flip(-1) + down_right + down_right.flip(-1)) / 8
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, x, 'flip-shift'), model(mean_view), atol=1e-5)
        assert not torch.allclose(tta_logits(model, x, 'flip'), model(mean_view), atol=1e-3)
    with pytest.raises(ValueError, match='tta must be one of'):
        tta_logits(model, x, 'rotate')


def test_predict_warns_when_the_image_looks_nothing_like_the_models_inputs(trained, capsys, tmp_path):
    rng = np.random.default_rng(0)
    photo = tmp_path / 'photo.png'  # 300x200 colour, for an 8x8 grayscale digits model
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(photo)
    gray = tmp_path / 'gray.png'  # 8x8 grayscale: what the model was trained on
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(gray)
    code, out, err = _cli(capsys, 'predict', '--model-dir', str(trained / 'model'), '--json', str(photo), str(gray))
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert '300x200 colour image' in results[0]['warning'] and '8x8 grayscale' in results[0]['warning']
    assert 'warning' not in results[1]
    assert err.count('warning:') == 1 and 'photo.png' in err


def test_visualize_and_eval_work_on_the_digits_run_folder(trained, capsys, tmp_path):
    from sklearn.datasets import load_digits
    digit = tmp_path / 'digit.png'
    Image.fromarray(np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)).save(digit)
    png = tmp_path / 'mixing.png'
    code, _, err = _cli(capsys, 'visualize', '--model-dir', str(trained / 'model'), str(digit), '--output', str(png))
    assert code == 0 and png.read_bytes()[:4] == b'\x89PNG', err
    (trained / 'confusion.png').unlink(missing_ok=True)
    assert _cli(capsys, 'eval', '--model-dir', str(trained), '--workers', '0')[0] == 0  # the run folder itself
    assert (trained / 'confusion.png').is_file() and not (trained.parent / 'confusion.png').exists()


def test_a_standard_timm_folder_with_pytorch_model_bin_is_accepted(trained, capsys, tmp_path):
    import timm
    from timm.models._hub import save_for_hf
    model = timm.create_model(f'local-dir:{trained / "model"}', pretrained=True).eval()
    save_for_hf(model, tmp_path / 'hf', safe_serialization=False)
    assert (tmp_path / 'hf' / 'pytorch_model.bin').is_file() and not (tmp_path / 'hf' / 'model.safetensors').exists()
    code, out, err = _cli(capsys, 'predict', '--model-dir', str(tmp_path / 'hf'), '--json', '--topk', '1',
                          str(_a_digit(tmp_path)))
    reference = _cli(capsys, 'predict', '--model-dir', str(trained / 'model'), '--json', '--topk', '1',
                     str(_a_digit(tmp_path)))[1]
    assert code == 0 and json.loads(out)['top'] == json.loads(reference)['top'], err
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'config.json').write_text('{}')
    code, _, err = _cli(capsys, 'predict', '--model-dir', str(tmp_path / 'empty'), str(_a_digit(tmp_path)))
    assert code == 2 and 'has no weights (model.safetensors or pytorch_model.bin).' in err


def _a_digit(folder: Path) -> Path:
    from sklearn.datasets import load_digits
    path = folder / 'digit.png'
    Image.fromarray(np.round(load_digits().images[3] * 255 / 16).astype(np.uint8)).save(path)
    return path
