"""Evaluate a trained DynaMixer: top-1/top-5, loss, per-class accuracy and a confusion-matrix PNG.

``dynamixer eval --model-dir runs/digits/model --data digits`` evaluates the model folder that
``dynamixer train`` writes (timm's local-dir format) on a dataset's validation split, preprocessed the way
the model's own data config says. ``evaluate()`` is also the validation loop of training.
"""
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamixer.settings import TTA_MODES
from dynamixer.tasks.metrics import ConfusionMetrics


@torch.no_grad()
def tta_logits(model: nn.Module, images: torch.Tensor, tta: str = 'none') -> torch.Tensor:
    """The model's fp32 logits for ``images``, averaged over the views of ``tta`` (one of TTA_MODES): 'flip'
    averages each image and its mirror image; 'flip-shift' adds the pair translated by one pixel up-left and
    down-right (reflection padding), the pairs weighted 1/2, 1/4, 1/4 (the six views of airbench's CIFAR-10 TTA,
    Jordan 2024)."""
    if tta not in TTA_MODES:
        raise ValueError(f'tta must be one of {TTA_MODES}, got {tta!r}.')

    def with_mirror(x: torch.Tensor) -> torch.Tensor:
        return (model(x).float() + model(x.flip(-1)).float()) / 2

    if tta == 'none':
        return model(images).float()
    if tta == 'flip':
        return with_mirror(images)
    H, W = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode='reflect')
    shifted = (with_mirror(padded[..., :H, :W]) + with_mirror(padded[..., 2:, 2:])) / 2
    return (with_mirror(images) + shifted) / 2


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, metrics: ConfusionMetrics,
             infer: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False) -> ConfusionMetrics:
    """``metrics`` updated with the model's outputs over ``loader`` (``infer(model, images)``, plain ``model(images)``
    by default), and the unreadable images met on the way; not yet reduced over ranks."""
    from tqdm import tqdm
    model.eval()
    for images, targets, bad in tqdm(loader, desc='eval', disable=not progress, leave=False, dynamic_ncols=True):
        metrics.unreadable += bad
        if len(targets) == 0:
            continue
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = infer(model, images) if infer is not None else model(images)
        metrics.update(output.float(), targets)
    return metrics


def save_confusion_png(confusion: torch.Tensor, classes: Sequence[str], path: str, title: str = '') -> None:
    """Row-normalised confusion matrix (true class down, predicted across), written atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cm = confusion.cpu().double()
    cm = (cm / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    n = len(classes)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap='Blues', vmin=0, vmax=1)
    if n <= 30:  # beyond that the labels are unreadable anyway
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f'{cm[i, j]:.2f}', ha='center', va='center', fontsize=7,
                            color='white' if cm[i, j] > 0.5 else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: str) -> None:
    from dynamixer.io import atomic_write
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format='png', dpi=100))


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {name} asked for a GPU but torch sees none; use --device cpu.')
    return torch.device(name)


def run(args) -> None:
    from dynamixer.model_dir import load_model_dir, task_of
    device = resolve_device(args.device)
    model = load_model_dir(args.model_dir, device)
    if task_of(model) == 'segmentation':
        from dynamixer.tasks.segmentation import evaluate_command
        return evaluate_command(model, args, device)
    return _evaluate_classifier(model, args, device)


def _evaluate_classifier(model: nn.Module, args, device: torch.device) -> None:
    from functools import partial
    from timm.data import resolve_data_config
    from torch.utils.data import DataLoader
    from dynamixer.data import collate, eval_transform, load_splits
    from dynamixer.model_dir import label_names
    from dynamixer.tasks.metrics import ClassificationMetrics

    classes = label_names(model)
    if (Path(args.data) / 'trainannot').is_dir():
        raise ValueError(f'{args.data} is a segmentation dataset (it has trainannot/) but {args.model_dir} is a '
                         f'classification model; evaluate a segmentation model on it.')
    splits = load_splits(args.data, args.data_dir, args.val_split, args.split_seed, in_chans=model.in_chans)
    if splits.classes != classes:
        raise ValueError(f'the data has classes {splits.classes[:5]}... but the model was trained on '
                         f'{classes[:5]}...; evaluate on data with the same class folders.')
    val = splits.val
    val.transform = eval_transform(resolve_data_config(model=model))
    loader = DataLoader(val, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    sums = evaluate(model, loader, device, ClassificationMetrics(len(classes), device),
                    infer=partial(tta_logits, tta=args.tta), progress=sys.stderr.isatty())
    metrics = sums.compute()
    png = confusion_path(args)
    save_confusion_png(sums.confusion, classes, png, title=f'{splits.name} val: top-1 {metrics["top1"]:.2f}%')
    metrics.update(confusion_png=png, unreadable=len(sums.unreadable), tta=args.tta)
    for u in sums.unreadable:
        print(f'warning: skipped unreadable image {u.path} ({u.reason})', file=sys.stderr)
    if args.json:
        metrics['per_class'] = dict(zip(classes, metrics['per_class']))
        print(json.dumps(metrics))
        return
    print(f'{splits.name} val: {metrics["count"]} images  top-1 {metrics["top1"]:.2f}%  '
          f'top-5 {metrics["top5"]:.2f}%  loss {metrics["loss"]:.4f}{f"  ({args.tta} TTA)" if args.tta != "none" else ""}')
    print('per-class top-1:')
    width = max(len(c) for c in classes)
    for c, acc in zip(classes, metrics['per_class']):
        print(f'  {c:<{width}}  {acc:6.2f}%')
    if sums.unreadable:
        print(f'skipped {len(sums.unreadable)} unreadable images')
    print(f'confusion matrix: {png}')


def confusion_path(args) -> str:
    """--confusion, else beside the model: the run folder holds the plot, whether the run or its model/ is given.
    A shipped model's folder is inside the installed package, so its plot goes to the working directory instead."""
    from dynamixer.model_dir import SHIPPED_DIR, model_folder
    if args.confusion:
        return args.confusion
    folder = model_folder(args.model_dir)
    if folder is None or folder.resolve().is_relative_to(SHIPPED_DIR.resolve()):
        return f'confusion-{args.model_dir}.png'
    return str(folder.parent / 'confusion.png')
