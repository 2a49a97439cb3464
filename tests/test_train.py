"""dynamixer train: settings, outputs, data handling, errors, resume after SIGKILL, NaN stop, DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MODEL, child_pids, make_image_folder, train_args, write_corrupt_jpeg
from dynamixer import cli
from dynamixer.data import load_splits, stratified_split
from dynamixer.train import resolve_settings

TIMING_KEYS = ('img_per_sec', 'epoch_time', 'wall_min')


def _parse(*argv: str):
    return cli._module_parser('train').parse_args(list(argv))


def _metrics(out: Path):
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def _cli(capsys, *argv: str):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _subprocess(*argv: str, env=None, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.Popen([sys.executable, '-m', 'dynamixer.cli', *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_help_documents_every_flag():
    parser = cli._module_parser('train')
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = parser.format_help()
    for flag in ('--recipe', '--config', '--init-checkpoint', '--amp', '--compile', '--grad-checkpointing',
                 '--accum-steps', '--model-ema', '--resume', '--val-split', '--deterministic', '--checkpoint-every'):
        assert flag in text


def test_flags_beat_config_beat_recipe(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump({'lr': 0.5, 'weight-decay': 0.25, 'epochs': 7}))
    cfg = resolve_settings(_parse('--recipe', 'paper', '--config', str(config), '--epochs', '3',
                                  '--model', 'dynamixer_s'))
    assert cfg.epochs == 3  # flag over config
    assert cfg.lr == 0.5 and cfg.weight_decay == 0.25  # config over recipe
    assert cfg.batch_size == 2048 and cfg.aa == 'rand-m9-mstd0.5-inc1' and cfg.model_ema  # recipe over defaults
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.reprob == 0.25 and cfg.warmup_epochs == 20
    assert resolve_settings(_parse('--recipe', 'paper', '--model', 'dynamixer_l')).batch_size == 512
    assert resolve_settings(_parse('--recipe', 'paper', '--model', 'dynamixer_l')).drop_path == 0.3
    assert resolve_settings(_parse('--recipe', 'paper', '--no-model-ema')).model_ema is False
    # a flag given with the default's value still beats the recipe
    assert resolve_settings(_parse('--recipe', 'paper', '--lr', '0.002', '--epochs', '40')).epochs == 40
    ft = resolve_settings(_parse('--recipe', 'finetune', '--init-checkpoint', 'x.safetensors'))
    assert (ft.opt, ft.lr, ft.backbone_lr_scale, ft.weight_decay, ft.batch_size, ft.epochs) == \
        ('sgd', 0.01, 0.01, 5e-4, 128, 60)
    with pytest.raises(ValueError, match='init-checkpoint'):
        resolve_settings(_parse('--recipe', 'finetune'))
    config.write_text(yaml.safe_dump({'learning_rate': 1}))
    with pytest.raises(ValueError, match='learning_rate'):
        resolve_settings(_parse('--config', str(config)))


def test_stratified_split_is_deterministic_and_stratified():
    targets = [0] * 40 + [1] * 20 + [2] * 20
    train, val = stratified_split(targets, 0.25, seed=0)
    assert (train, val) == stratified_split(targets, 0.25, seed=0)
    assert sorted(train + val) == list(range(80))
    assert [sum(targets[i] == c for i in val) for c in range(3)] == [10, 5, 5]
    digits = load_splits('digits')
    assert (len(digits.train), len(digits.val), digits.in_chans) == (1437, 360, 1)


def test_train_transform_crop_modes():
    from dynamixer.data import train_transform
    from PIL import Image
    import numpy as np
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), 'L')
    config = dict(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), interpolation='bilinear', crop_pct=1.)
    torch.manual_seed(0)
    none = [train_transform(config, 'none', hflip=0.)(image) for _ in range(5)]
    pad = [train_transform(config, 'pad', hflip=0.)(image) for _ in range(5)]
    assert all(torch.equal(t, none[0]) for t in none) and none[0].shape == (1, 8, 8)
    assert not all(torch.equal(t, pad[0]) for t in pad)  # shifted by up to a pixel
    with pytest.raises(ValueError, match='--crop'):
        train_transform(config, 'centre')


def test_digits_run_writes_everything(tmp_path, capsys):
    out = tmp_path / 'run'
    code, stdout, _ = _cli(capsys, *train_args(out, '--epochs', '2', '--batch-size', '128', '--model-ema'))
    assert code == 0
    assert 'epoch 2/2' in stdout and 'val_top1' in stdout
    settings = yaml.safe_load((out / 'args.yaml').read_text())
    assert settings['epochs'] == 2 and settings['model_ema'] is True
    records = _metrics(out)
    assert [r['epoch'] for r in records] == [1, 2]
    for r in records:
        assert {'epoch', 'train_loss', 'val_loss', 'val_top1', 'val_top5', 'lr', 'img_per_sec'} <= set(r)
        assert 0 <= r['val_top1'] <= r['val_top5'] <= 100 and r['val_images'] == 360
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    # the best model is a timm local-dir folder
    import timm
    model = timm.create_model(f'local-dir:{out / "model"}', pretrained=True).eval()
    assert model.pretrained_cfg['label_names'] == [str(i) for i in range(10)]
    assert tuple(model.pretrained_cfg['input_size']) == (1, 8, 8)
    ckpt = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['ema'] is not None and ckpt['optimizer']['state']
    assert all(group['fused'] for group in ckpt['optimizer']['param_groups'])  # AdamW in one kernel
    best = max(records, key=lambda r: r['val_top1'])
    if best['epoch'] == 2:  # the saved model is the validated one: the EMA
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt['ema'][k]), k


def test_image_folder_with_only_train_and_a_corrupt_jpeg(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=12)
    write_corrupt_jpeg(data / 'cat' / 'broken.jpg')
    out = tmp_path / 'run'
    code, stdout, err = _cli(capsys, *train_args(out.parent / 'nosplit', '--data', str(data.parent), '--epochs', '1'))
    assert code == 2 and '--val-split' in err  # no val/ and no --val-split: told what to do

    code, stdout, err = _cli(capsys, *train_args(out, '--data', str(data.parent), '--val-split', '0.25',
                                                 '--epochs', '2', '--batch-size', '8', '--workers', '1',
                                                 '--data-path', 'files'))
    assert code == 0, err  # (a worker process reads the images: the report crosses processes)
    assert err.count('warning: skipped unreadable image') == 1  # one warning, although the file is met in every epoch it is drawn
    assert 'skipped 1 unreadable image' in err
    records = _metrics(out)
    assert len(records) == 2 and all(r['val_images'] in (9, 10) for r in records)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, capsys, image_folder):
    common = ('--data', str(image_folder), '--epochs', '1', '--batch-size', '12', '--drop-path', '0',
              '--smoothing', '0', '--warmup-epochs', '0', '--deterministic')
    assert _cli(capsys, *train_args(tmp_path / 'a', *common))[0] == 0
    assert _cli(capsys, *train_args(tmp_path / 'b', *common, '--accum-steps', '2'))[0] == 0
    assert _cli(capsys, *train_args(tmp_path / 'c', *common, '--accum-steps', '2', '--lr', '0.01'))[0] == 0
    torch.use_deterministic_algorithms(False)
    a, b, c = (torch.load(tmp_path / r / 'checkpoint.pth', weights_only=True)['model'] for r in 'abc')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # and the comparison can fail


def test_amp_grad_checkpointing_and_ema_run(tmp_path, capsys, image_folder):
    out = tmp_path / 'run'
    code, _, err = _cli(capsys, *train_args(out, '--data', str(image_folder), '--epochs', '1', '--batch-size', '12',
                                            '--amp', 'bf16', '--grad-checkpointing', '--model-ema',
                                            '--mixup', '0.8', '--cutmix', '1.0', '--crop', 'rrc', '--aa',
                                            'rand-m9-mstd0.5-inc1', '--reprob', '0.25'))
    assert code == 0, err
    assert 'fp16 on CPU is slow' not in err
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert any(not torch.equal(ckpt['model'][k], ckpt['ema'][k]) for k in ckpt['model'])


def test_fp16_on_cpu_trains_and_points_to_bf16(tmp_path, capsys, image_folder):
    code, _, err = _cli(capsys, *train_args(tmp_path / 'run', '--data', str(image_folder), '--epochs', '1',
                                            '--batch-size', '12', '--amp', 'fp16'))
    assert code == 0, err
    assert 'fp16 on CPU is slow' in err and '--amp bf16' in err


def test_finetune_from_model_dir_resets_head_and_resamples(tmp_path, capsys, image_folder):
    src = tmp_path / 'src'
    assert _cli(capsys, *train_args(src, '--epochs', '1', '--batch-size', '128'))[0] == 0  # digits: 10 classes, 8px
    out = tmp_path / 'ft'
    code, _, err = _cli(capsys, 'train', '--output', str(out), '--no-progress', '--recipe', 'finetune',
                        '--init-checkpoint', str(src / 'model'), '--data', str(image_folder), '--in-chans', '1',
                        '--img-size', '16', '--epochs', '1', '--batch-size', '12')
    assert code == 0, err
    settings = yaml.safe_load((out / 'args.yaml').read_text())
    assert settings['opt'] == 'sgd' and settings['backbone_lr_scale'] == 0.01
    import timm
    model = timm.create_model(f'local-dir:{out / "model"}', pretrained=True)
    assert model.num_classes == 3 and model.img_size == (16, 16)  # new head, resampled to 16 x 16
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    lrs = sorted({g['lr'] for g in ckpt['optimizer']['param_groups']})
    assert len(lrs) == 2 and lrs[0] == pytest.approx(lrs[1] * 0.01)


@pytest.mark.parametrize('case', ['missing', 'empty', 'val_extra_class', 'other_model', 'resume_other_model'])
def test_user_errors_are_one_line(tmp_path, capsys, image_folder, case):
    out = tmp_path / 'run'
    if case == 'missing':
        argv = train_args(out, '--data', str(tmp_path / 'nope'))
        expect = 'does not exist'
    elif case == 'empty':
        (tmp_path / 'empty' / 'train' / 'cat').mkdir(parents=True)
        argv = train_args(out, '--data', str(tmp_path / 'empty'))
        expect = 'no images found'
    elif case == 'val_extra_class':
        make_image_folder(image_folder / 'val', classes=('cow',), per_class=2)
        argv = train_args(out, '--data', str(image_folder))
        expect = 'cow'
    elif case == 'other_model':
        other = tmp_path / 'other.safetensors'
        from dynamixer.convert import save_safetensors
        import dynamixer
        m = dynamixer.create_model('dynamixer_cifar_t', img_size=8, num_classes=3)
        save_safetensors(m.state_dict(), other)
        argv = train_args(out, '--data', str(image_folder), '--init-checkpoint', str(other))
        expect = 'does not fit'
    else:
        assert _cli(capsys, *train_args(out, '--data', str(image_folder), '--epochs', '1',
                                        '--batch-size', '12'))[0] == 0
        argv = ['train', '--output', str(out), '--no-progress', '--resume', '--model-kwargs', 'patch_size=1',
                'depths=(1,1,1,1)', 'embed_dims=(8,8,16,16)', 'stage_strides=(1,1,2,1)', 'num_segments=(2,2,4,4)',
                '--epochs', '2']
        expect = 'another model'
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert err.strip().count('\n') == 0 and 'Traceback' not in err, err
    assert err.startswith('dynamixer train: error:') and expect in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, image_folder, monkeypatch):
    from timm.loss import LabelSmoothingCrossEntropy
    out = tmp_path / 'run'
    real, calls = LabelSmoothingCrossEntropy.forward, []

    def nan_at_step_6(self, x, target):  # the 6th loss (optimiser step 6) is NaN
        calls.append(1)
        loss = real(self, x, target)
        return loss * float('nan') if len(calls) == 6 else loss
    monkeypatch.setattr(LabelSmoothingCrossEntropy, 'forward', nan_at_step_6)
    code, _, err = _cli(capsys, *train_args(out, '--data', str(image_folder), '--epochs', '3',
                                            '--batch-size', '12', '--checkpoint-every', '1'))
    assert code == 2
    assert 'optimiser step 6' in err and 'nan' in err and 'Traceback' not in err
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['global_step'] == 5  # the last good state
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_sigkill_and_resume_gives_the_same_bits(tmp_path, image_folder):
    """A run killed mid-epoch and resumed ends bitwise where an uninterrupted run ends (weights and metrics)."""
    common = ['--data', str(image_folder), '--epochs', '3', '--batch-size', '8', '--deterministic',
              '--checkpoint-every', '2', '--model-ema', '--mixup', '0.4', '--workers', '0']
    straight = _subprocess(*train_args(tmp_path / 'straight', *common))
    killed_out = tmp_path / 'killed'
    killed = _subprocess(*train_args(killed_out, *common))
    deadline = time.time() + 120
    while not (killed_out / 'checkpoint.pth').exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, 'the run ended before it could be killed'
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    first = torch.load(killed_out / 'checkpoint.pth', weights_only=True)
    assert (first['epoch'], first['step_in_epoch']) == (0, 2)  # killed mid-epoch, after the first checkpoint
    resumed = _subprocess('train', '--output', str(killed_out), '--resume', '--no-progress')
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    b = torch.load(killed_out / 'checkpoint.pth', weights_only=True)
    for part in ('model', 'ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    assert strip(_metrics(tmp_path / 'straight')) == strip(_metrics(killed_out))
    assert len(_metrics(killed_out)) == 3


def test_torchrun_two_processes_keep_identical_weights(tmp_path, image_folder):
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531',
           '-m', 'dynamixer.cli', *train_args(out, '--data', str(image_folder), '--epochs', '2',
                                              '--batch-size', '8', '--workers', '0', '--tta', 'flip')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dynamixer.train import weights_hash
    import dynamixer
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    model = dynamixer.create_model('dynamixer_cifar_t', img_size=32, num_classes=3, patch_size=1, depths=(1, 1, 1, 1),
                                   embed_dims=(16, 16, 32, 32), stage_strides=(1, 1, 2, 1), num_segments=(2, 2, 4, 4))
    model.load_state_dict(ckpt['model'])
    # the ranks compared their weights, and rank 0 saved what both hold
    assert f'all 2 processes hold the same weights (sha256 {weights_hash(model)[:12]})' in proc.stdout
    records = _metrics(out)
    assert all(r['val_images'] == 12 for r in records)  # validation reduced over both ranks, no duplicates
    # the last epoch's flip-TTA figure (reduced by the same code as the plain one), and only the last epoch's
    assert 'val_top1_tta' not in records[0] and 0 <= records[-1]['val_top1_tta'] <= 100
    assert proc.stdout.count('with flip TTA') == 1
    assert '2 process(es)' in proc.stdout and proc.stdout.count('epoch 2/2 ') == 1  # rank 1 stays quiet
    settings = yaml.safe_load((out / 'args.yaml').read_text())
    assert settings['batch_size'] == 8
    assert ckpt['global_step'] == 2 * (36 // 2 // 4)  # 4 images per rank per step


def _torchrun(port: int, *argv: str) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           '-m', 'dynamixer.cli', *argv]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_torchrun_killed_and_resumed_gives_the_same_bits(tmp_path, image_folder):
    """Two processes killed mid-epoch and resumed end bitwise where an uninterrupted 2-process run ends: every
    rank's RNG (drop path draws from it) and running loss are in the checkpoint."""
    common = ['--data', str(image_folder), '--epochs', '2', '--batch-size', '8', '--deterministic',
              '--checkpoint-every', '2', '--drop-path', '0.2']
    straight = _torchrun(29541, *train_args(tmp_path / 'straight', *common))
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]
    killed_out = tmp_path / 'killed'
    killed = _torchrun(29542, *train_args(killed_out, *common))
    deadline = time.time() + 180
    while not (killed_out / 'checkpoint.pth').exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in child_pids(killed.pid) + [killed.pid]:  # both ranks, then torchrun
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    first = torch.load(killed_out / 'checkpoint.pth', weights_only=True)
    assert first['epoch'] < 2 and len(first['ranks']) == 2
    resumed = _torchrun(29543, 'train', '--output', str(killed_out), '--resume', '--no-progress')
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    b = torch.load(killed_out / 'checkpoint.pth', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    assert strip(_metrics(tmp_path / 'straight')) == strip(_metrics(killed_out))


def test_torchrun_with_a_rank_whose_batch_is_all_unreadable_does_not_hang(tmp_path):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=6)
    for i in range(12):  # as many broken files as images: with one image per rank and step, some rank's batch
        write_corrupt_jpeg(data / ('cat', 'dog', 'fox')[i % 3] / f'broken{i}.jpg')  # is all broken, the other's not
    proc = _torchrun(29544, *train_args(tmp_path / 'run', '--data', str(tmp_path / 'data'), '--val-split', '0.2',
                                        '--data-path', 'files', '--epochs', '2', '--batch-size', '2'))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert 'all 2 processes hold the same weights' in out and 'broken' in err


def test_progress_bar_shows_rate_loss_and_eta(tmp_path, capsys, image_folder):
    code, out, err = _cli(capsys, 'train', '--output', str(tmp_path / 'run'), '--workers', '0', '--progress', *TINY_MODEL,
                          '--data', str(image_folder), '--epochs', '1', '--batch-size', '12')
    assert code == 0
    assert 'epoch 1/1' in err and 'loss=' in err and ('step/s' in err or 's/step' in err) and '<' in err  # ETA
    assert err.count('train_loss') == 0 and out.count('train_loss') == 1  # the summary line goes to stdout


def test_cifar_without_network_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import urllib.error
    from torchvision import datasets

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError('no route to host')
    monkeypatch.setattr(datasets.CIFAR10, 'download', offline)
    code, _, err = _cli(capsys, *train_args(tmp_path / 'run', '--data', 'cifar10', '--data-dir', str(tmp_path)))
    assert code == 2 and 'could not download cifar10' in err and 'no route to host' in err
    assert err.strip().count('\n') == 0 and 'Traceback' not in err


@pytest.mark.slow  # torch.compile on CPU builds C++ kernels: over a minute here
def test_compile_trains_and_saves_plain_weights(tmp_path, capsys):
    out = tmp_path / 'run'
    code, _, err = _cli(capsys, *train_args(out, '--epochs', '1', '--batch-size', '128', '--compile'))
    assert code == 0, err
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    import timm
    timm.create_model(f'local-dir:{out / "model"}', pretrained=True)


def test_compile_compiles_through_compile_model(tmp_path, capsys, image_folder, monkeypatch):
    """--compile takes the model's compile options (dynamixer.models.compile_model), not a bare torch.compile."""
    import dynamixer.models
    compiled = []
    monkeypatch.setattr(dynamixer.models, 'compile_model', lambda model, **kw: compiled.append(type(model)) or model)
    code, _, err = _cli(capsys, *train_args(tmp_path / 'run', '--data', str(image_folder), '--epochs', '1',
                                            '--batch-size', '12', '--compile'))
    assert code == 0, err
    assert compiled == [dynamixer.models.DynaMixer]


def test_a_finished_run_is_never_overwritten(tmp_path, capsys, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ['train', '--data', str(image_folder), '--no-progress', '--workers', '0', *TINY_MODEL, '--epochs', '1',
            '--batch-size', '12']
    for _ in range(2):  # the default output is named after the data, numbered past an earlier run
        assert _cli(capsys, *tiny)[0] == 0
    first, second = tmp_path / 'runs' / 'data', tmp_path / 'runs' / 'data-2'
    assert (first / 'model').is_dir() and (second / 'model').is_dir()
    assert yaml.safe_load((second / 'args.yaml').read_text())['output'] == str(Path('runs') / 'data-2')

    (first / 'confusion.png').write_bytes(b'from eval')  # what eval may have left beside the run
    before = (first / 'metrics.jsonl').read_text()
    code, _, err = _cli(capsys, *tiny, '--output', str(first), '--seed', '5')
    assert code == 2 and err.count('\n') == 1 and 'holds an earlier run' in err and '--overwrite' in err
    assert (first / 'metrics.jsonl').read_text() == before

    assert _cli(capsys, *tiny, '--output', str(first), '--seed', '5', '--overwrite')[0] == 0
    assert not (first / 'confusion.png').exists()
    assert yaml.safe_load((first / 'args.yaml').read_text())['seed'] == 5
    assert 'overwrite' not in yaml.safe_load((first / 'args.yaml').read_text())


def test_resume_without_a_run_says_what_to_do(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    code, _, err = _cli(capsys, 'train', '--resume', '--output', str(tmp_path / 'empty'))
    assert code == 2 and 'holds no run to continue' in err and 'without --resume' in err
    code, _, err = _cli(capsys, 'train', '--resume')
    assert code == 2 and '--resume continues the run in --output' in err


def test_curves_of_a_one_epoch_run_are_not_empty(tmp_path):
    import numpy as np
    from PIL import Image
    from dynamixer.train import plot_curves
    record = dict(epoch=1, train_loss=1.5, val_loss=1.2, val_top1=60., val_top5=95.)

    def blue_pixels(history):  # matplotlib's first colour, C0 (#1f77b4): the train-loss and top-1 curves
        plot_curves(history, tmp_path / 'c.png')
        rgb = np.asarray(Image.open(tmp_path / 'c.png').convert('RGB')).astype(int)
        return int((np.abs(rgb - [31, 119, 180]).sum(-1) < 40).sum())
    assert blue_pixels([record]) > blue_pixels([]) + 50
