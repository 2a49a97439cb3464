"""Segmentation: the DynaMixer pyramid at any size, the FPN segmenter on any timm backbone, metrics, and training,
eval and predict through the one loop, end to end on a tiny synthetic CamVid-style folder."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dynamixer  # noqa: F401  registers the variants
from dynamixer import cli
from dynamixer.models.dynamixer import DynaMixerOp
from dynamixer.models.segmentation import Segmenter
from dynamixer.tasks.metrics import SegmentationMetrics
from dynamixer.tasks.segmentation import class_weights, segment, slide_logits

from conftest import TINY_PYRAMID, make_seg_folder


@pytest.fixture
def seg_folder(tmp_path):
    return make_seg_folder(tmp_path / 'camvid_tiny')


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _train(capsys, data, out, *extra):
    return _cli(capsys, 'train', '--data', str(data), '--output', str(out), '--no-progress', '--epochs', '3',
                '--batch-size', '4', '--crop-size', '32', '32', '--scale', '0.75', '1.25', '--lr', '5e-3',
                '--warmup-epochs', '0', '--decoder-channels', '32', '--threads', '1',
                '--model-kwargs', *TINY_PYRAMID, *extra)


# ---------------------------------------------------------------------------------------------------------
# the pyramid

@pytest.mark.parametrize('size', [(100, 133), (256, 256), (37, 300), (520, 70)])
def test_pyramid_gives_four_levels_at_strides_4_to_32_at_any_size(size):
    model = timm.create_model('dynamixer_pyramid_t', features_only=True, pretrained=False)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    lines = []
    hooks = [m.register_forward_hook(lambda mod, args, out: lines.append((mod.seq_len, args[0].shape[1])))
             for m in model.modules() if isinstance(m, DynaMixerOp)]
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    for h in hooks:
        h.remove()
    H, W = size
    for f, stride, chs in zip(features, (4, 8, 16, 32), model.feature_info.channels()):
        assert f.shape[1] == chs and abs(f.shape[2] - H / stride) < 1 and abs(f.shape[3] - W / stride) < 1
    assert lines and all(built == seen == 16 for built, seen in lines)  # every line mixed in windows of 16


def test_a_long_line_is_mixed_window_by_window_and_a_line_of_one_window_as_a_whole():
    torch.manual_seed(0)
    windowed = timm.create_model('dynamixer_pyramid_t', num_classes=0).eval()
    from dynamixer.models import MODEL_ARGS, DynaMixer
    args = {k: v for k, v in MODEL_ARGS['dynamixer_pyramid_t'].items() if k not in ('window_size', 'dynamic_img_size')}
    whole = DynaMixer(**dict(args, img_size=64), num_classes=0).eval()  # stride 4: lines of 16 tokens in stage 0
    whole.stem.load_state_dict(windowed.stem.state_dict())
    whole.stages[0].load_state_dict(windowed.stages[0].state_dict())
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.allclose(windowed.stages[0](windowed.stem(x)), whole.stages[0](whole.stem(x)), atol=1e-5)
        op = windowed.stages[0].blocks[0].token_mixer.row_mix
        lines = torch.randn(3, 20, 32)  # a window of 16 and one of 4 (padded, masked)
        mixed = op.mix_lines(lines, allow_windows=True)
        assert torch.allclose(mixed[:, :16], op(lines[:, :16]), atol=1e-5)  # windows do not see each other
        longer = torch.cat([lines, torch.randn(3, 5, 32)], dim=1)  # the second window's padding filled with tokens
        assert not torch.allclose(op.mix_lines(longer, allow_windows=True)[:, 16:20], mixed[:, 16:20], atol=1e-3)


@pytest.mark.parametrize('size,options', [
    ((128, 128), {}), ((128, 192), {}),  # tiled by windows of 16 at strides 4 and 8
    ((100, 140), {}), ((96, 120), {}),  # padded windows (one side or both), maps smaller than one window
    ((100, 140), dict(recompute_mixing=False)), ((100, 140), dict(cpu_kernels=False))])
def test_the_windowed_fast_path_gives_the_plain_modules_values_and_gradients(size, options, monkeypatch):
    import dynamixer.models.fused as fused
    tiled = []
    monkeypatch.setattr(fused, '_tiled_window_branches',
                        lambda *a, original=fused._tiled_window_branches: tiled.append(1) or original(*a))
    torch.manual_seed(0)
    fast = timm.create_model('dynamixer_pyramid_t', num_classes=0).set_fast_path(**options)
    plain = timm.create_model('dynamixer_pyramid_t', num_classes=0, fast_path=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, *size, requires_grad=True)
    a, b = fast.forward_features(x), plain.forward_features(x)
    grad = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *fast.parameters()], grad)
    gb = torch.autograd.grad(b, [x, *plain.parameters()], grad)
    assert torch.allclose(a, b, atol=1e-5)
    # gradients summed over many tokens: to 1e-5 of each tensor's own scale (fp32 sums in another order)
    assert all((p - q).abs().max() <= 1e-5 * q.abs().max() for p, q in zip(ga, gb))
    assert tiled
    with torch.no_grad():
        assert torch.allclose(fast.eval().forward_features(x), plain.eval().forward_features(x), atol=1e-5)


def test_padded_windows_under_bf16_autocast_match_the_plain_modules():
    torch.manual_seed(0)
    fast = timm.create_model('dynamixer_pyramid_t', num_classes=0)
    plain = timm.create_model('dynamixer_pyramid_t', num_classes=0, fast_path=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 90, 120)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a, b = fast.forward_features(x).float(), plain.forward_features(x).float()
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # bf16 rounding in another order, not -inf or NaN


def test_smp_takes_the_pyramid_at_its_defaults():
    from segmentation_models_pytorch.encoders.timm_universal import TimmUniversalEncoder
    encoder = TimmUniversalEncoder('dynamixer_pyramid_t', pretrained=False, depth=5)
    assert encoder._is_transformer_style and encoder.out_channels == [3, 0, 32, 64, 128, 256]


# ---------------------------------------------------------------------------------------------------------
# the segmenter

@pytest.mark.parametrize('backbone,kwargs', [('dynamixer_pyramid_t', dict(zip(
    ('depths', 'embed_dims', 'num_segments', 'window_size'), ((1, 1, 1, 1), (16, 16, 32, 32), (2, 2, 4, 4), 4)))),
    ('resnet10t', {}), ('convnext_atto', {})])
def test_segmenter_masks_have_the_input_size_on_any_timm_backbone(backbone, kwargs):
    model = Segmenter(backbone, num_classes=5, decoder_channels=32, backbone_args=kwargs).eval()
    for size in [(64, 64), (45, 70), (97, 33)]:
        with torch.no_grad():
            out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 5, *size)


def test_segmenter_refuses_images_with_the_wrong_channels():
    model = Segmenter('resnet10t', num_classes=3, decoder_channels=32)
    with pytest.raises(ValueError, match=r'expected images shaped \(batch, 3, H, W\)'):
        model(torch.randn(1, 1, 32, 32))


def test_slide_windows_give_a_per_pixel_model_its_whole_image_logits():
    torch.manual_seed(0)
    per_pixel = torch.nn.Conv2d(3, 4, 1)
    images = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        assert torch.allclose(slide_logits(per_pixel, images, (32, 32)), per_pixel(images), atol=1e-6)
        small = torch.randn(1, 3, 20, 25)  # smaller than the window: padded, cropped back
        assert torch.allclose(slide_logits(per_pixel, small, (32, 32)), per_pixel(small), atol=1e-6)
    seen = []
    fixed = lambda x: seen.append(tuple(x.shape[-2:])) or per_pixel(x)  # noqa: E731
    with torch.no_grad():
        slide_logits(fixed, images, (32, 32))
    assert set(seen) == {(32, 32)}  # a fixed-size model only ever sees its own size


def test_flip_tta_mirrors_the_logits_back():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, (1, 3), padding=(0, 1))  # not mirror-symmetric
    x = torch.randn(1, 3, 8, 10)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1)).flip(-1)) / 2
        assert torch.allclose(segment(model, x, 'flip'), expected, atol=1e-6)
    with pytest.raises(ValueError, match="tta 'none' or 'flip'"):
        segment(model, x, 'flip-shift')


# ---------------------------------------------------------------------------------------------------------
# metrics

def test_miou_and_pixel_accuracy_on_a_hand_made_case():
    metrics = SegmentationMetrics(3)
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])  # two void pixels
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    metrics.update(torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 10, labels)
    result = metrics.compute()
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert result['iou'] == pytest.approx([100 / 3, 200 / 3, 50])
    assert result['miou'] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert result['pixel_acc'] == pytest.approx(4 / 6 * 100) and result['count'] == 6


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    metrics = SegmentationMetrics(3)
    labels = torch.tensor([[[0, 1]]])
    metrics.update(torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float(), labels)
    result = metrics.compute()
    assert result['miou'] == 100 and math.isnan(result['iou'][2])


def test_class_weights_are_median_frequency_balanced():
    labels = [torch.tensor([[0] * 6 + [1] * 3 + [2] * 1 + [255] * 5], dtype=torch.uint8)]
    weights = class_weights(labels, 4, 'median-freq')  # frequencies 0.6, 0.3, 0.1; class 3 never seen
    assert weights.tolist() == pytest.approx([0.5, 1., 3., 3.])
    assert class_weights(labels, 4, 'sqrt-median-freq').tolist() == pytest.approx([0.5 ** .5, 1., 3 ** .5, 3 ** .5])
    assert class_weights(labels, 4, 'none') is None


# ---------------------------------------------------------------------------------------------------------
# training, eval, predict

def test_segmentation_trains_through_the_one_loop_and_its_folder_evaluates_and_predicts(seg_folder, tmp_path,
                                                                                         capsys):
    out = tmp_path / 'run'
    code, stdout, err = _train(capsys, seg_folder, out)
    assert code == 0, err
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(history) == 3 and history[-1]['train_loss'] < history[0]['train_loss']
    assert set(history[-1]['val_iou']) == {'red', 'green', 'blue'} and 0 <= history[-1]['val_miou'] <= 100
    assert 'val_miou' in stdout and 'done: best val mIoU' in stdout
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['task'] == 'segmentation' and config['pretrained_cfg']['label_names'] == ['red', 'green', 'blue']

    from dynamixer.model_dir import load_model_dir
    model = load_model_dir(str(out))  # one call, from the run folder
    assert isinstance(model, Segmenter) and not model.training

    code, stdout, err = _cli(capsys, 'eval', '--model-dir', str(out / 'model'), '--data', str(seg_folder), '--json')
    assert code == 0, err
    result = json.loads(stdout)
    best = max(h['val_miou'] for h in history)  # --save-model best: the folder holds the best epoch
    assert result['miou'] == pytest.approx(best, abs=1e-3)  # as the run itself measured it
    assert set(result['iou']) == {'red', 'green', 'blue'} and 0 <= result['pixel_acc'] <= 100
    assert Path(result['confusion_png']).is_file()
    code, stdout, err = _cli(capsys, 'eval', '--model-dir', str(out / 'model'), '--data', str(seg_folder), '--json',
                             '--resize', '64', '96')
    assert code == 0, err and json.loads(stdout)['sizes'] == [[64, 96]]

    image = seg_folder / 'val' / 'val000.png'
    big = tmp_path / 'big.jpg'
    Image.open(image).resize((75, 41)).save(big)
    code, stdout, err = _cli(capsys, 'predict', '--model-dir', str(out / 'model'), '--output', str(tmp_path / 'masks'),
                             '--json', str(image), str(big))
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    for record, size in zip(records, [(32, 48), (41, 75)]):
        mask = Image.open(record['mask'])
        assert mask.mode == 'L' and mask.size == size[::-1] and np.asarray(mask).max() < 3
        assert Image.open(record['overlay']).size == size[::-1]
        assert record['size'] == list(size)


class Killed(Exception):
    pass


def test_a_segmentation_run_killed_after_an_epoch_and_resumed_ends_bitwise_where_a_straight_run_ends(
        seg_folder, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    from dynamixer.train import Trainer
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert _train(capsys, seg_folder, straight, '--deterministic')[0] == 0
    save_checkpoint = Trainer.save_checkpoint

    def killed_after_the_first_epoch(self, epoch, step):
        save_checkpoint(self, epoch, step)
        if epoch == 1:
            raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, 'save_checkpoint', killed_after_the_first_epoch)
        with pytest.raises(Killed):
            _train(capsys, seg_folder, split, '--deterministic')
    code, _, err = _cli(capsys, 'train', '--output', str(split), '--resume', '--no-progress')
    assert code == 0, err
    a, b = (load_file(str(run / 'model' / 'model.safetensors')) for run in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [(run / 'metrics.jsonl').read_text().splitlines() for run in (straight, split)]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ('img_per_sec', 'epoch_time', 'wall_min')}  # noqa: E731
    assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]]


def test_a_classification_model_given_segmentation_data_and_the_reverse_say_so(seg_folder, tmp_path, capsys):
    from conftest import TINY_MODEL, make_image_folder
    images = make_image_folder(tmp_path / 'cls' / 'train')
    make_image_folder(tmp_path / 'cls' / 'val')
    assert _cli(capsys, 'train', '--data', str(images.parent), '--output', str(tmp_path / 'cls_run'), '--epochs', '1',
                '--no-progress', '--batch-size', '8', *TINY_MODEL)[0] == 0
    code, _, err = _cli(capsys, 'eval', '--model-dir', str(tmp_path / 'cls_run'), '--data', str(seg_folder))
    assert code == 2 and 'is a segmentation dataset' in err and err.count('\n') == 1
    assert _train(capsys, seg_folder, tmp_path / 'seg_run', '--epochs', '1')[0] == 0
    code, _, err = _cli(capsys, 'eval', '--model-dir', str(tmp_path / 'seg_run'), '--data', str(images.parent))
    assert code == 2 and 'is not a segmentation folder' in err and err.count('\n') == 1


def test_val_every_validates_every_nth_epoch_and_the_last(seg_folder, tmp_path, capsys):
    out = tmp_path / 'run'
    code, stdout, err = _train(capsys, seg_folder, out, '--val-every', '2')
    assert code == 0, err
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert ['val_miou' in h for h in history] == [False, True, True]  # epoch 2, and 3 as the last
    assert stdout.count('val_miou') == 2 and (out / 'curves.png').is_file()


SHIPPED = 'dynamixer_pyramid_t_fpn.camvid_1h'


def test_the_shipped_camvid_segmenter_loads_offline_and_masks_any_size(tmp_path, capsys, monkeypatch):
    from dynamixer.model_dir import load_model_dir, shipped_folders
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    folder = shipped_folders()[SHIPPED]
    assert (folder / 'model.safetensors').stat().st_size < 10 * 2 ** 20
    model = load_model_dir(SHIPPED)
    assert isinstance(model, Segmenter) and model.num_classes == 11 and model.backbone_name == 'dynamixer_pyramid_t'
    assert all(p.dtype == torch.float32 for p in model.parameters())  # shipped in fp16, loaded as fp32
    rng = np.random.default_rng(0)
    photo = tmp_path / 'street.jpg'
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    code, stdout, err = _cli(capsys, 'predict', '--model', SHIPPED, '--output', str(tmp_path / 'masks'), '--json',
                             str(photo))
    assert code == 0, err
    mask = Image.open(json.loads(stdout)['mask'])
    assert mask.size == (400, 300) and np.asarray(mask).max() < 11
    code, stdout, _ = _cli(capsys, 'list', '--no-macs')
    assert code == 0 and SHIPPED in stdout


def test_eval_of_a_shipped_model_writes_its_plot_in_the_working_directory_not_the_package(tmp_path, capsys,
                                                                                        monkeypatch):
    from dynamixer.model_dir import label_names, load_model_dir, shipped_folders
    data = make_seg_folder(tmp_path / 'camvid', train=1, val=2, size=(40, 56))
    (data / 'classes.txt').write_text('\n'.join(label_names(load_model_dir(SHIPPED))) + '\n')
    package_files = sorted(p.name for p in shipped_folders()[SHIPPED].parent.rglob('*'))
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _cli(capsys, 'eval', '--model', SHIPPED, '--data', str(data), '--json')
    assert code == 0, err
    png = Path(json.loads(stdout)['confusion_png'])
    assert png.resolve().parent == tmp_path.resolve() and png.read_bytes()[:4] == b'\x89PNG'
    assert sorted(p.name for p in shipped_folders()[SHIPPED].parent.rglob('*')) == package_files
