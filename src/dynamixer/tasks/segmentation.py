"""Semantic segmentation as a task of the one training loop (``dynamixer.train``), and its eval / predict.

Data: a CamVid-style folder (``dynamixer.seg_data``), decoded once into a cache, augmented a whole batch at a
time (random scale, crop, flip); the model: any timm backbone under the FPN decoder of
``dynamixer.models.segmentation``; the loss: per-pixel cross-entropy with void ignored (optionally class
weighted, for the rare classes); the metrics: mean IoU, pixel accuracy, per-class IoU. Held-out images are
predicted whole at their own size, or in overlapping windows of the training crop (``--slide``, what
fixed-size backbones such as ViP need).
"""
import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamixer.tasks.metrics import SegmentationMetrics

VOID = 255
CLASS_WEIGHTS = ('none', 'median-freq', 'sqrt-median-freq')


def class_weights(labels: Sequence[torch.Tensor], num_classes: int, kind: str) -> Optional[torch.Tensor]:
    """Loss weights per class from the training labels' pixel frequencies: SegNet's median-frequency balancing
    (median frequency / the class's), or its square root (milder); classes never seen get the largest weight."""
    if kind == 'none':
        return None
    if kind not in CLASS_WEIGHTS:
        raise ValueError(f'class weights must be one of {", ".join(CLASS_WEIGHTS)}, got {kind!r}.')
    counts = sum(torch.bincount(label.flatten().long(), minlength=VOID + 1)[:num_classes].double()
                 for label in labels)
    freq = counts / counts.sum().clamp(min=1)
    seen = freq > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[seen] = freq[seen].median() / freq[seen]
    weights[~seen] = weights[seen].max() if seen.any() else 1.
    return (weights.sqrt() if kind == 'sqrt-median-freq' else weights).float()


def slide_logits(model: nn.Module, images: torch.Tensor, crop: Tuple[int, int],
                 stride: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Logits of whole images from overlapping windows of ``crop`` (mmsegmentation's ``slide`` mode), averaged
    where windows overlap; ``stride`` defaults to two thirds of the crop. Images smaller than the crop are padded
    (with 0, the mean colour) and the logits cropped back, so a fixed-size model sees only its own size."""
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    H, W = images.shape[-2:]
    padded = F.pad(images, (0, max(cw - W, 0), 0, max(ch - H, 0)))
    PH, PW = padded.shape[-2:]
    rows = [min(y, PH - ch) for y in range(0, max(PH - ch, 0) + sh, sh)]
    cols = [min(x, PW - cw) for x in range(0, max(PW - cw, 0) + sw, sw)]
    total, count = None, torch.zeros(1, 1, PH, PW, device=images.device)
    for y in sorted(set(rows)):
        for x in sorted(set(cols)):
            out = model(padded[..., y:y + ch, x:x + cw]).float()
            if total is None:
                total = torch.zeros(images.shape[0], out.shape[1], PH, PW, device=images.device)
            total[..., y:y + ch, x:x + cw] += out
            count[..., y:y + ch, x:x + cw] += 1
    return (total / count)[..., :H, :W]


def segment(model: nn.Module, images: torch.Tensor, tta: str = 'none', slide: Optional[Tuple[int, int]] = None
            ) -> torch.Tensor:
    """fp32 logits (B, classes, H, W) of ``images`` at their own size: whole, or in windows of ``slide``; with
    ``tta='flip'`` averaged with those of the mirror images (mirrored back)."""
    if tta not in ('none', 'flip'):
        raise ValueError(f"segmentation takes tta 'none' or 'flip', got {tta!r}.")

    def logits(x: torch.Tensor) -> torch.Tensor:
        return slide_logits(model, x, slide) if slide else model(x).float()
    out = logits(images)
    return (out + logits(images.flip(-1)).flip(-1)) / 2 if tta == 'flip' else out


def data_config(model: nn.Module) -> Dict[str, Any]:
    """Mean, std and training crop of a segmenter (its ``pretrained_cfg``, as training recorded it)."""
    cfg = model.pretrained_cfg
    return dict(mean=tuple(cfg['mean']), std=tuple(cfg['std']), crop_size=tuple(cfg.get('crop_size', (256, 256))))


class SegmentationTask:
    """Segmentation for the training loop: ``task(images, labels)`` returns ``dict(loss=..., output=...)``, the
    loss per labelled pixel (void ignored); ``model`` is set by the loop to what it calls."""

    name = 'segmentation'
    score = 'val_miou'
    score_name = 'val mIoU'
    curves = (('val_miou', 'val mIoU'), ('val_pixel_acc', 'val pixel accuracy'))

    def __init__(self, cfg: argparse.Namespace, log: Callable = print):
        if cfg.tta not in ('none', 'flip'):
            raise ValueError(f"--tta {cfg.tta} is for classification; segmentation takes --tta none or flip.")
        self.cfg, self.log = cfg, log
        self.model: Optional[nn.Module] = None
        self.classes: List[str] = []
        self.weight: Optional[torch.Tensor] = None
        self.crop: Tuple[int, int] = tuple(cfg.crop_size)
        self.slide = self.crop if cfg.slide else None

    def prepare_data(self, device: torch.device, rank: int, world: int) -> SimpleNamespace:
        """The segmenter (on ``device``) and its data: cached splits, batch loaders, step counts."""
        import time
        from dynamixer.seg_data import SegBatchLoader, default_cache_dir, load_seg_data
        from dynamixer.models.segmentation import Segmenter
        cfg = self.cfg
        t0 = time.time()
        seg = load_seg_data(cfg.data, cfg.val_split, cfg.split_seed, cfg.cache_dir or default_cache_dir(),
                            progress=cfg.progress and rank == 0)
        self.log(f'{seg.name}: {len(seg.train)} train / {len(seg.val)} val images decoded in {time.time() - t0:.1f}s')
        for message in seg.messages():
            print(f'warning: {message}', file=sys.stderr)
        self.classes = seg.classes
        try:
            model = Segmenter(cfg.model, num_classes=len(self.classes), decoder_channels=cfg.decoder_channels,
                              backbone_args=dict(drop_path_rate=cfg.drop_path, **(cfg.model_kwargs or {})))
        except TypeError as e:
            raise ValueError(f'bad --model-kwargs for {cfg.model}: {e}.') from None
        except RuntimeError as e:  # timm: unknown model; smp: a backbone without a 4- or 5-level pyramid
            raise ValueError(f'--model {cfg.model} cannot be a segmentation backbone: {e}') from None
        from timm.data import resolve_data_config
        backbone_cfg = resolve_data_config(model=model.backbone)
        mean, std = backbone_cfg['mean'], backbone_cfg['std']
        model.pretrained_cfg = dict(task='segmentation', mean=tuple(mean), std=tuple(std), crop_size=self.crop,
                                    input_size=(3, *self.crop), num_classes=len(self.classes),
                                    label_names=list(self.classes))
        if cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        model.to(device)
        weight = class_weights(seg.train.labels, len(self.classes), cfg.class_weights)
        self.weight = None if weight is None else weight.to(device)
        if weight is not None:
            self.log('class weights: ' + ', '.join(f'{c} {w:.2f}' for c, w in zip(self.classes, weight.tolist())))

        if cfg.batch_size % (world * cfg.accum_steps):
            raise ValueError(f'--batch-size {cfg.batch_size} (the total per optimiser step) is not divisible by '
                             f'{world} processes x {cfg.accum_steps} accumulation steps; adjust one of them.')
        micro_batch = cfg.batch_size // (world * cfg.accum_steps)
        loader = SegBatchLoader(seg.train, micro_batch, mean, std, train=True, crop_size=self.crop,
                                scale=tuple(cfg.scale), hflip=0.5 if cfg.hflip is None else cfg.hflip, seed=cfg.seed,
                                rank=rank, world=world)
        val_loader = SegBatchLoader(seg.val, max(1, micro_batch // 2), mean, std, train=False, rank=rank, world=world)
        return SimpleNamespace(model=model, splits=SimpleNamespace(name=seg.name, train=seg.train, val=seg.val),
                               classes=self.classes, data_config=dict(input_size=(3, *self.crop)),
                               micro_batch=micro_batch, sampler=None, n_skipped=0, loader_rng=torch.Generator(),
                               loader=loader, val_loader=val_loader, steps_per_epoch=len(loader) // cfg.accum_steps)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        output = self.model(images)
        loss = F.cross_entropy(output.float(), labels, weight=self.weight, ignore_index=VOID)
        return dict(loss=loss, output=output, count=len(labels))

    __call__ = forward

    def metrics(self, device: torch.device) -> SegmentationMetrics:
        return SegmentationMetrics(len(self.classes), device, ignore_index=VOID)

    def infer(self, model: nn.Module, images: torch.Tensor, tta: str = 'none') -> torch.Tensor:
        return segment(model, images, tta, self.slide)

    def record(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        return dict(val_loss=metrics['loss'], val_miou=metrics['miou'], val_pixel_acc=metrics['pixel_acc'],
                    val_iou=dict(zip(self.classes, metrics['iou'])), val_pixels=metrics['count'])

    @staticmethod
    def describe(record: Dict[str, Any]) -> str:
        return (f'val_loss {record["val_loss"]:.4f}  val_miou {record["val_miou"]:.2f}%  '
                f'val_pixel_acc {record["val_pixel_acc"]:.2f}%')

    def save_model(self, model: nn.Module, folder: Path) -> None:
        from dynamixer.model_dir import save_model_dir
        save_model_dir(model, folder, self.classes)


# ----------------------------------------------------------------------------------------------------------
# dynamixer eval and predict for a segmentation model folder

def _resized(split, size: Optional[Sequence[int]]):
    """The split with every image resized to ``size`` (H, W; bilinear) and its labels (nearest), or as it is."""
    if not size:
        return split
    from dynamixer.seg_data import SegSplit
    h, w = size
    images = [F.interpolate(im[None].float(), size=(h, w), mode='bilinear', align_corners=False).round().clamp(0, 255)
              .to(torch.uint8)[0] for im in split.images]
    labels = [F.interpolate(lb[None, None].float(), size=(h, w), mode='nearest')[0, 0].to(torch.uint8)
              for lb in split.labels]
    return SegSplit(images, labels, split.names, split.skipped)


def evaluate_command(model: nn.Module, args, device: torch.device) -> None:
    """``dynamixer eval`` of a segmentation model: mIoU, pixel accuracy and per-class IoU over the held-out
    images at their own size (or ``--resize``d), and a confusion-matrix PNG."""
    from dynamixer.evaluate import confusion_path, evaluate, save_confusion_png
    from dynamixer.model_dir import label_names
    from dynamixer.seg_data import SegBatchLoader, is_segmentation_folder, load_seg_data
    if args.tta not in ('none', 'flip'):
        raise ValueError(f'--tta {args.tta} is for classification; {args.model_dir} is a segmentation model, which '
                         f'takes --tta none or flip.')
    if not is_segmentation_folder(args.data):
        raise ValueError(f'{args.model_dir} is a segmentation model but {args.data} is not a segmentation folder '
                         f'(train/, trainannot/, val/, valannot/, classes.txt); give one with --data.')
    classes = label_names(model)
    seg = load_seg_data(args.data, args.val_split, args.split_seed, progress=sys.stderr.isatty())
    if seg.classes != classes:
        raise ValueError(f'the data has classes {seg.classes[:5]}... but the model was trained on {classes[:5]}...; '
                         f'evaluate on data with the same classes.txt.')
    for message in seg.messages():
        print(f'warning: {message}', file=sys.stderr)
    config = data_config(model)
    val = _resized(seg.val, args.resize)
    loader = SegBatchLoader(val, min(args.batch_size, 4), config['mean'], config['std'], train=False)
    slide = config['crop_size'] if args.slide else None
    metrics = evaluate(model, loader, device, SegmentationMetrics(len(classes), device, VOID),
                       infer=lambda m, x: segment(m, x, args.tta, slide),
                       progress=sys.stderr.isatty())
    result = metrics.compute()
    png = confusion_path(args)
    save_confusion_png(metrics.confusion, classes, png, title=f'{seg.name} val: mIoU {result["miou"]:.2f}%')
    sizes = sorted({tuple(im.shape[-2:]) for im in val.images})
    out = dict(miou=result['miou'], pixel_acc=result['pixel_acc'], iou=dict(zip(classes, result['iou'])),
               loss=result['loss'], images=len(val), sizes=[list(s) for s in sizes], slide=bool(args.slide),
               tta=args.tta, confusion_png=png)
    if args.json:
        print(json.dumps(out))
        return
    print(f'{seg.name} val: {len(val)} images at {", ".join(f"{h}x{w}" for h, w in sizes)}'
          f'{" (sliding windows)" if slide else ""}  mIoU {out["miou"]:.2f}%  pixel accuracy {out["pixel_acc"]:.2f}%  '
          f'loss {out["loss"]:.4f}')
    print('per-class IoU:')
    width = max(len(c) for c in classes)
    for c, v in out['iou'].items():
        print(f'  {c:<{width}}  {v:6.2f}%' if not math.isnan(v) else f'  {c:<{width}}     -  (not in the data)')
    print(f'confusion matrix: {png}')


def palette(num_classes: int) -> torch.Tensor:
    """A distinct colour per class (uint8, (num_classes, 3)): matplotlib's tab20, then evenly spaced hues."""
    import matplotlib
    colours = [matplotlib.colormaps['tab20'](i)[:3] for i in range(min(num_classes, 20))]
    colours += [matplotlib.colors.hsv_to_rgb((i / max(num_classes - 20, 1), 0.8, 0.9))
                for i in range(num_classes - len(colours))]
    return (torch.tensor(colours) * 255).round().to(torch.uint8)


@torch.no_grad()
def predict_masks(model: nn.Module, paths: Sequence[str], output: Path, device: torch.device,
                  slide: bool = False) -> List[Dict[str, Any]]:
    """For each image: ``output/STEM.png``, the class index of every pixel (8-bit, single channel, the image's own
    size: the labels' format) and ``output/STEM_overlay.jpg`` (class colours over the image); one record each."""
    import numpy as np
    from PIL import Image
    from dynamixer.data import open_image
    from dynamixer.io import atomic_write
    from dynamixer.model_dir import label_names
    config = data_config(model)
    mean = torch.tensor(config['mean']).view(1, 3, 1, 1) * 255
    std = torch.tensor(config['std']).view(1, 3, 1, 1) * 255
    classes = label_names(model)
    colours = palette(len(classes))
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        image, _ = open_image(path, dict(input_size=(3, *config['crop_size'])))
        pixels = torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)[None]
        x = ((pixels.float() - mean) / std).to(device)
        mask = segment(model, x, slide=config['crop_size'] if slide else None).argmax(1)[0].to(torch.uint8).cpu()
        stem = Path(path).stem
        mask_path, overlay_path = output / f'{stem}.png', output / f'{stem}_overlay.jpg'
        atomic_write(mask_path, lambda tmp: Image.fromarray(mask.numpy(), mode='L').save(tmp, format='PNG'))
        blend = (0.5 * pixels[0].permute(1, 2, 0).float() + 0.5 * colours[mask.long()].float()).round().to(torch.uint8)
        atomic_write(overlay_path, lambda tmp: Image.fromarray(blend.numpy()).save(tmp, format='JPEG', quality=90))
        counts = torch.bincount(mask.flatten().long(), minlength=len(classes)).double()
        share = {classes[i]: round(v * 100, 2) for i, v in enumerate((counts / counts.sum()).tolist()) if v > 0}
        results.append(dict(file=path, mask=str(mask_path), overlay=str(overlay_path), size=list(mask.shape),
                            classes=dict(sorted(share.items(), key=lambda kv: -kv[1]))))
    return results
