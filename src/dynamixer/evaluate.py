"""Evaluate a trained DynaMixer: top-1/top-5, loss, per-class accuracy and a confusion-matrix PNG.

``dynamixer eval --model-dir runs/digits/model --data digits`` evaluates the model folder that
``dynamixer train`` writes (timm's local-dir format) on a dataset's validation split, preprocessed the way
the model's own data config says. ``evaluate()`` is also the validation loop of training.
"""
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamixer.settings import TTA_MODES


def load_model_dir(path: str, device: str = 'cpu') -> nn.Module:
    """The model in a timm local-dir folder (config.json + model.safetensors), weights loaded, in eval mode.

    A training run's output folder works too (its ``model/`` is used), and so does the name of a model whose
    weights ship with the package (``dynamixer_cifar_xs.cifar10_1h``).
    """
    import timm
    import dynamixer  # registers the architectures with timm
    folder = model_folder(path)
    if folder is None:  # weights shipped with the package
        return timm.create_model(path, pretrained=True).to(device).eval()
    architecture = json.loads((folder / 'config.json').read_text()).get('architecture')
    if architecture and architecture not in dynamixer.list_models() and (folder / 'model.safetensors').is_file():
        from dynamixer.catalog import load_timm_folder  # a peer from timm, trained by dynamixer train
        return load_timm_folder(folder).to(device).eval()
    model = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True)
    return model.to(device).eval()


# The weight files timm's local-dir loader looks for, in its order of preference.
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')


def model_folder(path: str) -> Optional[Path]:
    """The timm model folder that ``path`` names (itself, or a training run's ``model/``), checked; None for
    the name of weights shipped with the package."""
    import timm
    folder = Path(path)
    if not folder.exists() and path in timm.list_pretrained('dynamixer*'):
        return None
    if not (folder / 'config.json').is_file() and (folder / 'model' / 'config.json').is_file():
        folder = folder / 'model'
    if not folder.is_dir():
        raise FileNotFoundError(f'model folder {path!r} does not exist; give the model/ folder of a training run '
                                f'(config.json + model.safetensors), e.g. runs/digits/model.')
    if not (folder / 'config.json').is_file():
        raise ValueError(f'{path!r} has no config.json; give the model/ folder that dynamixer train writes '
                         f'(e.g. runs/digits/model).')
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        unfinished = (folder.parent / 'args.yaml').is_file()
        raise ValueError(f'{path!r} has no weights ({" or ".join(WEIGHT_FILES[:2])})'
                         + ('; the training run that wrote it did not finish an epoch.' if unfinished else '.'))
    return folder


def label_names(model: nn.Module) -> List[str]:
    names = model.pretrained_cfg.get('label_names')
    return list(names) if names else [str(i) for i in range(model.num_classes)]


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
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False, tta: str = 'none') -> Dict[str, Any]:
    """Sums of loss, top-1/top-5 hits and the confusion matrix over ``loader`` (not yet averaged, so that
    ranks can add theirs up), plus the unreadable images met on the way; ``tta`` as in ``tta_logits``."""
    from tqdm import tqdm
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)  # [true, predicted]
    unreadable = []
    k = min(5, num_classes)
    for images, targets, bad in tqdm(loader, desc='eval', disable=not progress, leave=False, dynamic_ncols=True):
        unreadable += bad
        if len(targets) == 0:
            continue
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = tta_logits(model, images, tta)
        loss_sum += F.cross_entropy(logits, targets, reduction='sum').double()
        top = logits.topk(k, dim=1).indices
        hits[0] += (top[:, 0] == targets).sum()
        hits[1] += (top == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + top[:, 0], minlength=num_classes ** 2).view(
            num_classes, num_classes).double()
    return dict(loss_sum=loss_sum, hits=hits, confusion=confusion, unreadable=unreadable)


def summarize(sums: Dict[str, Any]) -> Dict[str, Any]:
    """Averages (percent for accuracies) from ``evaluate`` sums."""
    confusion = sums['confusion'].cpu()
    n = confusion.sum().item()
    if n == 0:
        raise ValueError('no readable validation images; check the data folder.')
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1) * 100).tolist()
    return dict(loss=sums['loss_sum'].item() / n, top1=sums['hits'][0].item() / n * 100,
                top5=sums['hits'][1].item() / n * 100, count=int(n), per_class=per_class)


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
    from timm.data import resolve_data_config
    from torch.utils.data import DataLoader
    from dynamixer.data import collate, eval_transform, load_splits

    device = resolve_device(args.device)
    model = load_model_dir(args.model_dir, device)
    classes = label_names(model)
    splits = load_splits(args.data, args.data_dir, args.val_split, args.split_seed, in_chans=model.in_chans)
    if splits.classes != classes:
        raise ValueError(f'the data has classes {splits.classes[:5]}... but the model was trained on '
                         f'{classes[:5]}...; evaluate on data with the same class folders.')
    val = splits.val
    val.transform = eval_transform(resolve_data_config(model=model))
    loader = DataLoader(val, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    sums = evaluate(model, loader, device, len(classes), progress=sys.stderr.isatty(), tta=args.tta)
    metrics = summarize(sums)
    folder = model_folder(args.model_dir)  # the run folder holds the plot, whether the run or its model/ is given
    png = args.confusion or str(folder.parent / 'confusion.png' if folder else f'confusion-{args.model_dir}.png')
    save_confusion_png(sums['confusion'], classes, png,
                       title=f'{splits.name} val: top-1 {metrics["top1"]:.2f}%')
    metrics.update(confusion_png=png, unreadable=len(sums['unreadable']), tta=args.tta)
    for u in sums['unreadable']:
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
    if sums['unreadable']:
        print(f'skipped {len(sums["unreadable"])} unreadable images')
    print(f'confusion matrix: {png}')
