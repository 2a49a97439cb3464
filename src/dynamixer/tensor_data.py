"""Small images as one uint8 tensor: decoded once, cached on disk, augmented a whole batch at a time.

For 32 x 32 images the per-image path (PIL decode, transforms, collate) costs more than a small model's
training step. Here a split is decoded once into an ``(N, C, H, W)`` uint8 tensor that is cached on disk,
keyed by the files' names, sizes and modification times (a changed, added or removed image rebuilds it), and
a ``TensorLoader`` crops, flips and normalises whole batches with tensor ops. Unreadable images are skipped
when the cache is built and reported every time it is used.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dynamixer.data import FileDataset, ImageDataset, Unreadable
from dynamixer.io import atomic_write

CACHE_VERSION = 1


@dataclass
class TensorSplit:
    """One split as tensors: ``images`` (N, C, H, W) uint8, ``targets`` (N,) int64, and what was skipped."""
    images: torch.Tensor
    targets: torch.Tensor
    skipped: List[Unreadable] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)


def _fingerprint(dataset: FileDataset, size: Tuple[int, int], mode: str) -> str:
    """Names, byte sizes and modification times of every file, plus how they are decoded."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, list(size), mode]).encode())
    for path, label in dataset.samples:
        st = os.stat(path)
        h.update(f'{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:20]


def _decode(dataset: ImageDataset, size: Tuple[int, int], progress: bool) -> TensorSplit:
    from PIL import Image
    from tqdm import tqdm
    h, w = size
    channels = 1 if dataset.mode == 'L' else 3
    images = np.empty((len(dataset), h, w, channels), dtype=np.uint8)
    targets, skipped, kept = [], [], 0
    for i in tqdm(range(len(dataset)), desc='decoding images', unit='img', disable=not progress, leave=False):
        try:
            image, label = dataset.load(i)
            image = image.convert(dataset.mode)
            if image.size != (w, h):
                image = image.resize((w, h), Image.BICUBIC, reducing_gap=None)
            images[kept] = np.asarray(image).reshape(h, w, channels)
        except Exception as e:  # PIL raises many types for a bad file
            skipped.append(Unreadable(dataset.name(i), f'{type(e).__name__}: {e}'))
            continue
        targets.append(int(label))
        kept += 1
    return TensorSplit(torch.from_numpy(images[:kept]).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor(targets, dtype=torch.int64), skipped)


def cache_tensors(dataset: ImageDataset, size: Tuple[int, int], cache_dir: Optional[Path] = None,
                  progress: bool = True) -> Tuple[TensorSplit, Optional[Path], bool]:
    """``dataset`` decoded to a ``TensorSplit`` of ``size`` (H, W). Image files are cached in ``cache_dir`` (by
    content fingerprint); in-memory datasets are converted directly. Returns (split, cache file, built now)."""
    if cache_dir is None or not isinstance(dataset, FileDataset):  # in-memory arrays: nothing to cache
        return _decode(dataset, size, progress), None, True
    path = Path(cache_dir) / f'images-{_fingerprint(dataset, size, dataset.mode)}.pt'
    if path.is_file():
        try:
            saved = torch.load(path, map_location='cpu', weights_only=True)
            skipped = [Unreadable(p, r) for p, r in saved['skipped']]
            return TensorSplit(saved['images'], saved['targets'], skipped), path, False
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    split = _decode(dataset, size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(images=split.images, targets=split.targets, skipped=[(u.path, u.reason) for u in split.skipped])
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return split, path, True


def translate(images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Image b cropped at (dy[b], dx[b]) out of itself padded by ``padding`` pixels (reflection): a shift by
    ``padding - dy`` rows and ``padding - dx`` columns, the uncovered border filled by reflection."""
    if padding <= 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images.float(), (padding,) * 4, mode='reflect').to(images.dtype)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def cutout(images: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """A ``size`` x ``size`` square centred at (cy[b], cx[b]) (clipped at the border) set to zero."""
    H, W = images.shape[-2:]
    ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
    return images.masked_fill(inside[:, None], 0.)


def random_translate(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``padding`` pixels in x and y (pad by reflection, random crop)."""
    B = images.shape[0]
    dy, dx = torch.randint(0, 2 * padding + 1, (2, B), generator=generator)
    return translate(images, padding, dy, dx)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return hflip(images, torch.rand(images.shape[0], generator=generator) < p)


def random_cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if size <= 0:
        return images
    B, _, H, W = images.shape
    return cutout(images, size, torch.randint(0, H, (B,), generator=generator),
                  torch.randint(0, W, (B,), generator=generator))


class TensorLoader:
    """Batches of a ``TensorSplit``: shuffled per epoch from (seed, epoch), augmented as whole batches
    (random translation with reflection padding, horizontal flip, cutout), normalised to float32.

    Yields ``(images, targets, [])`` like ``data.collate`` (nothing is unreadable any more). ``start`` skips
    that many batches of the epoch (resuming mid-epoch). Each image's augmentation is drawn from (seed, epoch)
    at the start of the epoch, so it does not depend on the batch size (gradient accumulation) or on where a
    resumed epoch starts; the same seed and epoch give the same batches.
    """

    def __init__(self, split: TensorSplit, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 train: bool, seed: int = 0, padding: int = 4, hflip: float = 0.5, cutout: int = 0,
                 drop_last: Optional[bool] = None, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f'batch size must be at least 1, got {batch_size}.')
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.padding, self.hflip, self.cutout = padding, hflip, cutout
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world = rank, world
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        n = len(self.split)
        if not self.train:
            return torch.arange(self.rank, n, self.world)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        per_rank = n // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, list]]:
        order = self._order()
        n, bs = len(order), self.batch_size
        if self.train:  # every image's augmentation drawn up front: the same whatever the batch size or start
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 7 + 1 + self.rank)
            H, W = self.split.images.shape[-2:]
            shifts = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g)
            flips = torch.rand(n, generator=g) < self.hflip
            centres = torch.stack([torch.randint(0, H, (n,), generator=g), torch.randint(0, W, (n,), generator=g)])
        for b in range(self.start if self.train else 0, len(self)):
            part = slice(b * bs, (b + 1) * bs)
            images = self.split.images[order[part]].float()
            if self.train:
                images = hflip(translate(images, self.padding, *shifts[:, part]), flips[part])
                if self.cutout:
                    images = cutout(images - self.mean, self.cutout, *centres[:, part]) + self.mean
            yield (images - self.mean) / self.std, self.split.targets[order[part]], []
