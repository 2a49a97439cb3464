"""Train or fine-tune a DynaMixer, on one CPU or, under torchrun, on many GPUs with DDP.

``dynamixer train`` with no arguments trains a small DynaMixer on scikit-learn's digits in about a minute.
``--recipe paper`` is the official ImageNet recipe, ``--recipe finetune`` the official transfer recipe.
Every setting can be given as a flag or in a YAML ``--config``: flags beat the config file, which beats the
recipe. A run writes to ``--output``: args.yaml, metrics.jsonl, curves.png, the best model as a timm model
folder (``model/``, loadable with ``timm.create_model('local-dir:OUTPUT/model', pretrained=True)``) and
checkpoint.pth, the full training state that ``--resume`` continues from.

The loop is deliberately one plain loop (in ``_train``, one screen long), in the spirit of nanoGPT's
train.py: data, model, optimiser and scheduler come from timm and torch (``prepare_data``,
``prepare_optimisation``); what is ours is the order of the steps (``train_step``, ``optimiser_step``,
``validate_and_save``) and the care that makes a killed run resumable to the same bits (``restore``). The
settings and recipes are in ``dynamixer.settings``.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from dynamixer.io import atomic_write, write_text
from dynamixer.settings import DIGITS_MODEL_KWARGS, NOT_HYPERPARAMETERS, TTA_VIEWS, resolve_settings

# In a --time-budget run's second half, the whole epochs whose mean time re-plans the schedule.
RECENT_EPOCHS = 3
# Optimiser steps timed to plan a --time-budget run: from CALIBRATION[0] (compiled, allocator warm) to CALIBRATION[1].
CALIBRATION = (10, 50)

CHECKPOINT = 'checkpoint.pth'


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; raised (and reported as one line) instead of training on garbage."""


# Files and folders a run writes; a folder that holds one of the first four holds a run.
RUN_FILES = ('args.yaml', 'checkpoint.pth', 'metrics.jsonl', 'model', 'model_last', 'curves.png', 'confusion.png')


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES[:4])


def choose_output(output: Optional[str], data: str, resume: bool, overwrite: bool) -> Path:
    """Where a run writes. Never onto an earlier run: the default runs/DATA is numbered (runs/DATA-2, ...)
    past folders that hold one, and an explicit folder that holds one needs --resume or --overwrite."""
    if output is None:
        base = Path('runs') / (Path(data).name or 'data')
        out, n = base, 1
        while holds_run(out):
            n += 1
            out = base.with_name(f'{base.name}-{n}')
        return out
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f'--output {output} is a file; give a folder.')
    if holds_run(out) and not (resume or overwrite):
        raise ValueError(f'--output {output} holds an earlier run; continue it with --resume, replace it with '
                         f'--overwrite, or choose another --output.')
    return out


def save_settings(cfg: argparse.Namespace, out: Path) -> None:
    """OUTPUT/args.yaml: every setting of the run, what --resume reads back."""
    import yaml
    write_text(out / 'args.yaml', yaml.safe_dump({k: v for k, v in vars(cfg).items() if k not in NOT_HYPERPARAMETERS},
                                                 sort_keys=False))


def clear_run(folder: Path) -> None:
    """Delete what an earlier run wrote (for --overwrite), so that none of it is mistaken for the new run's."""
    import shutil
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------------------
# small helpers

def rng_state() -> Dict[str, Any]:
    """Every global RNG the loop draws from (torch, python, numpy; CUDA when present), as plain data."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class EpochSampler(DistributedSampler):
    """DistributedSampler (a fixed order per epoch from the seed) that can start part-way into the epoch and
    stops after the last full optimiser step, so a resumed run sees exactly the batches a straight run would."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, samples_per_epoch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.stop = samples_per_epoch
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:self.stop])

    def __len__(self) -> int:
        return self.stop - self.start


def model_img_size(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) input the model is built for: a DynaMixer's ``img_size``, a timm model's patch embedding's,
    else its pretrained config's."""
    from timm.layers import to_2tuple
    for holder in (model, getattr(model, 'patch_embed', None), getattr(model, 'stem', None)):
        size = getattr(holder, 'img_size', None)
        if size is not None:
            return tuple(to_2tuple(size))
    return tuple(model.pretrained_cfg['input_size'][-2:])


def build_model(cfg: argparse.Namespace, num_classes: int, in_chans: int, img_size: Optional[int]) -> nn.Module:
    import dynamixer
    from dynamixer.catalog import create_any_model
    kwargs = {}
    init = Path(cfg.init_checkpoint) if cfg.init_checkpoint else None
    if init is not None and init.is_dir() and (init / 'config.json').is_file():
        # a model folder says what it is; its architecture is the default for fine-tuning it
        saved = json.loads((init / 'config.json').read_text())
        if cfg.model == 'dynamixer_cifar_t' and saved.get('architecture'):
            cfg.model = saved['architecture']
        kwargs.update({k: v for k, v in saved.get('model_args', {}).items()
                       if k not in ('num_classes', 'in_chans', 'img_size', 'global_pool')})
    if cfg.model_kwargs is not None:
        kwargs.update(cfg.model_kwargs)
    elif cfg.data == 'digits' and init is None:
        kwargs.update(DIGITS_MODEL_KWARGS)
    if img_size:
        kwargs['img_size'] = img_size
    try:
        model = create_any_model(cfg.model, num_classes=num_classes, in_chans=in_chans,
                                 drop_path_rate=cfg.drop_path, drop_rate=cfg.drop, **kwargs)
        if cfg.model not in dynamixer.list_models():  # timm may not record them all (e.g. patch_size)
            model.build_args = dict(kwargs, num_classes=num_classes, in_chans=in_chans)
    except TypeError as e:
        raise ValueError(f'bad --model-kwargs for {cfg.model}: {e}.') from None
    if init is not None:
        from dynamixer.convert import load_checkpoint
        path = init / 'model.safetensors' if init.is_dir() else init
        if not path.exists():
            raise ValueError(f'--init-checkpoint {str(init)!r} does not exist (expected a model/ folder, '
                             f'.safetensors or .pth file).')
        try:
            load_checkpoint(model, path, reset_head=True)
        except ValueError as e:
            raise ValueError(f'--init-checkpoint {init}: {e}') from None
    return model


def set_data_cfg(model: nn.Module, classes: List[str], in_chans: int, small: bool) -> Dict[str, Any]:
    """Record preprocessing and labels in the model's pretrained_cfg, so the saved model folder carries them."""
    from timm.data import resolve_data_config
    cfg = dict(model.pretrained_cfg)
    h, w = model_img_size(model)
    cfg.update(input_size=(in_chans, h, w), num_classes=len(classes), label_names=list(classes))
    if in_chans == 1 and len(cfg.get('mean', ())) != 1:
        cfg.update(mean=(0.5,), std=(0.5,))
    if small:
        cfg.update(crop_pct=1.0)  # small images are used whole
    model.pretrained_cfg = cfg
    return resolve_data_config(model=model)


def save_model_dir(model: nn.Module, folder: Path, classes: List[str]) -> None:
    """The model as a timm local-dir folder: config.json (architecture, model_args, pretrained_cfg with
    label names) and model.safetensors; ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it."""
    from timm.models._hub import save_config_for_hf
    from dynamixer.convert import save_safetensors
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / 'model.safetensors')
    atomic_write(folder / 'config.json', lambda tmp: save_config_for_hf(
        model, tmp, model_config=dict(label_names=list(classes)), model_args=getattr(model, 'build_args', None)))


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    marker = 'o' if len(epochs) < 30 else None  # a line through one point draws nothing
    ax1.plot(epochs, [h['train_loss'] for h in history], label='train', marker=marker)
    ax1.plot(epochs, [h['val_loss'] for h in history], label='val', marker=marker)
    ax1.set_xlabel('epoch'), ax1.set_ylabel('loss'), ax1.legend()
    ax2.plot(epochs, [h['val_top1'] for h in history], label='val top-1', marker=marker)
    ax2.plot(epochs, [h['val_top5'] for h in history], label='val top-5', marker=marker)
    ax2.set_xlabel('epoch'), ax2.set_ylabel('accuracy (%)'), ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    plt.close(fig)


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> List[Dict[str, Any]]:
    """timm's weight-decay groups (no decay on biases and norms), split into head and backbone so that the
    scheduler (which honours ``lr_scale``) can run the backbone at a fraction of the head's rate."""
    from timm.optim import param_groups_weight_decay
    groups = []
    for is_head in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith('head.') == is_head]
        for wd_group in param_groups_weight_decay(_Params(named), weight_decay):
            if wd_group['params']:
                groups.append(dict(wd_group, lr_scale=1. if is_head else backbone_lr_scale))
    return groups


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp`` (None: fp32); ``auto`` picks bf16 only where the hardware runs it fast."""
    if amp == 'auto':
        if device.type == 'cuda':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        bf16_cpu = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if device.type == 'cpu' and bf16_cpu else None
    return {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


def plan_epochs(budget_s: float, elapsed_s: float, step_s: float, steps_per_epoch: int, steps_done: int,
                val_batches: int, max_epochs: int) -> int:
    """How many epochs fit in what is left of a time budget, given the measured time of one training step
    (a validation batch is counted as one step, plus a second per epoch for checkpoint and plots)."""
    epoch_s = (steps_per_epoch + val_batches) * step_s + 1.
    left = budget_s - elapsed_s - (steps_per_epoch - steps_done + val_batches) * step_s - 1.
    return int(max(1, min(max_epochs, 1 + whole_epochs_in(left, epoch_s))))


def whole_epochs_in(left_s: float, epoch_s: float, spare: float = 0.5) -> int:
    """Whole epochs that fit in the time left with ``spare`` epochs to spare (and 2% of the time kept back):
    epoch times jitter, and a schedule whose last epoch no longer fits must stop before its cosine has ended."""
    return max(0, math.floor((0.98 * left_s - spare * epoch_s) / epoch_s))


def tensor_loaders(cfg, splits, model: nn.Module, data_config: Dict[str, Any], crop: str, hflip: float,
                   micro_batch: int, rank: int, world: int, log: Callable):
    """Train and validation ``TensorLoader``s over the splits decoded once (and cached for image folders)."""
    from dynamixer.tensor_data import TensorLoader, cache_tensors
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else \
        Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'dynamixer'
    tensors = []
    for name, dataset in (('train', splits.train), ('val', splits.val)):
        t0 = time.time()
        split, path, built = cache_tensors(dataset, model_img_size(model), cache_dir,
                                           progress=cfg.progress and rank == 0)
        if path is not None:
            log(f'{name} images: {len(split)} decoded into {path} in {time.time() - t0:.1f}s' if built else
                f'{name} images: {len(split)} from the cache {path} ({time.time() - t0:.1f}s)')
        for u in split.skipped:
            print(f'warning: skipped unreadable image {u.path} ({u.reason})', file=sys.stderr)
        tensors.append(split)
    mean, std = data_config['mean'], data_config['std']
    size = min(model_img_size(model))
    train = TensorLoader(tensors[0], micro_batch, mean, std, train=True, seed=cfg.seed,
                         padding=max(1, size // 8) if crop == 'pad' else 0, hflip=hflip, cutout=cfg.cutout,
                         rank=rank, world=world)
    val = TensorLoader(tensors[1], micro_batch * 2, mean, std, train=False, rank=rank, world=world)
    return train, val, len(tensors[0].skipped) + len(tensors[1].skipped)


class _Params(nn.Module):
    """A bag of named parameters that looks like a module to timm's grouping helpers."""

    def __init__(self, named):
        super().__init__()
        self._named = named

    def named_parameters(self, *args, **kwargs):
        return iter(self._named)


# ----------------------------------------------------------------------------------------------------------
# the run

def run(args: argparse.Namespace) -> None:
    t_start = time.time()  # a --time-budget counts from here: data loading and compilation included
    cfg = resolve_settings(args)

    # -- processes: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; one process otherwise
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        use_cuda = torch.cuda.is_available() and cfg.device in ('auto', 'cuda')
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))
        device = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        from dynamixer.evaluate import resolve_device
        rank, world, device = 0, 1, resolve_device(cfg.device)
    master = rank == 0
    try:
        # rank 0 alone looks at the folder (the others would see its new files) and tells them the verdict
        verdict = ['', '']
        if master:
            try:
                verdict[0] = str(choose_output(cfg.output, cfg.data, cfg.resume, cfg.overwrite))
            except ValueError as e:
                verdict[1] = str(e)
        if ddp:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[1]:
            raise ValueError(verdict[1])
        cfg.output, out = verdict[0], Path(verdict[0])
        if master and cfg.overwrite and not cfg.resume:
            clear_run(out)
        _train(cfg, out, rank, world, device, ddp, master, t_start)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def prepare_data(cfg, device: torch.device, rank: int, world: int, log: Callable) -> SimpleNamespace:
    """The model (on ``device``) and what feeds it: splits, transforms or tensor batches, loaders, step counts."""
    from dynamixer.data import collate, eval_transform, load_splits, train_transform
    splits = load_splits(cfg.data, cfg.data_dir, cfg.val_split, cfg.split_seed, cfg.in_chans, cfg.limit_train,
                         cfg.limit_val)
    img_size = cfg.img_size or (splits.native_size if cfg.data == 'digits' else None)
    model = build_model(cfg, len(splits.classes), splits.in_chans, img_size)
    small = min(model_img_size(model)) <= 64
    data_config = set_data_cfg(model, splits.classes, splits.in_chans, small)
    crop = cfg.crop if cfg.crop != 'auto' else ('none' if cfg.data == 'digits' else 'pad' if small else 'rrc')
    hflip = cfg.hflip if cfg.hflip is not None else (0. if cfg.data == 'digits' else 0.5)
    file_only = [flag for flag, on in (('--aa', cfg.aa), ('--color-jitter', cfg.color_jitter),
                                       ('--reprob', cfg.reprob), ('--crop rrc', crop == 'rrc')) if on]
    use_tensors = cfg.data_path == 'tensor' or (cfg.data_path == 'auto' and small and cfg.data != 'digits'
                                                and not file_only)
    if use_tensors and file_only:
        raise ValueError(f'--data-path tensor augments with crop, flip and cutout only; {", ".join(file_only)} '
                         f'need --data-path files.')
    if cfg.cutout and not use_tensors:
        raise ValueError('--cutout needs --data-path tensor (images <= 64 px).')
    splits.train.transform = train_transform(data_config, crop, cfg.scale, hflip, cfg.aa, cfg.color_jitter,
                                             cfg.reprob)
    splits.val.transform = eval_transform(data_config)
    splits.train.seed = cfg.seed
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)

    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(f'--batch-size {cfg.batch_size} (the total per optimiser step) is not divisible by '
                         f'{world} processes x {cfg.accum_steps} accumulation steps; adjust one of them.')
    micro_batch = cfg.batch_size // (world * cfg.accum_steps)
    steps_per_epoch = math.ceil(len(splits.train) / world) // (micro_batch * cfg.accum_steps)
    if steps_per_epoch < 1:
        raise ValueError(f'{len(splits.train)} training images are fewer than one batch of {cfg.batch_size}; '
                         f'use a smaller --batch-size.')
    data = SimpleNamespace(model=model, splits=splits, classes=splits.classes, data_config=data_config,
                           micro_batch=micro_batch, sampler=None, n_skipped=0,
                           loader_rng=torch.Generator())  # the loader's own RNG, never the checkpointed global one
    if use_tensors:
        data.loader, data.val_loader, data.n_skipped = tensor_loaders(cfg, splits, model, data_config, crop, hflip,
                                                                      micro_batch, rank, world, log)
        steps_per_epoch = len(data.loader) // cfg.accum_steps
    else:
        data.sampler = EpochSampler(splits.train, world, rank, cfg.seed,
                                    steps_per_epoch * cfg.accum_steps * micro_batch)
        workers = cfg.workers if cfg.workers is not None else (0 if cfg.data == 'digits' else
                                                               min(4, os.cpu_count() or 1))
        data.loader = DataLoader(splits.train, batch_size=micro_batch, sampler=data.sampler, num_workers=workers,
                                 collate_fn=collate, generator=data.loader_rng, pin_memory=device.type == 'cuda',
                                 drop_last=True)
        val_set = Subset(splits.val, range(rank, len(splits.val), world))  # no padding: exact metrics over ranks
        data.val_loader = DataLoader(val_set, batch_size=micro_batch * 2, num_workers=workers, collate_fn=collate)
    data.steps_per_epoch = steps_per_epoch
    return data


def prepare_optimisation(cfg, model: nn.Module, data: SimpleNamespace, device: torch.device,
                         log: Callable) -> SimpleNamespace:
    """Optimiser, scheduler (rebuilt by ``make_scheduler`` when a time budget sets the epochs), EMA, precision,
    gradient scaler, mixup and loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    # torch's fused Adam(W) updates all parameters in one kernel (CPU and CUDA) instead of a few per parameter
    # group: on small models the optimiser step is a visible part of a training step (docs/cifar10.md)
    fused = dict(fused=True) if cfg.opt.lower() in ('adam', 'adamw') else {}
    optimizer = create_optimizer_v2(param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale), opt=cfg.opt,
                                    lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **fused)

    def make_scheduler(epochs: int):  # the warm-up does not depend on epochs, so a budget can set them later
        return create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=epochs, min_lr=cfg.min_lr,
                                   warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                   step_on_epochs=False, updates_per_epoch=data.steps_per_epoch)[0]
    amp_dtype = resolve_amp(cfg.amp, device)
    if cfg.amp == 'auto':
        log(f'--amp auto: {"bf16 autocast" if amp_dtype else "fp32 (no fast bf16 on this " + device.type + ")"}')
    if cfg.amp == 'fp16' and device.type == 'cpu':  # docs/benchmarks.md, bf16 autocast and torch.compile
        log('note: --amp fp16 on CPU is slow (most CPUs lack fp16 matmul instructions and torch falls back to a '
            'slow kernel in backward); --amp bf16 is the CPU choice.', file=sys.stderr)
    mixup, loss_fn = None, nn.CrossEntropyLoss()
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=len(data.classes))
        loss_fn = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
    return SimpleNamespace(optimizer=optimizer, make_scheduler=make_scheduler, scheduler=make_scheduler(cfg.epochs),
                           ema=ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None,
                           amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16'),
                           mixup=mixup, loss_fn=loss_fn)


def restore(cfg, ckpt_path: Path, model: nn.Module, opt: SimpleNamespace, state: SimpleNamespace,
            steps_per_epoch: int, rank: int, world: int, master: bool, log: Callable) -> None:
    """Where a killed run stopped: weights, optimiser, schedule, position, history and every rank's RNGs."""
    from dynamixer.convert import torch_load
    if not ckpt_path.is_file():
        raise ValueError(f'nothing to resume: {ckpt_path} does not exist; start without --resume.')
    ckpt = torch_load(ckpt_path, 'a training checkpoint', 'the checkpoint.pth that dynamixer train writes; '
                      'restore it or start again without --resume')
    try:
        model.load_state_dict(ckpt['model'])
        if opt.ema is not None and ckpt.get('ema') is not None:
            opt.ema.module.load_state_dict(ckpt['ema'])
    except RuntimeError as e:
        raise ValueError(f'{ckpt_path} holds another model than these settings build '
                         f'({str(e).splitlines()[0]}); resume with the settings it was trained with.') from None
    opt.optimizer.load_state_dict(ckpt['optimizer'])
    opt.scheduler.load_state_dict(ckpt['scheduler'])
    opt.scaler.load_state_dict(ckpt['scaler'])
    state.epoch, state.step_in_epoch, state.global_step = ckpt['epoch'], ckpt['step_in_epoch'], ckpt['global_step']
    state.planned = state.planned or ckpt.get('planned', False)
    if cfg.time_budget and state.planned:  # the budget was spent on the interrupted run's plan
        opt.scheduler = opt.make_scheduler(cfg.epochs)
    state.best_top1, state.history, state.running = ckpt['best_top1'], list(ckpt['history']), dict(ckpt['running'])
    saved_ranks = ckpt.get('ranks') or [dict(rng=ckpt['rng'], running=state.running)]
    if rank < len(saved_ranks) and len(saved_ranks) == world:
        set_rng_state(saved_ranks[rank]['rng'])
        state.running = dict(saved_ranks[rank]['running'])
    elif master:  # resumed with another process count: rank 0 continues its stream, the others start anew
        set_rng_state(saved_ranks[0]['rng'])
    else:
        seed_everything(cfg.seed + 1000 * rank + state.global_step)
    log(f'resumed from {ckpt_path}: epoch {state.epoch + 1}, step {state.step_in_epoch}/{steps_per_epoch}')


def _train(cfg, out: Path, rank: int, world: int, device: torch.device, ddp: bool, master: bool,
           t_start: float) -> None:
    from tqdm import tqdm
    from dynamixer.evaluate import evaluate, summarize
    from dynamixer.models import compile_model

    log = print if master else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    seed_everything(cfg.seed)  # same on every rank: identical initial weights
    data = prepare_data(cfg, device, rank, world, log)
    raw_model = data.model  # the plain module: what we save, evaluate and average
    opt = prepare_optimisation(cfg, raw_model, data, device, log)
    # where we are; a budgeted run plans its epochs once, from the first steps' speed
    state = SimpleNamespace(epoch=0, step_in_epoch=0, global_step=0, best_top1=-1., history=[],
                            running=dict(loss_sum=0., samples=0), planned=not cfg.time_budget)
    ckpt_path = out / CHECKPOINT
    if cfg.resume:
        restore(cfg, ckpt_path, raw_model, opt, state, data.steps_per_epoch, rank, world, master, log)
    else:
        seed_everything(cfg.seed + rank)  # distinct augmentation and drop-path per rank
    if master:
        save_settings(cfg, out)
    model = compile_model(raw_model) if cfg.compile else raw_model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    steps_per_epoch = data.steps_per_epoch

    def save_checkpoint(epoch: int, step: int) -> None:
        """Called on every rank: each one's RNGs and running loss go in, so that a resumed DDP run is bitwise
        the run it continues; rank 0 writes."""
        ranks = [dict(rng=rng_state(), running=dict(state.running))]
        if ddp:
            ranks = [None] * world
            dist.all_gather_object(ranks, dict(rng=rng_state(), running=dict(state.running)))
        if not master:
            return
        ckpt = dict(model=raw_model.state_dict(), optimizer=opt.optimizer.state_dict(),
                    scheduler=opt.scheduler.state_dict(), scaler=opt.scaler.state_dict(),
                    ema=opt.ema.module.state_dict() if opt.ema is not None else None,
                    epoch=epoch, step_in_epoch=step, global_step=state.global_step, best_top1=state.best_top1,
                    history=state.history, running=state.running, rng=ranks[0]['rng'], ranks=ranks,
                    settings=json.dumps(vars(cfg)), planned=state.planned)
        atomic_write(ckpt_path, lambda tmp: torch.save(ckpt, tmp))

    def set_epochs(epochs: int) -> None:
        """A new schedule length, the same on every rank (rank 0's timing decides), saved for --resume."""
        if ddp:
            agreed = torch.tensor(epochs, device=device)
            dist.broadcast(agreed, 0)
            epochs = int(agreed.item())
        cfg.epochs, opt.scheduler = epochs, opt.make_scheduler(epochs)
        if master:
            save_settings(cfg, out)

    warned = set()

    def warn_unreadable(bad, write=print) -> None:
        for b in bad:
            if b.path not in warned:
                warned.add(b.path)
                write(f'warning: skipped unreadable image {b.path} ({b.reason})', file=sys.stderr)

    def train_step(images, targets, last_micro: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients all-reduced on its last one); the loss."""
        blank = len(targets) == 0  # every image of the batch was unreadable: join DDP's all-reduce anyway
        if blank:
            images, targets = torch.zeros(2, *data.data_config['input_size']), torch.zeros(2, dtype=torch.long)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        soft = targets
        if opt.mixup is not None:
            if len(targets) % 2:  # mixup pairs images: drop one when a skipped image left an odd batch
                images, targets = images[:-1], targets[:-1]
            images, soft = opt.mixup(images, targets)
        with nullcontext() if (not ddp or last_micro) else model.no_sync():
            with torch.autocast(device.type, dtype=opt.amp_dtype or torch.float32, enabled=opt.amp_dtype is not None):
                loss = opt.loss_fn(model(images), soft) * (0. if blank else 1.)
            bad_loss = torch.tensor(float(not torch.isfinite(loss).item()), device=device)
            if ddp:  # every rank must stop together, or the others wait forever in all-reduce
                dist.all_reduce(bad_loss)
            if bad_loss.item():
                raise NonFiniteLossError(
                    f'the loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step_in_epoch + 1} '
                    f'(optimiser step {state.global_step + 1}); training stopped. The last good checkpoint is '
                    f'{ckpt_path} (continue with --resume); lower --lr or set --clip-grad.')
            opt.scaler.scale(loss / cfg.accum_steps).backward()
        state.running['loss_sum'] += loss.item() * (0 if blank else len(targets))
        state.running['samples'] += 0 if blank else len(targets)
        return loss

    def optimiser_step() -> None:
        opt.scheduler.step_update(num_updates=state.global_step)  # this step's learning rate
        if cfg.clip_grad:
            opt.scaler.unscale_(opt.optimizer)
            nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += 1
        if opt.ema is not None:
            opt.ema.update(raw_model, step=state.global_step)

    def validated(tta: str = 'none') -> Dict[str, Any]:
        """Held-out metrics of the model we save (the EMA when there is one), summed over ranks."""
        sums = evaluate(opt.ema.module if opt.ema is not None else raw_model, data.val_loader, device,
                        len(data.classes), opt.amp_dtype, tta=tta)
        warn_unreadable(sums['unreadable'])
        if ddp:
            for t in (sums['loss_sum'], sums['hits'], sums['confusion']):
                dist.all_reduce(t)
        return summarize(sums)

    def add_tta(record: Dict[str, Any]) -> str:
        """The last epoch's held-out metrics with the test-time augmentation, into its record; what to log."""
        augmented = validated(cfg.tta)
        record.update(val_top1_tta=augmented['top1'], val_loss_tta=augmented['loss'], tta=cfg.tta,
                      wall_min=(time.time() - t_start) / 60)
        return f'  val_top1 with {cfg.tta} TTA {augmented["top1"]:.2f}%'

    def validate_and_save(train_time: float, seen: int) -> None:
        """Validate, reduce over ranks, log, save the model, metrics and checkpoint."""
        stats = torch.tensor([state.running['loss_sum'], state.running['samples'], seen], dtype=torch.float64,
                             device=device)
        if ddp:
            dist.all_reduce(stats)
        t_val = time.time()
        val = validated()
        budget.val_s = time.time() - t_val  # the last epoch's TTA costs about this for each of its views
        record = dict(epoch=state.epoch + 1, train_loss=stats[0].item() / max(stats[1].item(), 1),
                      val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'], val_images=val['count'],
                      lr=opt.optimizer.param_groups[-1]['lr'], img_per_sec=stats[2].item() / max(train_time, 1e-9),
                      epoch_time=train_time, wall_min=(time.time() - t_start) / 60)
        tta = add_tta(record) if cfg.tta != 'none' and state.epoch + 1 == cfg.epochs else ''
        state.history.append(record)
        log(f'epoch {state.epoch + 1}/{cfg.epochs}  train_loss {record["train_loss"]:.4f}  val_loss {val["loss"]:.4f}'
            f'  val_top1 {val["top1"]:.2f}%  val_top5 {val["top5"]:.2f}%  lr {record["lr"]:.2e}  '
            f'{record["img_per_sec"]:.0f} img/s  {train_time:.1f}s{tta}')
        state.step_in_epoch = 0
        if master:
            if val['top1'] > state.best_top1 or cfg.save_model == 'last':
                state.best_top1 = max(state.best_top1, val['top1'])
                save_model_dir(opt.ema.module if opt.ema is not None else raw_model, out / 'model', data.classes)
            write_history()
        save_checkpoint(state.epoch + 1, 0)

    def write_history() -> None:
        write_text(out / 'metrics.jsonl', ''.join(json.dumps(h) + '\n' for h in state.history))
        plot_curves(state.history, out / 'curves.png')

    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f'{cfg.model}: {n_params / 1e6:.2f}M parameters, input {tuple(data.data_config["input_size"])}; '
        f'{data.splits.name}: {len(data.splits.train)} train / {len(data.splits.val)} val images, '
        f'{len(data.classes)} classes; {world} process(es) on {device.type}, batch {cfg.batch_size} '
        f'({data.micro_batch} x {world} x {cfg.accum_steps}), {steps_per_epoch} steps/epoch')
    calibration = (min(CALIBRATION[0], steps_per_epoch - 1), min(CALIBRATION[1], steps_per_epoch))
    budget = SimpleNamespace(cap=cfg.epochs, t_calibration=time.time(), planned_at=None, epoch_ends=[], val_s=0.)
    while state.epoch < cfg.epochs:  # ---------------------------------------------------------- the loop
        data.splits.train.epoch = state.epoch
        data.loader_rng.manual_seed(cfg.seed * 100003 + state.epoch)
        if data.sampler is None:
            data.loader.set_epoch(state.epoch, state.step_in_epoch * cfg.accum_steps)
        else:
            data.sampler.set_epoch(state.epoch)
            data.sampler.start = state.step_in_epoch * cfg.accum_steps * data.micro_batch
        if state.step_in_epoch == 0:
            state.running = dict(loss_sum=0., samples=0)
        model.train()
        t0, seen_before, micro = time.time(), state.running['samples'], 0
        bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f'epoch {state.epoch + 1}/{cfg.epochs}',
                   disable=not (master and cfg.progress), unit='step', dynamic_ncols=True, leave=False)
        for images, targets, bad in data.loader:
            warn_unreadable(bad, tqdm.write)
            micro += 1
            if len(targets) == 0 and not ddp:
                continue
            loss = train_step(images, targets, last_micro=micro % cfg.accum_steps == 0)
            if micro % cfg.accum_steps:
                continue
            optimiser_step()
            if not state.planned:
                plan_budget(cfg, state, budget, calibration, steps_per_epoch, len(data.val_loader), t_start,
                            set_epochs, bar, tqdm.write if master else None)
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{opt.optimizer.param_groups[-1]["lr"]:.2e}')
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 \
                    and state.step_in_epoch < steps_per_epoch:
                save_checkpoint(state.epoch, state.step_in_epoch)
        bar.close()
        validate_and_save(time.time() - t0, state.running['samples'] - seen_before)
        state.epoch += 1
        replan_budget(cfg, state, budget, t_start, set_epochs, log)

    if cfg.tta != 'none' and state.history and 'val_top1_tta' not in state.history[-1]:
        # the budget ended the schedule at the epoch just validated: its TTA measurement is still the run's last
        log(f'epoch {state.history[-1]["epoch"]}{add_tta(state.history[-1])}')
        if master:
            write_history()
        save_checkpoint(state.epoch, 0)  # with the TTA in its history, a --resume of the finished run keeps it
    if ddp:  # data parallelism must end with identical replicas: say so, or stop loudly
        dist.barrier()  # rank 0 has written everything before anyone reports done
        hashes = [None] * world
        dist.all_gather_object(hashes, weights_hash(raw_model))
        if len(set(hashes)) > 1:
            raise RuntimeError(f'the {world} processes ended with different weights '
                               f'({", ".join(h[:12] for h in hashes)}); the saved model is rank 0\'s. This is a bug: '
                               f'please report it.')
        log(f'all {world} processes hold the same weights (sha256 {hashes[0][:12]})')
    n_bad = torch.tensor(float(len(warned)), device=device)
    if ddp:
        dist.all_reduce(n_bad)
    n_bad += data.n_skipped
    if n_bad.item():
        log(f'skipped {int(n_bad.item())} unreadable image(s) in all', file=sys.stderr)
    if state.history:
        log(f'done: best val top-1 {state.best_top1:.2f}%, last {state.history[-1]["val_top1"]:.2f}%; model in '
            f'{out / "model"}, metrics in {out / "metrics.jsonl"}')


def plan_budget(cfg, state: SimpleNamespace, budget: SimpleNamespace, calibration, steps_per_epoch: int,
                val_batches: int, t_start: float, set_epochs: Callable, bar, write: Optional[Callable]) -> None:
    """During the first steps of a --time-budget run: time steps CALIBRATION[0] to [1], then set the epochs."""
    if state.step_in_epoch == calibration[0]:
        budget.t_calibration = time.time()
    if state.step_in_epoch != calibration[1]:
        return
    step_s = (time.time() - budget.t_calibration) / (calibration[1] - calibration[0])
    set_epochs(plan_epochs(cfg.time_budget * 60, time.time() - t_start, step_s, steps_per_epoch,
                           state.step_in_epoch, val_batches, cfg.epochs))
    state.planned = True
    bar.set_description(f'epoch {state.epoch + 1}/{cfg.epochs}')
    if write:
        write(f'time budget {cfg.time_budget:g} min: {step_s * 1000:.0f} ms a step, '
              f'{time.time() - t_start:.0f}s spent, so {cfg.epochs} epochs')


def replan_budget(cfg, state: SimpleNamespace, budget: SimpleNamespace, t_start: float, set_epochs: Callable,
                  log: Callable) -> None:
    """After each whole epoch of a --time-budget run: re-plan so that the run ends within its budget.

    In the schedule's first half (the learning rate near its peak, where one more epoch barely moves it) from the
    mean whole epoch (validation included) since the first plan, longer or shorter, so that a slow spell early
    does not cost epochs for good. In the second half from the last RECENT_EPOCHS epochs (the machine's speed
    now): shorter as far as needed, longer by one epoch at a time, so that time left by a slow spell that has
    passed is still used while the cosine's tail moves only a little. Plans keep half an epoch to spare, except
    that one more epoch that still fits is never cut: the schedule ends with its cosine."""
    now = time.time()
    if budget.planned_at is None and state.planned:
        budget.planned_at = (state.epoch, now)  # epochs after this one show the steady speed
        budget.epoch_ends = [now]
        return
    if not (cfg.time_budget and not cfg.resume and budget.planned_at and state.epoch < cfg.epochs):
        return
    budget.epoch_ends.append(now)
    left_s = cfg.time_budget * 60 - (now - t_start) - (budget.val_s * TTA_VIEWS[cfg.tta] if cfg.tta != 'none' else 0.)
    if state.epoch == budget.planned_at[0] + 1 or 2 * state.epoch <= cfg.epochs:
        epoch_s = (now - budget.planned_at[1]) / (state.epoch - budget.planned_at[0])
        fits = min(budget.cap, state.epoch + whole_epochs_in(left_s, epoch_s))
    else:
        recent = budget.epoch_ends[-RECENT_EPOCHS - 1:]
        epoch_s = (recent[-1] - recent[0]) / (len(recent) - 1)
        fits = state.epoch + whole_epochs_in(left_s, epoch_s)
        fits = min(budget.cap, cfg.epochs + 1) if fits > cfg.epochs else fits
    if fits <= state.epoch and whole_epochs_in(left_s, epoch_s, spare=0.) >= 1:
        fits = state.epoch + 1  # the last epoch still fits, with less to spare: the cosine gets to its end
    if fits != cfg.epochs:
        log(f'time budget: a whole epoch takes {epoch_s:.0f}s, so the schedule now ends after epoch '
            f'{max(fits, state.epoch)} (was {cfg.epochs})')
        set_epochs(max(fits, state.epoch))
