"""Image classification as a task of the one training loop (``dynamixer.train``).

Data: scikit-learn's digits, CIFAR-10/100 or an image folder (``dynamixer.data``), small images decoded once
into a cached tensor (``dynamixer.tensor_data``); the model: a DynaMixer variant or any timm model
(``dynamixer.catalog``); the loss: cross-entropy with label smoothing or timm's mixup / cutmix; the metrics:
top-1 / top-5 and a confusion matrix; held-out images optionally seen with test-time augmentation.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from dynamixer.settings import DIGITS_MODEL_KWARGS
from dynamixer.tasks.metrics import ClassificationMetrics


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


class ClassificationTask:
    """Classification for the training loop: ``task(images, targets)`` returns ``dict(loss=..., output=...)``
    (the loop backpropagates ``loss``); ``model`` is set by the loop to what it calls (compiled, DDP-wrapped)."""

    name = 'classification'
    score = 'val_top1'  # what --save-model best selects on (higher is better)
    score_name = 'val top-1'
    curves = (('val_top1', 'val top-1'), ('val_top5', 'val top-5'))

    def __init__(self, cfg: argparse.Namespace, log: Callable = print):
        self.cfg, self.log = cfg, log
        self.model: Optional[nn.Module] = None
        self.classes: List[str] = []
        self.mixup, self.loss_fn = None, nn.CrossEntropyLoss()

    def prepare_data(self, device: torch.device, rank: int, world: int) -> SimpleNamespace:
        """The model (on ``device``) and what feeds it; sets the classes, and the loss they call for."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        data = prepare_data(self.cfg, device, rank, world, self.log)
        self.classes, cfg = data.classes, self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=len(self.classes))
            self.loss_fn = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
        return data

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        soft = targets
        if self.mixup is not None:
            if len(targets) % 2:  # mixup pairs images: drop one when a skipped image left an odd batch
                images, targets = images[:-1], targets[:-1]
            images, soft = self.mixup(images, targets)
        output = self.model(images)
        return dict(loss=self.loss_fn(output, soft), output=output, count=len(targets))

    __call__ = forward

    def metrics(self, device: torch.device) -> ClassificationMetrics:
        return ClassificationMetrics(len(self.classes), device)

    @staticmethod
    def infer(model: nn.Module, images: torch.Tensor, tta: str = 'none') -> torch.Tensor:
        from dynamixer.evaluate import tta_logits
        return tta_logits(model, images, tta)

    @staticmethod
    def record(metrics: Dict[str, Any]) -> Dict[str, Any]:
        """An epoch's held-out figures, as metrics.jsonl records them."""
        return dict(val_loss=metrics['loss'], val_top1=metrics['top1'], val_top5=metrics['top5'],
                    val_images=metrics['count'])

    @staticmethod
    def describe(record: Dict[str, Any]) -> str:
        return f'val_loss {record["val_loss"]:.4f}  val_top1 {record["val_top1"]:.2f}%  val_top5 {record["val_top5"]:.2f}%'

    def save_model(self, model: nn.Module, folder: Path) -> None:
        from dynamixer.model_dir import save_model_dir
        save_model_dir(model, folder, self.classes)
