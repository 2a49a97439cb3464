"""Semantic segmentation data: image/label-map folders decoded once, cached, and augmented a batch at a time.

A segmentation folder (CamVid's SegNet layout) holds ``train/`` and ``trainannot/``, optionally ``val/`` and
``valannot/``, and ``classes.txt`` (line k names label value k). Images are any of ``data.IMG_EXTENSIONS``;
label maps are single-channel lossless images (PNG) of class indices with the image's file stem. Every label
value with no line in ``classes.txt`` is void (stored as 255) and is ignored by the loss and the metrics.

As in ``tensor_data``, a folder is decoded once into uint8 tensors and cached on disk, keyed by the files'
names, sizes and modification times; unreadable pairs are skipped (and reported every time the cache is used),
and mistakes in the layout stop with one line that says what to do. ``SegBatchLoader`` scales, crops and flips
whole batches of images and labels together with one ``affine_grid`` per batch.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dynamixer.data import IMG_EXTENSIONS, Unreadable
from dynamixer.io import atomic_write, default_cache_dir

VOID = 255
CACHE_VERSION = 1
# JPEG (and lossy WebP) blur edges into values that are other classes, so label maps must be lossless
LABEL_EXTENSIONS = ('.png', '.bmp', '.pgm', '.ppm', '.tif', '.tiff')
_COLOUR = 'is a colour label map'  # marks the skip reason, so that "all labels are colour" can be told apart


@dataclass
class SegSplit:
    """Images (each (3, H, W) uint8) with their label maps (each (H, W) uint8, void 255), by file stem."""
    images: List[torch.Tensor]
    labels: List[torch.Tensor]
    names: List[str]
    skipped: List[Unreadable] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int], skipped: Optional[List[Unreadable]] = None) -> 'SegSplit':
        return SegSplit([self.images[i] for i in indices], [self.labels[i] for i in indices],
                        [self.names[i] for i in indices], list(skipped or []))


@dataclass
class SegData:
    """Train and validation splits of a segmentation folder; ``warnings`` are for the user to read."""
    train: SegSplit
    val: SegSplit
    classes: List[str]
    name: str
    warnings: List[str] = field(default_factory=list)

    def messages(self) -> List[str]:
        """Every warning line to print: the skipped pairs, then the rest."""
        return ([f'skipped {u.path} ({u.reason})' for u in self.train.skipped + self.val.skipped]
                + list(self.warnings))


def is_segmentation_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / 'trainannot').is_dir()


def read_classes(root: Path) -> List[str]:
    """The class names of ``root/classes.txt``; blank lines at the end are ignored, elsewhere an error (they
    would shift every later label value onto the wrong name)."""
    path = Path(root) / 'classes.txt'
    if not path.is_file():
        raise ValueError(f'{path} is missing; write the class names there, one a line (line k names label value '
                         f'k, counting from 0).')
    lines = [line.strip() for line in path.read_text(encoding='utf-8').splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f'{path} has an empty line (line {empty[0]}); line k names label value k, so give every '
                         f'value a name.')
    seen: Dict[str, int] = {}
    for i, name in enumerate(lines):
        if name in seen:
            raise ValueError(f'{path} names {name!r} twice (lines {seen[name] + 1} and {i + 1}); class names must '
                             f'be unique.')
        seen[name] = i
    if len(lines) < 2:
        raise ValueError(f'{path} names {len(lines)} class(es); segmentation needs at least 2, one a line.')
    if len(lines) >= VOID:
        raise ValueError(f'{path} names {len(lines)} classes; at most {VOID - 1} fit (label value {VOID} is void).')
    return lines


def _files(folder: Path, extensions: Tuple[str, ...], what: str) -> Dict[str, Path]:
    """File stem -> path of the ``extensions`` files directly in ``folder``."""
    found: Dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith('.') or not entry.is_file():
            continue
        path = Path(entry.path)
        suffix = path.suffix.lower()
        if suffix not in extensions:
            if suffix in IMG_EXTENSIONS:  # an image kind that cannot hold exact class indices
                raise ValueError(f'{path} is a {suffix} {what}; label maps must be lossless single-channel PNGs '
                                 f'(lossy compression turns class indices into other classes).')
            continue
        if path.stem in found:
            raise ValueError(f'{folder} holds two {what}s named {path.stem!r} ({found[path.stem].name} and '
                             f'{path.name}); keep one.')
        found[path.stem] = path
    return found


def _stems(stems: Sequence[str]) -> str:
    return ', '.join(stems[:3]) + (', ...' if len(stems) > 3 else '')


def scan_pairs(images_dir: Path, labels_dir: Path) -> List[Tuple[str, Path, Path]]:
    """(stem, image, label map) of every image in ``images_dir``, sorted by stem."""
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise ValueError(f'{folder} is missing; a segmentation folder holds {images_dir.name}/ (images) and '
                             f'{labels_dir.name}/ (label maps of the same file names).')
    images = _files(images_dir, IMG_EXTENSIONS, 'image')
    labels = _files(labels_dir, LABEL_EXTENSIONS, 'label map')
    if not images:
        raise ValueError(f'no images found in {images_dir}; expected {", ".join(IMG_EXTENSIONS[:3])}... files with '
                         f'label maps of the same name in {labels_dir}.')
    for missing, there, here, kind in ((sorted(set(images) - set(labels)), images_dir, labels_dir, 'label map'),
                                       (sorted(set(labels) - set(images)), labels_dir, images_dir, 'image')):
        if missing:
            raise ValueError(f'{len(missing)} file(s) in {there} have no {kind} of the same name in {here} '
                             f'({_stems(missing)}); add the {kind}s or remove those files.')
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


class _ColourLabel(ValueError):
    pass


def read_label(path: Path) -> np.ndarray:
    """The class indices of a label map, (H, W). Palette PNGs give their indices (their palette is only for
    viewing); a colour image whose channels all agree is grey and gives that channel; other colour images
    cannot be read as indices and raise ``_ColourLabel``."""
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        if image.mode in ('L', 'P', '1') or image.mode.startswith('I'):
            return np.asarray(image)
        rgb = np.asarray(image.convert('RGB'))
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
        raise _ColourLabel(f'{_COLOUR} ({image.mode}); label maps must be single-channel images of class indices '
                           f'(0 to K-1, void {VOID}), not colour-coded classes')
    return rgb[..., 0]


def _fingerprint(pairs: Sequence[Tuple[str, Path, Path]], num_classes: int) -> str:
    """Names, byte sizes and modification times of every file, plus the number of classes (it decides void)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, num_classes]).encode())
    for _, image, label in pairs:
        for path in (image, label):
            st = os.stat(path)
            h.update(f'{path}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:20]


def _decode(pairs: Sequence[Tuple[str, Path, Path]], num_classes: int, progress: bool
            ) -> Tuple[SegSplit, List[Tuple[str, List[int]]]]:
    """The split, and for each label map that holds values beyond the classes other than the usual void values
    (``num_classes`` and 255), its path and those values."""
    from PIL import Image
    from tqdm import tqdm
    split, beyond = SegSplit([], [], [], []), []
    for stem, image_path, label_path in tqdm(pairs, desc='decoding images', unit='img', disable=not progress,
                                             leave=False):
        try:
            with Image.open(image_path) as image:
                image.load()
                # EXIF orientation is deliberately not applied: label maps are drawn on the stored pixels
                rgb = np.array(image.convert('RGB'))  # a writable copy, for torch
        except Exception as e:  # PIL raises many types for a bad file
            split.skipped.append(Unreadable(str(image_path), f'{type(e).__name__}: {e}'))
            continue
        try:
            values = read_label(label_path)
        except _ColourLabel as e:
            split.skipped.append(Unreadable(str(label_path), str(e)))
            continue
        except Exception as e:
            split.skipped.append(Unreadable(str(label_path), f'{type(e).__name__}: {e}'))
            continue
        if values.shape != rgb.shape[:2]:
            split.skipped.append(Unreadable(str(label_path), (
                f'label map is {values.shape[1]}x{values.shape[0]} but its image {image_path} is '
                f'{rgb.shape[1]}x{rgb.shape[0]} (width x height); they must be the same size')))
            continue
        outside = values >= num_classes
        if outside.any():
            odd = sorted(set(np.unique(values[outside]).tolist()) - {num_classes, VOID})
            if odd:
                beyond.append((str(label_path), [int(v) for v in odd]))
        split.images.append(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        split.labels.append(torch.from_numpy(np.where(outside, VOID, values).astype(np.uint8)))
        split.names.append(stem)
    return split, beyond


def _valid(saved: dict) -> bool:
    images, labels, names = saved['images'], saved['labels'], saved['names']
    return len(images) == len(labels) == len(names) and all(
        i.dtype == torch.uint8 and l.dtype == torch.uint8 and i.dim() == 3 and i.shape[0] == 3
        and i.shape[1:] == l.shape for i, l in zip(images, labels))


def cache_split(pairs: Sequence[Tuple[str, Path, Path]], num_classes: int, cache_dir: Path, progress: bool = False,
                notes: Optional[List[str]] = None) -> Tuple[SegSplit, List[Tuple[str, List[int]]], Optional[Path], bool]:
    """``_decode`` through the cache: (split, values beyond the classes, cache file or None when it could not be
    written (said in ``notes``), built now)."""
    path = Path(cache_dir) / f'seg-{_fingerprint(pairs, num_classes)}.pt'
    if path.is_file():
        try:
            saved = torch.load(path, map_location='cpu', weights_only=True)
            if _valid(saved):
                split = SegSplit(saved['images'], saved['labels'], saved['names'],
                                 [Unreadable(p, r) for p, r in saved['skipped']])
                return split, [(p, list(v)) for p, v in saved['beyond']], path, False
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    split, beyond = _decode(pairs, num_classes, progress)
    state = dict(images=split.images, labels=split.labels, names=split.names,
                 skipped=[(u.path, u.reason) for u in split.skipped], beyond=beyond)
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:  # a read-only or full cache folder costs the next run a decode, not this run
        if notes is not None:
            notes.append(f'could not write the decoded-image cache {path} ({e}); the images will be decoded again '
                         f'next time (set --cache-dir to a writable folder).')
        return split, beyond, None, True
    return split, beyond, path, True


def _check_not_empty(split: SegSplit, images_dir: Path, labels_dir: Path) -> None:
    if len(split):
        return
    reasons = [u.reason for u in split.skipped]
    if reasons and all(_COLOUR in r for r in reasons):
        raise ValueError(f'every label map in {labels_dir} is a colour image; label maps must be single-channel '
                         f'PNGs of class indices (0 to K-1 as in classes.txt, void {VOID}): convert the colours to '
                         f'indices first.')
    first = split.skipped[0]
    raise ValueError(f'none of the {len(reasons)} image/label pairs of {images_dir} and {labels_dir} could be read '
                     f'(first: {first.path}: {first.reason}).')


def _beyond_warning(labels_dir: Path, beyond: List[Tuple[str, List[int]]], classes: List[str]) -> str:
    values = sorted({v for _, vs in beyond for v in vs})
    shown = ', '.join(map(str, values[:12])) + (', ...' if len(values) > 12 else '')
    examples = '; '.join(f'{p} ({", ".join(map(str, vs[:6]))}{", ..." if len(vs) > 6 else ""})'
                         for p, vs in beyond[:3])
    return (f'{len(beyond)} label map(s) in {labels_dir} hold values beyond the {len(classes)} classes of '
            f'classes.txt ({shown}), e.g. {examples}; those pixels are treated as void. If they are classes, '
            f'name them in classes.txt; if the labelling has more classes than classes.txt, map them first.')


def hold_out(split: SegSplit, fraction: float, seed: int) -> Tuple[SegSplit, SegSplit]:
    """A seeded random ``fraction`` of ``split`` held out: (rest, held out), each in the original order."""
    if not 0. < fraction < 1.:
        raise ValueError(f'--val-split must be a fraction between 0 and 1, got {fraction}.')
    n = len(split)
    count = max(1, round(n * fraction))
    if count >= n:
        raise ValueError(f'cannot hold out {fraction:.0%} of {n} training image(s) and keep some to train on; '
                         f'add a val/ and valannot/ folder or use a smaller --val-split.')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    rest = sorted(order[count:])
    return split.subset(rest, split.skipped), split.subset(held)


def load_seg_data(root, val_split: float = 0., split_seed: int = 0, cache_dir: Optional[Path] = None,
                  progress: bool = False) -> SegData:
    """The segmentation folder ``root`` decoded (through the cache in ``cache_dir``) into train and validation
    splits; with ``val_split`` a seeded fraction of train/ is held out for validation instead of val/."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f'data directory {str(root)!r} does not exist; a segmentation folder holds train/, '
                         f'trainannot/, val/, valannot/ and classes.txt.')
    if not 0. <= val_split < 1.:
        raise ValueError(f'--val-split must be a fraction between 0 and 1, got {val_split}.')
    classes = read_classes(root)
    has_val = (root / 'val').is_dir() or (root / 'valannot').is_dir()
    if not val_split and not has_val:
        raise ValueError(f'{root} has no val/ folder; add val/ and valannot/, or hold out part of the training '
                         f'images with --val-split 0.1.')
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    folders = [('train', 'trainannot')] + ([('val', 'valannot')] if not val_split else [])
    splits, warnings = [], []
    for images_name, labels_name in folders:
        images_dir, labels_dir = root / images_name, root / labels_name
        pairs = scan_pairs(images_dir, labels_dir)
        split, beyond, _, _ = cache_split(pairs, len(classes), cache_dir, progress, warnings)
        _check_not_empty(split, images_dir, labels_dir)
        if beyond:
            warnings.append(_beyond_warning(labels_dir, beyond, classes))
        splits.append(split)
    train, val = hold_out(splits[0], val_split, split_seed) if val_split else splits
    return SegData(train, val, classes, root.name, warnings)


def crop_batch(images: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor, y0: torch.Tensor,
               x0: torch.Tensor, flips: torch.Tensor, crop_size: Tuple[int, int]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image b scaled by ``scales[b]``, cropped to ``crop_size`` at (y0[b], x0[b]) (pixels of the scaled image,
    negative or past its end where the crop reaches beyond it) and flipped where ``flips[b]``: one sampling
    grid for the batch, bilinear for ``images`` (normalised, so that 0 outside them is the mean colour) and
    nearest for ``labels`` ((B, H, W) uint8, void 255 outside them). Returns (images, labels int64)."""
    B, _, H, W = images.shape
    ch, cw = crop_size
    s = scales.double()
    # output pixel centre j + 0.5 of the crop is x0 + j + 0.5 in the scaled image, (x0 + j + 0.5) / s in the
    # input; written in grid_sample's [-1, 1] coordinates (align_corners=False) of both
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flips, -1., 1.) * cw / (s * W)
    theta[:, 0, 2] = (2 * x0.double() + cw) / (s * W) - 1
    theta[:, 1, 1] = ch / (s * H)
    theta[:, 1, 2] = (2 * y0.double() + ch) / (s * H) - 1
    grid = F.affine_grid(theta, [B, 1, ch, cw], align_corners=False).to(images.dtype)
    out = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # sampled as VOID - label, so that grid_sample's zeros beyond the input come back as void
    flipped = (VOID - labels.to(images.dtype))[:, None]
    sampled = F.grid_sample(flipped, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    return out, VOID - sampled[:, 0].round().long()


class SegBatchLoader:
    """Batches of a ``SegSplit``: ``(images float32 (B, 3, h, w) normalised with mean/std, labels int64 (B, h, w)
    with void 255, [])``.

    Training: shuffled per epoch from (seed, epoch); each image is scaled by a log-uniform factor in ``scale``,
    cropped to ``crop_size`` at a random position and flipped with probability ``hflip``, all drawn for the
    whole epoch up front, so that an image's augmentation depends neither on the batch size nor on ``start``
    (batches skipped when resuming mid-epoch). Where a crop reaches beyond its image, the image is the mean
    colour (0) and the label void. Validation: whole images at their own size, consecutive images of one size
    batched together; rank r of ``world`` takes every world-th image (training: its share of the shuffle).
    """

    def __init__(self, split: SegSplit, batch_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 crop_size: Tuple[int, int] = (256, 256), scale: Tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: Optional[bool] = None):
        if batch_size < 1:
            raise ValueError(f'batch size must be at least 1, got {batch_size}.')
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f'crop size must be two positive sizes (height, width), got {crop_size}.')
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f'scale must be (low, high) with 0 < low <= high, got {scale}.')
        if not 0 <= rank < world:
            raise ValueError(f'rank {rank} is not one of the {world} ranks.')
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.crop_size, self.scale, self.hflip = (int(crop_size[0]), int(crop_size[1])), tuple(scale), hflip
        self.rank, self.world = rank, world
        self.drop_last = train if drop_last is None else drop_last
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255.
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.
        self.epoch, self.start = 0, 0
        if train and len(self) == 0:
            raise ValueError(f'{len(split)} training image(s) ({len(self._order())} for this rank) do not fill one '
                             f'batch of {batch_size}; use a smaller batch size.')

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        n = len(self.split)
        if not self.train:
            return torch.arange(self.rank, n, self.world)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        per_rank = n // self.world
        return torch.randperm(n, generator=g)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _batches(self, order: torch.Tensor) -> List[List[int]]:
        """Positions in ``order`` of each batch."""
        bs = self.batch_size
        if self.train:
            n = len(order)
            count = n // bs if self.drop_last else -(-n // bs)
            return [list(range(b * bs, min(n, (b + 1) * bs))) for b in range(count)]
        batches: List[List[int]] = []
        last = None
        for pos, i in enumerate(order.tolist()):
            size = tuple(self.split.images[i].shape[1:])
            if batches and size == last and len(batches[-1]) < bs:
                batches[-1].append(pos)
            else:
                batches.append([pos])
            last = size
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def __len__(self) -> int:
        return len(self._batches(self._order()))

    def _stack(self, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and uint8 labels, padded at the bottom and right to the largest (image 0 = the mean
        colour, label void) so that one grid serves them all."""
        H = max(self.split.images[i].shape[1] for i in indices)
        W = max(self.split.images[i].shape[2] for i in indices)
        images = torch.zeros(len(indices), 3, H, W)
        labels = torch.full((len(indices), H, W), VOID, dtype=torch.uint8)
        for b, i in enumerate(indices):
            image, label = self.split.images[i], self.split.labels[i]
            h, w = label.shape
            images[b, :, :h, :w] = (image.float() - self.mean) / self.std
            labels[b, :h, :w] = label
        return images, labels

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, list]]:
        order = self._order()
        batches = self._batches(order)
        if self.train:  # every image's augmentation drawn up front: the same whatever the batch size or start
            n = len(order)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 7 + 1 + self.rank)
            lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
            scales = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
            where = torch.rand(2, n, generator=g, dtype=torch.float64)
            flips = torch.rand(n, generator=g) < self.hflip
            sizes = torch.tensor([list(self.split.images[i].shape[1:]) for i in order.tolist()],
                                 dtype=torch.float64).view(n, 2)
            # the crop starts anywhere from (scaled size - crop) to 0 when it is larger than the scaled image,
            # anywhere from 0 to (scaled size - crop) when it is smaller
            spare = sizes * scales[:, None] - torch.tensor(self.crop_size, dtype=torch.float64)
            starts = spare.clamp(max=0) + where.T * spare.abs()
        for b in range(self.start if self.train else 0, len(batches)):
            pos = torch.tensor(batches[b])
            images, labels = self._stack(order[pos].tolist())
            if self.train:
                images, labels = crop_batch(images, labels, scales[pos], starts[pos, 0], starts[pos, 1],
                                            flips[pos], self.crop_size)
            else:
                labels = labels.long()
            yield images, labels, []
