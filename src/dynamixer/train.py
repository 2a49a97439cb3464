"""Train or fine-tune a DynaMixer, a classifier or a segmenter, on one CPU or, under torchrun, on many GPUs with DDP.

``dynamixer train`` with no arguments trains a small DynaMixer on scikit-learn's digits in about a minute;
``--data`` a folder with ``trainannot/`` (or ``--task segmentation``) trains a segmenter instead.
``--recipe paper`` is the official ImageNet recipe, ``--recipe finetune`` the official transfer recipe.
Every setting can be given as a flag or in a YAML ``--config``: flags beat the config file, which beats the
recipe. A run writes to ``--output``: args.yaml, metrics.jsonl, curves.png, the best model as a model folder
(``model/``, see ``dynamixer.model_dir``) and checkpoint.pth, the full training state that ``--resume``
continues from.

The loop is deliberately one plain loop (``Trainer.fit`` and ``Trainer.train_epoch``, a screen long), in the
spirit of nanoGPT's train.py, the same for every task: what differs between tasks (data, loss, metrics, records,
model folder) is the task object's (``dynamixer.tasks``); optimiser and scheduler come from timm
(``prepare_optimisation``); what is ours is the order of the steps (``train_step``, ``optimiser_step``,
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from dynamixer.io import atomic_write, write_text
from dynamixer.settings import NOT_HYPERPARAMETERS, TTA_VIEWS, resolve_settings

# In a --time-budget run's second half, the whole epochs whose mean time re-plans the schedule.
RECENT_EPOCHS = 3
# Optimiser steps timed to plan a --time-budget run: from CALIBRATION[0] (compiled, allocator warm) to CALIBRATION[1].
CALIBRATION = (10, 50)

CHECKPOINT = 'checkpoint.pth'


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; raised (and reported as one line) instead of training on garbage."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised after a resumable checkpoint was saved; its message is the line to show."""


# Files and folders a run writes; a folder that holds one of the first four holds a run.
CLAIM_FILE = '.claimed'  # in a default output folder: taken by a run, though it may have written nothing yet
RUN_FILES = ('args.yaml', 'checkpoint.pth', 'metrics.jsonl', 'model', 'model_last', 'curves.png', 'confusion.png')


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES[:4])


def claim(folder: Path) -> bool:
    """Whether this process is the first to take ``folder`` for a new run: an exclusive create, atomic, so that
    runs started at the same moment without --output each get a folder of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def choose_output(output: Optional[str], data: str, resume: bool, overwrite: bool) -> Path:
    """Where a run writes. Never onto an earlier run: the default runs/DATA is numbered (runs/DATA-2, ...)
    past folders that hold one, and an explicit folder that holds one needs --resume or --overwrite."""
    if output is None:
        base = Path('runs') / (Path(data).name or 'data')
        out, n = base, 1
        while holds_run(out) or not claim(out):
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


def plot_curves(history: List[Dict[str, Any]], path: Path,
                curves: Sequence[Tuple[str, str]] = (('val_top1', 'val top-1'), ('val_top5', 'val top-5'))) -> None:
    """Losses on the left, the task's held-out figures (``curves``: record key, label) on the right."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    marker = 'o' if len(epochs) < 30 else None  # a line through one point draws nothing
    validated = [h for h in history if 'val_loss' in h]  # with --val-every, not every epoch
    ax1.plot(epochs, [h['train_loss'] for h in history], label='train', marker=marker)
    ax1.plot([h['epoch'] for h in validated], [h['val_loss'] for h in validated], label='val', marker=marker)
    ax1.set_xlabel('epoch'), ax1.set_ylabel('loss'), ax1.legend()
    for key, label in curves:
        ax2.plot([h['epoch'] for h in validated], [h[key] for h in validated], label=label, marker=marker)
    ax2.set_xlabel('epoch'), ax2.set_ylabel('%'), ax2.legend()
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
        Trainer(cfg, out, rank, world, device, ddp, t_start).fit()
        if ddp:  # no rank tears down gloo's connections while another still finishes (suspected: a rare abort)
            dist.barrier()
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def prepare_optimisation(cfg, model: nn.Module, data: SimpleNamespace, device: torch.device,
                         log: Callable) -> SimpleNamespace:
    """Optimiser, scheduler (rebuilt by ``make_scheduler`` when a time budget sets the epochs), EMA, precision and
    gradient scaler."""
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
    return SimpleNamespace(optimizer=optimizer, make_scheduler=make_scheduler, scheduler=make_scheduler(cfg.epochs),
                           ema=ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None,
                           amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16'))


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
    state.best = ckpt['best'] if 'best' in ckpt else ckpt['best_top1']  # best_top1: checkpoints before tasks
    state.history, state.running = list(ckpt['history']), dict(ckpt['running'])
    saved_ranks = ckpt.get('ranks') or [dict(rng=ckpt['rng'], running=state.running)]
    if rank < len(saved_ranks) and len(saved_ranks) == world:
        set_rng_state(saved_ranks[rank]['rng'])
        state.running = dict(saved_ranks[rank]['running'])
    elif master:  # resumed with another process count: rank 0 continues its stream, the others start anew
        set_rng_state(saved_ranks[0]['rng'])
    else:
        seed_everything(cfg.seed + 1000 * rank + state.global_step)
    log(f'resumed from {ckpt_path}: epoch {state.epoch + 1}, step {state.step_in_epoch}/{steps_per_epoch}')


class Trainer:
    """One training run of any task, as named steps: ``fit`` is the loop; ``train_step`` (the one place that calls
    backward), ``optimiser_step``, ``validate_and_save`` and ``save_checkpoint`` are what it does. What differs
    between tasks comes from ``self.task`` (``dynamixer.tasks``): data, loss, metrics, records, model folder."""

    def __init__(self, cfg, out: Path, rank: int, world: int, device: torch.device, ddp: bool, t_start: float):
        from dynamixer.models import compile_model
        from dynamixer.tasks import make_task
        self.cfg, self.out, self.rank, self.world, self.device, self.ddp = cfg, out, rank, world, device, ddp
        self.master, self.t_start = rank == 0, t_start
        self.log = print if self.master else (lambda *a, **k: None)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        seed_everything(cfg.seed)  # same on every rank: identical initial weights
        self.task = make_task(cfg, self.log)
        self.data = data = self.task.prepare_data(device, rank, world)
        self.raw_model = data.model  # the plain module: what we save, evaluate and average
        self.opt = prepare_optimisation(cfg, self.raw_model, data, device, self.log)
        # where we are; a budgeted run plans its epochs once, from the first steps' speed
        self.state = SimpleNamespace(epoch=0, step_in_epoch=0, global_step=0, best=-1., history=[],
                                     running=dict(loss_sum=0., samples=0), planned=not cfg.time_budget)
        self.ckpt_path = out / CHECKPOINT
        self.saved_at: Optional[Tuple[int, int]] = None  # (epoch, step) of the last checkpoint
        if cfg.resume:
            restore(cfg, self.ckpt_path, self.raw_model, self.opt, self.state, data.steps_per_epoch, rank, world,
                    self.master, self.log)
            self.saved_at = (self.state.epoch, self.state.step_in_epoch)
        else:
            seed_everything(cfg.seed + rank)  # distinct augmentation and drop-path per rank
        if self.master:
            save_settings(cfg, out)
        model = compile_model(self.raw_model) if cfg.compile else self.raw_model
        if ddp:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
        self.model = self.task.model = model
        self.warned = set()
        self.budget = SimpleNamespace(cap=cfg.epochs, t_calibration=time.time(), planned_at=None, epoch_ends=[], val_s=0.)

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, data, state = self.cfg, self.data, self.state
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f'{cfg.model}: {n_params / 1e6:.2f}M parameters, input {tuple(data.data_config["input_size"])}; '
                 f'{data.splits.name}: {len(data.splits.train)} train / {len(data.splits.val)} val images, '
                 f'{len(data.classes)} classes; {self.world} process(es) on {self.device.type}, batch '
                 f'{cfg.batch_size} ({data.micro_batch} x {self.world} x {cfg.accum_steps}), '
                 f'{data.steps_per_epoch} steps/epoch')
        try:
            while state.epoch < cfg.epochs:
                t0, seen_before = time.time(), self.train_epoch()
                self.validate_and_save(time.time() - t0, state.running['samples'] - seen_before)
                state.epoch += 1
                replan_budget(cfg, state, self.budget, self.t_start, self.set_epochs, self.log)
        except KeyboardInterrupt:
            raise self.interrupted() from None
        if state.history and self.task.score not in state.history[-1]:  # the budget ended it between validations
            self.validate_and_save(state.history[-1]['epoch_time'], 0, state.history.pop())
        self.finish()

    def interrupted(self) -> TrainingInterrupted:
        """Ctrl-C: the steps done so far checkpointed (a single process; DDP ranks keep the last checkpoint, as
        they could not agree on one now), and the line that says how to go on."""
        state = self.state
        if not self.ddp and 0 < state.step_in_epoch < self.data.steps_per_epoch:
            self.save_checkpoint(state.epoch, state.step_in_epoch)
        if self.saved_at is None:
            return TrainingInterrupted(f'interrupted at epoch {state.epoch + 1}, step {state.step_in_epoch}, before '
                                       f'the first checkpoint: nothing to continue')
        epoch, step = self.saved_at  # where --resume goes on from
        return TrainingInterrupted(f'interrupted at epoch {epoch + 1}, step {step}; continue with --resume: '
                                   f'dynamixer train --output {self.out} --resume')

    def train_epoch(self) -> int:
        """One epoch (or the rest of one, when resumed); returns the samples counted before it started."""
        from tqdm import tqdm
        cfg, data, state, opt = self.cfg, self.data, self.state, self.opt
        data.splits.train.epoch = state.epoch
        data.loader_rng.manual_seed(cfg.seed * 100003 + state.epoch)
        if data.sampler is None:
            data.loader.set_epoch(state.epoch, state.step_in_epoch * cfg.accum_steps)
        else:
            data.sampler.set_epoch(state.epoch)
            data.sampler.start = state.step_in_epoch * cfg.accum_steps * data.micro_batch
        if state.step_in_epoch == 0:
            state.running = dict(loss_sum=0., samples=0)
        self.model.train()
        seen_before, micro = state.running['samples'], 0
        calibration = (min(CALIBRATION[0], data.steps_per_epoch - 1), min(CALIBRATION[1], data.steps_per_epoch))
        bar = tqdm(total=data.steps_per_epoch, initial=state.step_in_epoch, desc=f'epoch {state.epoch + 1}/{cfg.epochs}',
                   disable=not (self.master and cfg.progress), unit='step', dynamic_ncols=True, leave=False)
        for images, targets, bad in data.loader:
            self.warn_unreadable(bad, tqdm.write)
            micro += 1
            if len(targets) == 0 and not self.ddp:
                continue
            loss = self.train_step(images, targets, last_micro=micro % cfg.accum_steps == 0)
            if micro % cfg.accum_steps:
                continue
            self.optimiser_step()
            if not state.planned:
                plan_budget(cfg, state, self.budget, calibration, data.steps_per_epoch,
                            len(data.val_loader) / cfg.val_every,
                            self.t_start, self.set_epochs, bar, tqdm.write if self.master else None)
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{opt.optimizer.param_groups[-1]["lr"]:.2e}')
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 \
                    and state.step_in_epoch < data.steps_per_epoch:
                self.save_checkpoint(state.epoch, state.step_in_epoch)
        bar.close()
        return seen_before

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """Forward (the task's) and backward of one micro-batch, gradients all-reduced on its last one; the loss."""
        cfg, state, opt, device = self.cfg, self.state, self.opt, self.device
        blank = len(targets) == 0  # every image of the batch was unreadable: join DDP's all-reduce anyway
        if blank:
            images, targets = torch.zeros(2, *self.data.data_config['input_size']), torch.zeros(2, dtype=torch.long)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with nullcontext() if (not self.ddp or last_micro) else self.model.no_sync():
            with torch.autocast(device.type, dtype=opt.amp_dtype or torch.float32, enabled=opt.amp_dtype is not None):
                result = self.task(images, targets)
            loss = result['loss'] * (0. if blank else 1.)
            bad_loss = torch.tensor(float(not torch.isfinite(loss).item()), device=device)
            if self.ddp:  # every rank must stop together, or the others wait forever in all-reduce
                dist.all_reduce(bad_loss)
            if bad_loss.item():
                raise NonFiniteLossError(
                    f'the loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step_in_epoch + 1} '
                    f'(optimiser step {state.global_step + 1}); training stopped. The last good checkpoint is '
                    f'{self.ckpt_path} (continue with --resume); lower --lr or set --clip-grad.')
            opt.scaler.scale(loss / cfg.accum_steps).backward()
        count = 0 if blank else result.get('count', len(targets))
        state.running['loss_sum'] += loss.item() * count
        state.running['samples'] += count
        return loss

    def optimiser_step(self) -> None:
        cfg, state, opt = self.cfg, self.state, self.opt
        opt.scheduler.step_update(num_updates=state.global_step)  # this step's learning rate
        if cfg.clip_grad:
            opt.scaler.unscale_(opt.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.clip_grad)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += 1
        if opt.ema is not None:
            opt.ema.update(self.raw_model, step=state.global_step)

    # -- validation, records, checkpoints -------------------------------------------------------------------
    @property
    def saved_model(self) -> nn.Module:
        """What we validate and save: the EMA when there is one."""
        return self.opt.ema.module if self.opt.ema is not None else self.raw_model

    def validated(self, tta: str = 'none') -> Dict[str, Any]:
        """The task's held-out metrics of the saved model, summed over ranks."""
        from functools import partial
        from dynamixer.evaluate import evaluate
        metrics = evaluate(self.saved_model, self.data.val_loader, self.device, self.task.metrics(self.device),
                           infer=partial(self.task.infer, tta=tta), amp_dtype=self.opt.amp_dtype)
        self.warn_unreadable(metrics.unreadable)
        if self.ddp:
            for t in metrics.tensors():
                dist.all_reduce(t)
        return metrics.compute()

    def add_tta(self, record: Dict[str, Any]) -> str:
        """The last epoch's held-out metrics with the test-time augmentation, into its record; what to log."""
        augmented = self.task.record(self.validated(self.cfg.tta))
        record.update({f'{k}_tta': v for k, v in augmented.items() if k != 'val_images'}, tta=self.cfg.tta,
                      wall_min=(time.time() - self.t_start) / 60)
        score = self.task.score
        return f'  {score} with {self.cfg.tta} TTA {augmented[score]:.2f}%'

    def validate_and_save(self, train_time: float, seen: int, record: Optional[Dict[str, Any]] = None) -> None:
        """Validate (every --val-every epochs and after the last), reduce over ranks, log, save the model, metrics
        and checkpoint. ``record``: the epoch's record without validation, to validate now (the budget ended the
        schedule at it)."""
        cfg, state, task = self.cfg, self.state, self.task
        epoch = record['epoch'] if record else state.epoch + 1
        if record is None:
            stats = torch.tensor([state.running['loss_sum'], state.running['samples'], seen], dtype=torch.float64,
                                 device=self.device)
            if self.ddp:
                dist.all_reduce(stats)
            record = dict(epoch=epoch, train_loss=stats[0].item() / max(stats[1].item(), 1),
                          lr=self.opt.optimizer.param_groups[-1]['lr'],
                          img_per_sec=stats[2].item() / max(train_time, 1e-9), epoch_time=train_time)
        shown = ''
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            t_val = time.time()
            record.update(task.record(self.validated()))
            self.budget.val_s = time.time() - t_val  # the last epoch's TTA costs about this for each of its views
            shown = f'  {task.describe(record)}'
        record['wall_min'] = (time.time() - self.t_start) / 60
        tta = self.add_tta(record) if cfg.tta != 'none' and epoch == cfg.epochs else ''
        state.history.append(record)
        self.log(f'epoch {epoch}/{cfg.epochs}  train_loss {record["train_loss"]:.4f}{shown}'
                 f'  lr {record["lr"]:.2e}  {record["img_per_sec"]:.0f} img/s  {train_time:.1f}s{tta}')
        state.step_in_epoch = 0
        if self.master:
            if task.score in record and (record[task.score] > state.best or cfg.save_model == 'last'):
                state.best = max(state.best, record[task.score])
                task.save_model(self.saved_model, self.out / 'model')
            self.write_history()
        self.save_checkpoint(epoch, 0)

    def write_history(self) -> None:
        write_text(self.out / 'metrics.jsonl', ''.join(json.dumps(h) + '\n' for h in self.state.history))
        plot_curves(self.state.history, self.out / 'curves.png', self.task.curves)

    def save_checkpoint(self, epoch: int, step: int) -> None:
        """Called on every rank: each one's RNGs and running loss go in, so that a resumed DDP run is bitwise
        the run it continues; rank 0 writes."""
        state, opt = self.state, self.opt
        self.saved_at = (epoch, step)
        ranks = [dict(rng=rng_state(), running=dict(state.running))]
        if self.ddp:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, dict(rng=rng_state(), running=dict(state.running)))
        if not self.master:
            return
        ckpt = dict(model=self.raw_model.state_dict(), optimizer=opt.optimizer.state_dict(),
                    scheduler=opt.scheduler.state_dict(), scaler=opt.scaler.state_dict(),
                    ema=opt.ema.module.state_dict() if opt.ema is not None else None,
                    epoch=epoch, step_in_epoch=step, global_step=state.global_step, best=state.best,
                    history=state.history, running=state.running, rng=ranks[0]['rng'], ranks=ranks,
                    settings=json.dumps(vars(self.cfg)), planned=state.planned)
        atomic_write(self.ckpt_path, lambda tmp: torch.save(ckpt, tmp))

    def set_epochs(self, epochs: int) -> None:
        """A new schedule length, the same on every rank (rank 0's timing decides), saved for --resume."""
        if self.ddp:
            agreed = torch.tensor(epochs, device=self.device)
            dist.broadcast(agreed, 0)
            epochs = int(agreed.item())
        self.cfg.epochs, self.opt.scheduler = epochs, self.opt.make_scheduler(epochs)
        self.opt.scheduler.step_update(num_updates=self.state.global_step)  # a new scheduler starts at warm-up lr
        if self.master:
            save_settings(self.cfg, self.out)

    def warn_unreadable(self, bad, write=print) -> None:
        for b in bad:
            if b.path not in self.warned:
                self.warned.add(b.path)
                write(f'warning: skipped unreadable image {b.path} ({b.reason})', file=sys.stderr)

    def finish(self) -> None:
        """After the last epoch: the TTA measurement if the budget cut it, replicas checked, a summary line."""
        cfg, state, task = self.cfg, self.state, self.task
        if cfg.tta != 'none' and state.history and f'{task.score}_tta' not in state.history[-1]:
            # the budget ended the schedule at the epoch just validated: its TTA measurement is still the run's last
            self.log(f'epoch {state.history[-1]["epoch"]}{self.add_tta(state.history[-1])}')
            if self.master:
                self.write_history()
            self.save_checkpoint(state.epoch, 0)  # with the TTA in its history, a --resume of the finished run keeps it
        if self.ddp:  # data parallelism must end with identical replicas: say so, or stop loudly
            dist.barrier()  # rank 0 has written everything before anyone reports done
            hashes = [None] * self.world
            dist.all_gather_object(hashes, weights_hash(self.raw_model))
            if len(set(hashes)) > 1:
                raise RuntimeError(f'the {self.world} processes ended with different weights '
                                   f'({", ".join(h[:12] for h in hashes)}); the saved model is rank 0\'s. This is a '
                                   f'bug: please report it.')
            self.log(f'all {self.world} processes hold the same weights (sha256 {hashes[0][:12]})')
        n_bad = torch.tensor(float(len(self.warned)), device=self.device)
        if self.ddp:
            dist.all_reduce(n_bad)
        n_bad += self.data.n_skipped
        if n_bad.item():
            self.log(f'skipped {int(n_bad.item())} unreadable image(s) in all', file=sys.stderr)
        if state.history:
            last = state.history[-1][task.score]
            self.log(f'done: best {task.score_name} {state.best:.2f}%, last {last:.2f}%; model in '
                     f'{self.out / "model"}, metrics in {self.out / "metrics.jsonl"}')


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
