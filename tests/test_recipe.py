"""The one-hour CIFAR recipe: its settings, the time budget, and the weights that ship with the package."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import dynamixer  # noqa: F401  registers the variants
from conftest import TINY_MODEL, make_image_folder
from dynamixer import cli
from dynamixer.models.dynamixer import CIFAR10_CLASSES
from dynamixer.train import plan_epochs, replan_budget, resolve_settings

SHIPPED = 'dynamixer_cifar_xs.cifar10_1h'


def test_cifar_recipe_settings_and_flags_win():
    parser = cli._module_parser('train')
    cfg = resolve_settings(parser.parse_args(['--recipe', 'cifar']))
    assert (cfg.model, cfg.time_budget, cfg.compile, cfg.amp, cfg.data_path) == (
        'dynamixer_cifar_xs', 60., True, 'auto', 'tensor')
    cfg = resolve_settings(parser.parse_args(['--recipe', 'cifar', '--time-budget', '5', '--amp', 'none']))
    assert (cfg.time_budget, cfg.amp) == (5., 'none')


def test_plan_epochs_fits_the_budget():
    # 10 steps an epoch of 1 s, 2 validation batches, 5 steps done after 10 s of a 100 s budget
    # 1 + floor((0.98 * (100 - 10 - 7 - 1) - 13 / 2) / 13): half an epoch to spare
    assert plan_epochs(100, 10, 1., 10, 5, 2, 1000) == 6
    assert plan_epochs(100, 10, 1., 10, 5, 2, 4) == 4  # --epochs caps it
    assert plan_epochs(10, 9, 1., 10, 5, 2, 1000) == 1  # never less than the epoch under way
    more = [plan_epochs(b, 10, 1., 10, 5, 2, 1000) for b in (100, 200, 400)]
    assert more == sorted(more) and more[0] < more[-1]


def test_replan_follows_the_machine_and_grows_one_epoch_at_a_time_in_the_second_half(monkeypatch):
    """A 100 s budget planned at epoch 1 (t = 10 s), re-planned after every whole epoch."""
    from types import SimpleNamespace
    import dynamixer.train as train_module
    clock = SimpleNamespace(now=0.)
    monkeypatch.setattr(train_module.time, 'time', lambda: clock.now)
    cfg = SimpleNamespace(time_budget=100 / 60, resume=False, epochs=20, tta='none')
    budget = SimpleNamespace(planned_at=(1, 10.), cap=1000, epoch_ends=[10.], val_s=0.)
    logged = []

    def after_epoch(epoch: int, now: float) -> int:
        clock.now = now
        replan_budget(cfg, SimpleNamespace(epoch=epoch, planned=True), budget, 0., lambda n: setattr(cfg, 'epochs', n),
                      logged.append)
        return cfg.epochs

    # first half, 4 s an epoch: the mean epoch since the plan sets the end (86 s left fit 20 more and a half)
    assert after_epoch(2, 14.) == 2 + int((0.98 * 86 - 2) // 4) == 22
    assert all(after_epoch(e, 10. + 4 * (e - 1)) == 22 for e in range(3, 13))  # steady: no change
    # second half, the machine now 2 s an epoch: the last 3 epochs' mean says more fit; one epoch more each time
    assert [after_epoch(e, t) for e, t in ((13, 56.), (14, 58.), (15, 60.))] == [23, 24, 25]
    # a slow spell (a 10 s epoch): shorter at once, as far as the recent speed needs
    assert after_epoch(16, 70.) == 16 + int((0.98 * 30 - 14 / 6) // (14 / 3)) == 21
    # the last epoch's flip TTA costs about two validations more (two views): kept out of the time left
    cfg.tta, budget.val_s = 'flip', 5.
    assert after_epoch(17, 75.) == 17 + int((0.98 * (100 - 75 - 2 * 5) - 17 / 6) // (17 / 3)) == 19
    assert len(logged) == 6 and all('time budget' in line for line in logged)
    # the epoch before the last ran long: less than half an epoch to spare now, but the last one still fits, so
    # the schedule keeps it and ends with its cosine (6.7 s an epoch, 10 s left); when it no longer fits, it ends
    before = (list(budget.epoch_ends), list(logged))
    assert after_epoch(18, 80.) == 19 and logged == before[1]
    budget.epoch_ends = before[0]
    assert after_epoch(18, 84.) == 18 and 'ends after epoch 18 (was 19)' in logged[-1]


def test_short_time_budget_ends_on_time_with_a_finished_schedule(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=16, size=8)
    out = tmp_path / 'run'
    budget_min = 0.25
    t0 = time.time()
    code = cli.main(['train', '--data', str(data.parent), '--val-split', '0.25', '--output', str(out),
                     '--no-progress', *TINY_MODEL, '--img-size', '8', '--batch-size', '4', '--time-budget', str(budget_min),
                     '--epochs', '1000', '--warmup-epochs', '1', '--lr', '2e-3', '--min-lr', '1e-5', '--tta', 'flip-shift'])
    elapsed = time.time() - t0
    err = capsys.readouterr()
    assert code == 0, err.err
    assert 'time budget 0.25 min' in err.out
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    planned = yaml.safe_load((out / 'args.yaml').read_text())['epochs']
    assert len(history) == planned >= 2  # the plan is saved (for --resume) and was carried out
    # on time by the run's own clock: on a loaded machine a 15-second budget can overrun by a step or two
    # (measured: 16.4 s with two other 2-thread processes on 2 cores), so 20% slack; an ignored budget would
    # run --epochs 1000
    assert history[-1]['wall_min'] <= budget_min * 1.2
    assert elapsed <= budget_min * 60 * 1.2 + 5, elapsed  # and by the caller's clock
    assert elapsed >= budget_min * 60 * 0.25, elapsed  # and the budget was used, not wasted
    assert history[-1]['lr'] < 0.05 * 2e-3  # the cosine ran to its end
    # the flip TTA measurement comes after the last epoch only, inside the budget (wall_min above includes it)
    assert 'val_top1_tta' in history[-1] and not any('val_top1_tta' in h for h in history[:-1])
    assert 0 <= history[-1]['val_top1_tta'] <= 100 and 'with flip-shift TTA' in err.out


def test_shipped_weights_load_offline_and_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = timm.create_model(SHIPPED, pretrained=True).eval()
    weights_file = Path(model.pretrained_cfg['file'])
    assert weights_file.is_file() and weights_file.stat().st_size <= 10 * 2 ** 20
    stored = load_file(weights_file)
    for name, tensor in model.state_dict().items():
        if name in stored:
            assert torch.equal(tensor, stored[name].to(tensor.dtype)), name
    assert set(stored) <= set(model.state_dict()) and len(stored) > 50
    assert tuple(model.pretrained_cfg['label_names']) == CIFAR10_CLASSES
    untagged = timm.create_model('dynamixer_cifar_xs', pretrained=True)  # timm: the tag with weights is the default
    assert torch.equal(untagged.head.weight, model.head.weight)
    fresh = timm.create_model(SHIPPED, pretrained=False)
    assert not torch.equal(fresh.head.weight, model.head.weight)

    # a plain image through the CLI: ten classes, probabilities that sum to one
    image = tmp_path / 'sky.png'
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[..., 2], pixels[24:, :, 1] = 220, 120
    Image.fromarray(pixels).save(image)
    assert cli.main(['predict', '--model', SHIPPED, '--topk', '10', '--json', str(image)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(t['label'] for t in result['top']) == sorted(CIFAR10_CLASSES)
    assert abs(sum(t['prob'] for t in result['top']) - 1) < 1e-4


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / 'nothing.safetensors'
    with pytest.raises(FileNotFoundError, match='does not exist'):
        timm.create_model(SHIPPED, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    garbage = tmp_path / 'garbage.safetensors'
    garbage.write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='garbage.safetensors'):
        timm.create_model(SHIPPED, pretrained=True, pretrained_cfg_overlay=dict(file=str(garbage)))
    other = tmp_path / 'other.safetensors'
    save_file(timm.create_model('dynamixer_cifar_t').state_dict(), other)
    with pytest.raises(ValueError) as info:
        timm.create_model(SHIPPED, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))
    assert '\n' not in str(info.value)
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('dynamixer_cifar_t', pretrained=True)
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('dynamixer_cifar_xs.untrained', pretrained=True)


def test_a_schedule_the_budget_cuts_still_gets_its_last_epoch_tta(tmp_path, monkeypatch, capsys):
    """When a slow epoch makes the planner end the schedule at the epoch just validated, that epoch is the run's
    last: it gets the TTA measurement all the same (logged, in metrics.jsonl and in the checkpoint, so that a
    --resume of the finished run keeps it instead of measuring again)."""
    import dynamixer.train as train_module

    def cut_after_first(cfg, state, budget, t_start, set_epochs, log):
        if state.epoch == 1:
            set_epochs(1)
    monkeypatch.setattr(train_module, 'replan_budget', cut_after_first)
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=8, size=8)
    out = tmp_path / 'run'
    code = cli.main(['train', '--data', str(data.parent), '--val-split', '0.25', '--output', str(out), '--no-progress',
                     *TINY_MODEL, '--img-size', '8', '--batch-size', '4', '--epochs', '3', '--tta', 'flip'])
    assert code == 0
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(history) == 1 and 0 <= history[0]['val_top1_tta'] <= 100 and history[0]['tta'] == 'flip'
    assert 'epoch 1  val_top1 with flip TTA' in capsys.readouterr().out
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert saved['history'][-1]['val_top1_tta'] == history[0]['val_top1_tta'] and saved['epoch'] == 1
    assert cli.main(['train', '--output', str(out), '--resume', '--no-progress']) == 0  # finished: nothing to redo
    assert 'TTA' not in capsys.readouterr().out
