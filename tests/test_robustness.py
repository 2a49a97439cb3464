"""Bad inputs and faults, each tried for real: the exact message it gets and what survives it.

Every case asserts its own behaviour, and together they produce the table in docs/robustness.md:
``test_the_docs_table_is_the_one_these_cases_produce`` fails when the doc and the cases disagree
(``UPDATE_DOCS=1 pytest tests/test_robustness.py`` rewrites the table from the cases).
"""
import errno
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (SEG_COLOURS, TINY_MODEL, TINY_PYRAMID, child_pids, make_image_folder, make_seg_folder,
                      train_args, write_corrupt_jpeg)
from dynamixer import cli

DOC = Path(__file__).resolve().parent.parent / 'docs' / 'robustness.md'
BEGIN, END = '<!-- table: made by tests/test_robustness.py -->', '<!-- end of table -->'
TINY_RUN = ('--epochs', '1', '--batch-size', '12')


@dataclass
class Row:
    what: str  # the bad input or the fault
    command: str  # what the user ran (DIR: a folder of theirs)
    message: str  # exactly what they were told
    survives: str  # what is left, and how to go on


class Context:
    """A case's workspace: a folder of its own, and finished tiny runs (a folder's, digits', segmentation) to copy."""

    def __init__(self, tmp: Path, templates: Dict[str, Path], capsys, monkeypatch):
        self.tmp, self.templates, self.capsys, self.monkeypatch = tmp, templates, capsys, monkeypatch

    def copy(self, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(self.templates[name], target)
        return target

    def cli(self, argv: List[str]):
        """Runs ``dynamixer ARGV``: (exit code, stdout, stderr), argparse's exits included."""
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def error(self, argv: List[str], *expected: str) -> str:
        """The one-line error of a failing command, with the case's folder shown as DIR."""
        code, _, err = self.cli(argv)
        assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
        for part in expected:
            assert part in err, (part, err)
        return self.shown(err.strip())

    def shown(self, text: str) -> str:
        return text.replace(str(self.tmp), 'DIR')


def _epoch(run: Path) -> int:
    return torch.load(run / 'checkpoint.pth', weights_only=True)['epoch']


CASES: Dict[str, Callable[[Context], Row]] = {}


def case(function: Callable[[Context], Row]) -> Callable[[Context], Row]:
    CASES[function.__name__] = function
    return function


# ------------------------------------------------------------------------------------------- bad numbers

BAD_NUMBERS = [
    ('a negative epoch count', ['--epochs', '-1']),
    ('a zero batch size', ['--batch-size', '0']),
    ('a learning rate that is not a number', ['--lr', 'nan']),
    ('a hold-out fraction above 1', ['--val-split', '1.5']),
    ('a seed that is not an integer', ['--seed', 'x']),
]
for _what, _flags in BAD_NUMBERS:
    def _bad_number(ctx: Context, what=_what, flags=_flags) -> Row:
        message = ctx.error(['train', *flags], f'argument {flags[0]}: expected', repr(flags[1]))
        assert not Path('runs').exists() or not any(Path('runs').iterdir())
        return Row(what, f'dynamixer train {" ".join(flags)}', message, 'nothing was started')
    _bad_number.__name__ = 'bad_number_' + _flags[0].strip('-').replace('-', '_')
    case(_bad_number)


@case
def bad_number_in_config(ctx: Context) -> Row:
    config = ctx.tmp / 'settings.yaml'
    config.write_text('epochs: 0\n')
    message = ctx.error(['train', '--config', config], 'epochs: 0 in', 'expected an integer >= 1')
    return Row('a bad number in a --config file', 'dynamixer train --config DIR/settings.yaml', message,
               'nothing was started')


@case
def unknown_setting_in_config(ctx: Context) -> Row:
    config = ctx.tmp / 'settings.yaml'
    config.write_text('learning_rate: 0.1\n')
    message = ctx.error(['train', '--config', config], 'unknown setting(s) learning_rate')
    return Row('an unknown key in a --config file', 'dynamixer train --config DIR/settings.yaml', message,
               'nothing was started')


@case
def bench_zero_iterations(ctx: Context) -> Row:
    message = ctx.error(['bench', '--iters', '0'], 'expected an integer >= 1')
    return Row('zero timed iterations', 'dynamixer bench --iters 0', message, 'nothing was started')


# --------------------------------------------------------------------------------------- runs and folders

@case
def output_holds_a_finished_run(ctx: Context) -> Row:
    run = ctx.copy('run')
    before = (run / 'metrics.jsonl').read_text()
    message = ctx.error(train_args(run, '--data', ctx.templates['data'], *TINY_RUN), 'holds an earlier run')
    assert (run / 'metrics.jsonl').read_text() == before and _epoch(run) == 1
    return Row('--output names a finished run', 'dynamixer train --output DIR/run', message,
               'the earlier run, untouched')


@case
def resume_an_empty_folder(ctx: Context) -> Row:
    (ctx.tmp / 'empty').mkdir()
    message = ctx.error(['train', '--resume', '--output', ctx.tmp / 'empty'], 'holds no run to continue')
    return Row('--resume where there is no run', 'dynamixer train --resume --output DIR/empty', message,
               'nothing was started')


@case
def resume_without_output(ctx: Context) -> Row:
    message = ctx.error(['train', '--resume'], '--resume continues the run in --output')
    return Row('--resume without --output', 'dynamixer train --resume', message, 'nothing was started')


@case
def data_folder_missing(ctx: Context) -> Row:
    message = ctx.error(train_args(ctx.tmp / 'run', '--data', ctx.tmp / 'nope'), 'does not exist')
    return Row('a --data folder that does not exist', 'dynamixer train --data DIR/nope', message,
               'nothing was written')


@case
def data_folder_empty(ctx: Context) -> Row:
    (ctx.tmp / 'empty' / 'train' / 'cat').mkdir(parents=True)
    message = ctx.error(train_args(ctx.tmp / 'run', '--data', ctx.tmp / 'empty'), 'no images found')
    return Row('a --data folder without images', 'dynamixer train --data DIR/empty', message, 'nothing was written')


@case
def unknown_model(ctx: Context) -> Row:
    message = ctx.error(['train', '--model', 'dynamixer_xl', '--output', ctx.tmp / 'run'], 'dynamixer_xl')
    return Row('a model name that does not exist', 'dynamixer train --model dynamixer_xl', message,
               'nothing was written')


@case
def batch_larger_than_the_data(ctx: Context) -> Row:
    message = ctx.error(train_args(ctx.tmp / 'run', '--data', ctx.templates['data'], '--batch-size', '1000'),
                        'fewer than one batch')
    return Row('a batch larger than the training set', 'dynamixer train --data DIR/data --batch-size 1000',
               message, 'nothing was trained')


@case
def finetune_without_weights(ctx: Context) -> Row:
    message = ctx.error(['train', '--recipe', 'finetune', '--output', ctx.tmp / 'run'], '--init-checkpoint')
    return Row('--recipe finetune without weights to start from', 'dynamixer train --recipe finetune', message,
               'nothing was started')


@case
def corrupt_jpeg_in_the_data(ctx: Context) -> Row:
    data = ctx.tmp / 'data'
    make_image_folder(data / 'train', per_class=12)
    write_corrupt_jpeg(data / 'train' / 'cat' / 'broken.jpg')
    code, _, err = ctx.cli(train_args(ctx.tmp / 'run', '--data', data, '--val-split', '0.25', '--data-path', 'files',
                                      *TINY_RUN))
    assert code == 0 and (ctx.tmp / 'run' / 'model').is_dir()
    warning = next(line for line in err.splitlines() if 'broken.jpg' in line)
    return Row('an unreadable JPEG among the training images', 'dynamixer train --data DIR/data --val-split 0.25',
               ctx.shown(warning), 'the run, without that image (reported again at the end)')


# ------------------------------------------------------------------------------------------------ faults

@case
def disk_full_during_checkpoint(ctx: Context) -> Row:
    run = ctx.copy('run')
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if '.checkpoint.pth.' in str(f):
            Path(f).write_bytes(b'PK\x03\x04 half a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)
    ctx.monkeypatch.setattr(torch, 'save', save_until_full)
    message = ctx.error(['train', '--output', run, '--resume', '--epochs', '2', '--no-progress'],
                        'no space left on the device', 'the previous checkpoint.pth is intact', '--resume')
    ctx.monkeypatch.setattr(torch, 'save', real_save)
    assert _epoch(run) == 1 and not list(run.glob('.checkpoint.pth.*'))
    assert ctx.cli(['train', '--output', run, '--resume', '--epochs', '2', '--no-progress'])[0] == 0
    assert _epoch(run) == 2
    return Row('the disk fills up while a checkpoint is written', 'dynamixer train --output DIR/run --resume '
               '--epochs 2', message, 'the previous checkpoint, whole; --resume continues from it')


@case
def sigkill_during_checkpoint(ctx: Context) -> Row:
    run = ctx.copy('run')
    script = ('import os, signal, sys, torch\n'
              'from pathlib import Path\n'
              'real = torch.save\n'
              'def save(obj, f, *a, **k):\n'
              '    if ".checkpoint.pth." in str(f):\n'
              '        Path(f).write_bytes(b"PK half")\n'
              '        os.kill(os.getpid(), signal.SIGKILL)\n'
              '    return real(obj, f, *a, **k)\n'
              'torch.save = save\n'
              'from dynamixer import cli\n'
              'sys.exit(cli.main(sys.argv[1:]))\n')
    killed = subprocess.run([sys.executable, '-c', script, 'train', '--output', str(run), '--resume', '--epochs',
                             '2', '--no-progress'], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert killed.returncode == -9, killed.stderr
    assert _epoch(run) == 1 and list(run.glob('.checkpoint.pth.*'))  # the whole old one, and the killed half
    assert ctx.cli(['train', '--output', run, '--resume', '--epochs', '2', '--no-progress'])[0] == 0
    assert _epoch(run) == 2 and not list(run.glob('.checkpoint.pth.*'))
    return Row('SIGKILL while a checkpoint is written', 'kill -9 during dynamixer train', '(none: the process '
               'is gone)', 'the previous checkpoint, whole; --resume continues and clears the half-written file')


def _rank_of(pid: int) -> Optional[int]:
    try:
        env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b'RANK=')), None)


@case
def ddp_rank_killed(ctx: Context) -> Row:
    out = ctx.tmp / 'ddp'
    argv = train_args(out, '--data', ctx.templates['data'], '--epochs', '40', '--batch-size', '8',
                      '--checkpoint-every', '2')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29561',
                '-m', 'dynamixer.cli']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([*torchrun, *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not (out / 'checkpoint.pth').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    rank1 = [pid for pid in child_pids(proc.pid) if _rank_of(pid) == 1]
    assert proc.poll() is None and len(rank1) == 1, f'the run ended before a rank could be killed: ' \
                                                    f'{proc.communicate()[1][-3000:] if proc.poll() is not None else rank1}'
    os.kill(rank1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # the surviving rank is stopped, not left waiting
    assert proc.returncode != 0 and 'Signal 9 (SIGKILL)' in err
    lines = [line.strip() for line in err.splitlines()]
    said = [next(line for line in lines if line.endswith('FAILED')),
            next(line for line in lines if line.startswith('traceback') and 'Signal 9' in line)]
    resumed = subprocess.run([*torchrun, 'train', '--output', str(out), '--resume', '--no-progress'], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[:4000] + '\n...\n' + resumed.stderr[-1500:]  # the rank's own error first
    assert _epoch(out) == 40
    message = 'torchrun: ' + ' ... '.join(said)
    return Row('a DDP rank killed mid-epoch (SIGKILL to rank 1 of 2)', 'torchrun --nproc_per_node 2 -m dynamixer.cli '
               'train ...', re.sub(r'PID \d+', 'PID N', message),
               'the other rank is stopped by torchrun; the last checkpoint, from which --resume continues')


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if how == 'truncated' else b'hello, I am not a checkpoint\n')


for _how in ('truncated', 'text'):
    def _damaged_resume(ctx: Context, how=_how) -> Row:
        run = ctx.copy('run')
        _damage(run / 'checkpoint.pth', how)
        message = ctx.error(['train', '--output', run, '--resume', '--epochs', '2'],
                            'as a training checkpoint', 'without --resume')
        return Row(f'a {"truncated" if how == "truncated" else "text file as"} checkpoint.pth given to --resume',
                   'dynamixer train --output DIR/run --resume', message, 'the run folder as it was')
    _damaged_resume.__name__ = f'{_how}_checkpoint_resume'
    case(_damaged_resume)

for _suffix in ('.pth', '.safetensors'):
    def _damaged_init(ctx: Context, suffix=_suffix) -> Row:
        run = ctx.copy('run')
        source = run / 'model' / 'model.safetensors' if suffix == '.safetensors' else run / 'checkpoint.pth'
        damaged = ctx.tmp / f'weights{suffix}'
        damaged.write_bytes(source.read_bytes()[:1000])
        message = ctx.error(train_args(ctx.tmp / 'new', '--data', ctx.templates['data'], '--init-checkpoint',
                                       damaged, *TINY_RUN), 'could not read', 'damaged')
        assert not (ctx.tmp / 'new' / 'checkpoint.pth').exists()
        return Row(f'a truncated {suffix} given to --init-checkpoint',
                   f'dynamixer train --init-checkpoint DIR/weights{suffix}', message, 'nothing was trained')
    _damaged_init.__name__ = f'truncated_init_checkpoint_{_suffix.strip(".")}'
    case(_damaged_init)


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


for _where in ('resume', 'init_checkpoint'):
    def _hostile(ctx: Context, where=_where) -> Row:
        run = ctx.copy('run')
        marker = ctx.tmp / 'code_ran'
        state = torch.load(run / 'checkpoint.pth', weights_only=True)
        state['payload'] = RunsCode(marker)
        hostile = run / 'checkpoint.pth' if where == 'resume' else ctx.tmp / 'hostile.pth'
        torch.save(state, hostile)
        argv = (['train', '--output', run, '--resume', '--epochs', '2'] if where == 'resume' else
                train_args(ctx.tmp / 'new', '--data', ctx.templates['data'], '--init-checkpoint', hostile, *TINY_RUN))
        message = ctx.error(argv, 'refused to load', 'could run code')
        assert not marker.exists()
        command = ('dynamixer train --output DIR/run --resume' if where == 'resume' else
                   'dynamixer train --init-checkpoint DIR/hostile.pth')
        return Row(f'a pickle that would run code, given to --{where.replace("_", "-")}', command, message,
                   'nothing ran: only tensors are ever unpickled')
    _hostile.__name__ = f'hostile_pickle_{_where}'
    case(_hostile)


# ------------------------------------------------------------------------------------------ other commands

@case
def predict_a_missing_image(ctx: Context) -> Row:
    message = ctx.error(['predict', '--model-dir', ctx.templates['digits'], ctx.tmp / 'missing.png'], 'does not exist')
    return Row('an image that does not exist', 'dynamixer predict --model-dir runs/digits DIR/missing.png',
               message.replace(str(ctx.templates['digits']), 'runs/digits'), 'nothing')


@case
def predict_not_an_image(ctx: Context) -> Row:
    notes = ctx.tmp / 'notes.png'
    notes.write_text('not an image')
    message = ctx.error(['predict', '--model-dir', ctx.templates['digits'], notes], 'could not read')
    return Row('a file that is not an image', 'dynamixer predict --model-dir runs/digits DIR/notes.png', message,
               'the images before it were classified')


@case
def predict_a_photo_with_the_digits_model(ctx: Context) -> Row:
    photo = ctx.tmp / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(photo)
    code, out, err = ctx.cli(['predict', '--model-dir', ctx.templates['digits'], photo])
    assert code == 0 and '%' in out and err.startswith('warning:')
    return Row('a 300x200 colour photo for the 8x8 grayscale digits model',
               'dynamixer predict --model-dir runs/digits DIR/photo.png', ctx.shown(err.strip()),
               'the answer, with that warning')


@case
def model_folder_without_weights(ctx: Context) -> Row:
    folder = ctx.tmp / 'model'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    message = ctx.error(['eval', '--model-dir', folder], 'has no weights')
    return Row('a model folder without weights', 'dynamixer eval --model-dir DIR/model', message, 'nothing')


@case
def onnx_not_installed(ctx: Context) -> Row:
    import importlib.util
    real = importlib.util.find_spec
    ctx.monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnx' else real(name, *a))
    message = ctx.error(['export', '--model-dir', ctx.templates['digits'], ctx.tmp / 'm.onnx'],
                        'pip install "dynamixer[export]"')
    assert not (ctx.tmp / 'm.onnx').exists()
    return Row('ONNX export without the onnx package', 'dynamixer export --model-dir runs/digits m.onnx', message,
               'nothing was written')


@case
def visualize_a_block_that_does_not_exist(ctx: Context) -> Row:
    digit = ctx.tmp / 'digit.png'
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(digit)
    message = ctx.error(['visualize', '--model-dir', ctx.templates['digits'], digit, '--block', '9.0'],
                        'stage 9 does not exist')
    return Row('a block the model does not have', 'dynamixer visualize --model-dir runs/digits d.png --block 9.0',
               message, 'nothing was written')


@case
def list_an_unknown_pattern(ctx: Context) -> Row:
    message = ctx.error(['list', 'resnet*', '--no-macs'], "no registered model matches 'resnet*'")
    return Row('a model pattern that matches nothing', "dynamixer list 'resnet*'", message, 'nothing')


@case
def unknown_command(ctx: Context) -> Row:
    code, _, err = ctx.cli(['trian'])
    assert code == 2
    return Row('a misspelt command', 'dynamixer trian', err.splitlines()[0], 'nothing (the command list follows)')


# ------------------------------------------------------------------------------------------ segmentation data

# A segmentation run small enough to finish in seconds (the flags of tests/test_segmentation.py, one epoch).
SEG_TINY = ('--no-progress', '--epochs', '1', '--batch-size', '4', '--crop-size', '32', '32', '--scale', '0.75',
            '1.25', '--warmup-epochs', '0', '--decoder-channels', '32', '--threads', '1')


def _seg_args(output: Path, data: Path, *flags: str) -> List[str]:
    """``dynamixer train`` of the tiny pyramid on ``data``, its decoded-image cache beside ``output``; ``flags`` win
    over the tiny settings."""
    return ['train', '--data', data, '--output', output, '--cache-dir', output.parent / 'cache', *SEG_TINY, *flags,
            '--model-kwargs', *TINY_PYRAMID]


def _camvid(ctx: Context) -> Path:
    """A fresh 3-class folder of the case's own (12 train, 4 val pairs), void framed as CamVid does (value 3)."""
    return make_seg_folder(ctx.tmp / 'camvid', void=3)


def _seg_run_warns(ctx: Context, data: Path, file: Path, train_images: int) -> str:
    """Trains on ``data``: the run finishes on ``train_images`` pairs (and all 4 val), and its one warning,
    shown, names ``file``."""
    code, out, err = ctx.cli(_seg_args(ctx.tmp / 'run', data))
    assert code == 0 and (ctx.tmp / 'run' / 'model').is_dir() and 'Traceback' not in err, err
    assert f'{train_images} train / 4 val images' in out, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('warning:') and str(file) in lines[0], err
    return ctx.shown(lines[0])


@case
def seg_label_map_of_another_size(ctx: Context) -> Row:
    data = _camvid(ctx)
    label = data / 'trainannot' / 'train003.png'
    Image.open(label).resize((24, 16), Image.NEAREST).save(label)
    warning = _seg_run_warns(ctx, data, label, train_images=11)
    assert 'label map is 24x16 but its image' in warning and 'is 48x32' in warning
    return Row('a label map of another size than its image', 'dynamixer train --data DIR/camvid', warning,
               'the run, without that pair')


for _missing in ('label map', 'image'):
    def _unpaired(ctx: Context, missing=_missing) -> Row:
        data = _camvid(ctx)
        (data / ('trainannot' if missing == 'label map' else 'train') / 'train003.png').unlink()
        message = ctx.error(_seg_args(ctx.tmp / 'run', data), f'have no {missing} of the same name', '(train003)')
        assert not (ctx.tmp / 'run').exists()
        what = 'an image without a label map' if missing == 'label map' else 'a label map without an image'
        return Row(what, 'dynamixer train --data DIR/camvid', message, 'nothing was written')
    _unpaired.__name__ = f'seg_{_missing.replace(" ", "_")}_missing'
    case(_unpaired)


@case
def seg_label_values_beyond_the_classes(ctx: Context) -> Row:
    data = _camvid(ctx)
    label = data / 'trainannot' / 'train002.png'
    values = np.array(Image.open(label))
    values[4:12, 4:12] = 37  # a class of some larger labelling, in a 3-class set whose void is 3
    Image.fromarray(values, mode='L').save(label)
    warning = _seg_run_warns(ctx, data, label, train_images=12)
    assert 'beyond the 3 classes of classes.txt (37)' in warning and 'treated as void' in warning
    # what the run trained on (its decoded-image cache): those pixels void (255), the rest as labelled
    caches = [torch.load(p, weights_only=True) for p in (ctx.tmp / 'cache').glob('seg-*.pt')]
    train = next(c for c in caches if 'train002' in c['names'])
    stored = train['labels'][train['names'].index('train002')].numpy()
    assert (stored[4:12, 4:12] == 255).all() and (stored[values < 3] == values[values < 3]).all()
    return Row('label values beyond the classes that are not void (37 in a 3-class set)',
               'dynamixer train --data DIR/camvid', warning, 'the run, with those pixels ignored as void')


@case
def seg_colour_label_map(ctx: Context) -> Row:
    data = _camvid(ctx)
    label = data / 'trainannot' / 'train004.png'
    values = np.array(Image.open(label))
    colours = np.concatenate([SEG_COLOURS, [[0, 0, 0]]]).astype(np.uint8)  # void black, as colour-coded sets have it
    Image.fromarray(colours[values]).save(label)  # an RGB PNG of colour-coded classes
    warning = _seg_run_warns(ctx, data, label, train_images=11)
    assert 'is a colour label map (RGB)' in warning and 'single-channel' in warning
    return Row('a colour (RGB) label map among the label maps', 'dynamixer train --data DIR/camvid', warning,
               'the run, without that pair')


for _which in ('train', 'trainannot'):
    def _truncated_png(ctx: Context, which=_which) -> Row:
        data = _camvid(ctx)
        png = data / which / 'train005.png'
        png.write_bytes(png.read_bytes()[:png.stat().st_size // 2])
        warning = _seg_run_warns(ctx, data, png, train_images=11)
        assert 'truncated' in warning
        return Row(f'a truncated PNG {"image" if which == "train" else "label map"}', 'dynamixer train --data '
                   'DIR/camvid', warning, 'the run, without that pair')
    _truncated_png.__name__ = f'seg_truncated_{"image" if _which == "train" else "label_map"}'
    case(_truncated_png)


@case
def seg_empty_val_split(ctx: Context) -> Row:
    data = _camvid(ctx)
    for folder in ('val', 'valannot'):
        for file in (data / folder).iterdir():
            file.unlink()
    message = ctx.error(_seg_args(ctx.tmp / 'run', data), 'no images found in', 'camvid/val;')
    assert not (ctx.tmp / 'run').exists()
    return Row('an empty split (val/ and valannot/ without files)', 'dynamixer train --data DIR/camvid', message,
               'nothing was written')


@case
def seg_classes_txt_missing(ctx: Context) -> Row:
    data = _camvid(ctx)
    (data / 'classes.txt').unlink()
    message = ctx.error(_seg_args(ctx.tmp / 'run', data), 'classes.txt is missing', 'one a line')
    assert not (ctx.tmp / 'run').exists()
    return Row('a segmentation folder without classes.txt', 'dynamixer train --data DIR/camvid', message,
               'nothing was written')


@case
def seg_classes_txt_duplicate(ctx: Context) -> Row:
    data = _camvid(ctx)
    (data / 'classes.txt').write_text('road\nsky\nroad\n')
    message = ctx.error(_seg_args(ctx.tmp / 'run', data), "names 'road' twice (lines 1 and 3)")
    assert not (ctx.tmp / 'run').exists()
    return Row('a class named twice in classes.txt', 'dynamixer train --data DIR/camvid', message,
               'nothing was written')


@case
def seg_data_for_a_classification_model(ctx: Context) -> Row:
    run, data = ctx.copy('run'), ctx.copy('camvid')
    message = ctx.error(['eval', '--model-dir', run / 'model', '--data', data], 'is a segmentation dataset',
                        'is a classification model')
    assert not (run / 'confusion.png').exists()
    return Row('segmentation data for a classification model', 'dynamixer eval --model-dir DIR/run/model --data '
               'DIR/camvid', message, 'nothing')


@case
def classification_data_for_a_seg_model(ctx: Context) -> Row:
    run, data = ctx.copy('seg_run'), ctx.copy('data')
    message = ctx.error(['eval', '--model-dir', run / 'model', '--data', data], 'is a segmentation model',
                        'is not a segmentation folder')
    return Row('a classification folder for a segmentation model', 'dynamixer eval --model-dir DIR/seg_run/model '
               '--data DIR/data', message, 'nothing')


@case
def seg_decoder_channels_not_a_multiple_of_32(ctx: Context) -> Row:
    message = ctx.error(_seg_args(ctx.tmp / 'run', ctx.templates['camvid'], '--decoder-channels', '48'),
                        'argument --decoder-channels: expected a multiple of 32', "got '48'")
    assert not (ctx.tmp / 'run').exists()
    return Row('a decoder width that is not a multiple of 32', 'dynamixer train --data DIR/camvid '
               '--decoder-channels 48', message, 'nothing was started')


@case
def seg_train_flip_shift_tta(ctx: Context) -> Row:
    message = ctx.error(_seg_args(ctx.tmp / 'run', ctx.templates['camvid'], '--tta', 'flip-shift'),
                        '--tta flip-shift is for classification', '--tta none or flip')
    assert not (ctx.tmp / 'run').exists()
    return Row('--tta flip-shift (a classification TTA) for a segmentation run', 'dynamixer train --data DIR/camvid '
               '--tta flip-shift', message, 'nothing was written')


@case
def seg_eval_flip_shift_tta(ctx: Context) -> Row:
    run = ctx.copy('seg_run')
    message = ctx.error(['eval', '--model-dir', run / 'model', '--data', ctx.templates['camvid'], '--tta',
                         'flip-shift'], '--tta flip-shift is for classification', '--tta none or flip')
    return Row('--tta flip-shift (a classification TTA) for a segmentation model',
               'dynamixer eval --model-dir DIR/seg_run/model --data DIR/camvid --tta flip-shift', message,
               'nothing')


# ------------------------------------------------------------------------------ a newcomer's first hour

@case
def one_class_folder(ctx: Context) -> Row:
    data = ctx.tmp / 'one'
    make_image_folder(data / 'train', classes=('cat',), per_class=12)
    make_image_folder(data / 'val', classes=('cat',), per_class=4)
    message = ctx.error(['train', '--data', data, '--output', ctx.tmp / 'run'], 'holds images of one class only (cat)',
                        'at least 2')
    assert not (ctx.tmp / 'run').exists()
    return Row('an image folder with a single class', 'dynamixer train --data DIR/one', message, 'nothing was started')


@case
def two_runs_started_at_once_without_output(ctx: Context) -> Row:
    argv = [sys.executable, '-m', 'dynamixer.cli', 'train', '--workers', '0', '--epochs', '1', *TINY_MODEL]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    runs = [subprocess.Popen(argv, cwd=ctx.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    folders = sorted(p.name for p in (ctx.tmp / 'runs').iterdir())
    assert folders == ['digits', 'digits-2'], folders
    for name in folders:  # each run finished in a folder of its own, and said which
        assert (ctx.tmp / 'runs' / name / 'model' / 'model.safetensors').is_file()
        assert sum(f'runs/{name}/model' in out + err for out, err in outs) == 1
    return Row('two runs started at the same moment without --output', 'dynamixer train & dynamixer train',
               '(none: each says where it writes)', 'both runs, in runs/digits and runs/digits-2')


@case
def empty_weights_file(ctx: Context) -> Row:
    run = ctx.copy('run')
    (run / 'model' / 'model.safetensors').write_bytes(b'')
    message = ctx.error(['eval', '--model-dir', run / 'model', '--data', ctx.templates['data']],
                        f'could not read the weights {run / "model" / "model.safetensors"}', 'an empty file')
    return Row('a model folder whose weights file is empty (0 bytes)', 'dynamixer eval --model-dir DIR/run/model',
               message, 'the folder, untouched')


@case
def config_json_not_json(ctx: Context) -> Row:
    run = ctx.copy('run')
    (run / 'model' / 'config.json').write_text('{architecture: dynamixer}')
    image = ctx.tmp / 'cat.png'
    Image.new('RGB', (8, 8), (200, 0, 0)).save(image)
    message = ctx.error(['predict', '--model-dir', run / 'model', image],
                        f'could not read {run / "model" / "config.json"}')
    return Row('a model folder whose config.json is not JSON', 'dynamixer predict --model-dir DIR/run/model cat.png',
               message, 'the folder, untouched')


@case
def pretrained_features_only(ctx: Context) -> Row:
    import timm
    import dynamixer  # noqa: F401
    model = timm.create_model('dynamixer_cifar_xs.cifar10_1h', pretrained=True, features_only=True)
    features = model(torch.zeros(1, 3, 32, 32))
    shapes = ', '.join(str(tuple(f.shape)) for f in features)
    assert len(features) == len(model.feature_info.channels()) >= 2
    return Row('the shipped CIFAR weights as a feature extractor (once blamed on the file)',
               "timm.create_model('dynamixer_cifar_xs.cifar10_1h', pretrained=True, features_only=True)",
               f'(none: it works; feature maps {shapes})', 'nothing was wrong')


@case
def ctrl_c_during_training(ctx: Context) -> Row:
    out = ctx.tmp / 'run'
    argv = [sys.executable, '-m', 'dynamixer.cli', 'train', '--output', str(out), '--workers', '0', '--epochs', '200',
            '--checkpoint-every', '2', *TINY_MODEL]  # no --no-progress: a piped stderr gets no progress bar anyway
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / 'checkpoint.pth').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next steps, so that Ctrl-C lands between two checkpoints
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count('\n') == 1 and 'Traceback' not in err, err[-3000:]
    assert '\r' not in stdout + err and 'step/s' not in err  # epoch lines only in a redirected log
    match = re.search(r'interrupted at epoch (\d+), step (\d+); continue with --resume', err)
    assert match, err
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert (saved['epoch'] + 1, saved['step_in_epoch']) == (int(match.group(1)), int(match.group(2)))
    assert ctx.cli(['train', '--output', out, '--resume', '--epochs', saved['epoch'] + 1, '--no-progress'])[0] == 0
    assert _epoch(out) == saved['epoch'] + 1
    shown = re.sub(r'epoch \d+, step \d+', 'epoch E, step S', ctx.shown(err.strip()))  # where it lands is timing
    return Row('Ctrl-C during training', 'dynamixer train ... then Ctrl-C', shown,
               'a checkpoint of every step done; --resume continues from it')


@case
def bench_model_name_misspelt(ctx: Context) -> Row:
    message = ctx.error(['bench', '--model', 'dynamixer_cifar_sx'], "did you mean 'dynamixer_cifar_xs'")
    return Row('a misspelt model name for bench', 'dynamixer bench --model dynamixer_cifar_sx', message, 'nothing')


@case
def predict_tag_misspelt(ctx: Context) -> Row:
    image = ctx.tmp / 'cat.png'
    Image.new('RGB', (32, 32), (200, 0, 0)).save(image)
    message = ctx.error(['predict', '--model', 'dynamixer_cifar_xs.cifar10', image],
                        "did you mean 'dynamixer_cifar_xs.cifar10_1h'")
    return Row('a misspelt pretrained tag', 'dynamixer predict --model dynamixer_cifar_xs.cifar10 cat.png',
               ctx.shown(message), 'nothing')


@case
def bench_on_a_busy_machine(ctx: Context) -> Row:
    from dynamixer import bench
    times = {'fast': [0.41, 0.43, 5.36], 'reference': [0.5, 0.52, 0.55]}  # what a busy machine measured
    ctx.monkeypatch.setattr(bench, 'matmul_peak_gflops', lambda *a: 100.)
    ctx.monkeypatch.setattr(bench, 'time_interleaved', lambda runners, *a: {k: times[k] for k in runners})
    code, out, err = ctx.cli(['bench', '--model', 'dynamixer_cifar_xs', '--modes', 'inference', '--no-memory',
                              '--quiet'])
    assert code == 0 and 'at None' not in out + err and '| inference | 128 |' in out, out  # a batch fit for 32 px
    warning = next(line for line in err.splitlines() if line.startswith('warning:'))
    assert '13.1x (fast)' in warning and 'reference' not in warning and warning in out
    return Row('bench on a busy machine (timed runs 0.41 s to 5.36 s)', 'dynamixer bench --model dynamixer_cifar_xs',
               warning, 'the figures, flagged in the table and the JSON')


@case
def noise_image_for_a_colour_model(ctx: Context) -> Row:
    image = ctx.tmp / 'noise.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image)
    photo = ctx.tmp / 'photo.png'  # smooth: a gradient with a disc, as photographs are, no warning
    yy, xx = np.mgrid[:200, :300]
    smooth = np.stack([xx * 0.8, yy, ((yy - 100) ** 2 + (xx - 150) ** 2 < 3600) * 200], -1).astype(np.uint8)
    Image.fromarray(smooth).save(photo)
    code, out, err = ctx.cli(['predict', '--model', 'dynamixer_cifar_xs.cifar10_1h', image, photo])
    assert code == 0 and err.count('warning:') == 1 and 'photo.png' not in err, err
    return Row('a 300x200 image of random noise for the CIFAR model', 'dynamixer predict --model '
               'dynamixer_cifar_xs.cifar10_1h DIR/noise.png', ctx.shown(err.strip()), 'the prediction, flagged')


# ---------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope='module')
def templates(tmp_path_factory) -> Dict[str, Path]:
    """A data folder, a finished one-epoch run on it, a trained digits model folder, and a segmentation folder
    with a finished one-epoch segmentation run on it."""
    root = tmp_path_factory.mktemp('templates')
    data = root / 'data'
    make_image_folder(data / 'train', per_class=12, seed=0)
    make_image_folder(data / 'val', per_class=4, seed=1)
    assert cli.main(train_args(root / 'run', '--data', str(data), *TINY_RUN)) == 0
    assert cli.main(['train', '--output', str(root / 'digits'), '--no-progress', *TINY_MODEL, '--epochs', '1']) == 0
    camvid = make_seg_folder(root / 'camvid', void=3)
    assert cli.main([str(a) for a in _seg_args(root / 'seg_run', camvid)]) == 0
    return {'data': data, 'run': root / 'run', 'digits': root / 'digits' / 'model', 'camvid': camvid,
            'seg_run': root / 'seg_run'}


ROWS: Dict[str, Row] = {}


def _run_case(name: str, tmp_path, templates, capsys, monkeypatch) -> Row:
    if name not in ROWS:
        monkeypatch.chdir(tmp_path)  # a default output lands here, never in the checkout
        capsys.readouterr()
        ROWS[name] = CASES[name](Context(tmp_path, templates, capsys, monkeypatch))
    return ROWS[name]


@pytest.mark.parametrize('name', list(CASES))
def test_case(name, tmp_path, templates, capsys, monkeypatch):
    row = _run_case(name, tmp_path, templates, capsys, monkeypatch)
    assert row.message and row.survives


def _table(rows: List[Row]) -> str:
    cell = lambda text: text.replace('|', '\\|')
    lines = ['| # | what went wrong | command | what it says | what survives |', '|---|---|---|---|---|']
    lines += [f'| {i} | {cell(r.what)} | `{cell(r.command)}` | {cell(r.message)} | {cell(r.survives)} |'
              for i, r in enumerate(rows, 1)]
    return '\n'.join(lines)


def test_the_docs_table_is_the_one_these_cases_produce(tmp_path_factory, templates, capsys, monkeypatch):
    rows = [_run_case(name, tmp_path_factory.mktemp(name), templates, capsys, monkeypatch) for name in CASES]
    assert len(rows) >= 25
    table = _table(rows)
    text = DOC.read_text() if DOC.is_file() else f'{BEGIN}\n{END}\n'
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get('UPDATE_DOCS'):
        text = text[:start] + '\n' + table + '\n' + text[end:]
        DOC.write_text(text)
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    assert text[start:end].strip() == table, 'docs/robustness.md is out of date: UPDATE_DOCS=1 pytest ' + __file__
