"""Datasets for ``dynamixer train`` and ``dynamixer eval``: scikit-learn's digits, CIFAR-10/100, ImageFolder trees.

Every dataset yields ``(image, label)`` pairs of PIL images turned into tensors by a transform that is set
once the model (and so its input size and normalisation) is known. Unreadable images are not fatal: they
come back as ``Unreadable`` markers that ``collate`` drops and reports, so one bad JPEG in 50,000 costs one
warning, not the run.
"""
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate, get_worker_info

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)


@dataclass
class Unreadable:
    """Stands in for an image that could not be decoded."""
    path: str
    reason: str


class ImageDataset(Dataset):
    """Labelled images with a settable transform and, in worker processes, per-sample seeding.

    Subclasses implement ``load(index) -> (PIL image, label)``. With ``seed`` set, augmentation in a data
    loader worker is seeded from (seed, epoch, index), so it does not depend on the number of workers nor on
    where in an epoch a resumed run starts; in the main process it draws from the (checkpointed) global RNGs.
    """

    def __init__(self, classes: Sequence[str], mode: str):
        self.classes = list(classes)
        self.mode = mode  # PIL mode the model wants: 'L' (1 channel) or 'RGB'
        self.transform: Optional[Callable] = None
        self.seed: Optional[int] = None
        self.epoch = 0

    def load(self, index: int) -> Tuple[Image.Image, int]:
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f'#{index}'

    def __getitem__(self, index: int) -> Any:
        if self.seed is not None and get_worker_info() is not None:
            s = hash((self.seed, self.epoch, index)) % (2 ** 31)
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        try:
            image, label = self.load(index)
            image = image.convert(self.mode)
        except Exception as e:  # any decoding failure: PIL raises many types
            return Unreadable(self.name(index), f'{type(e).__name__}: {e}')
        return (self.transform(image) if self.transform else image), label


class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array, (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str], mode: str):
        super().__init__(classes, mode)
        self.images = images
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]

    def subset(self, indices: Sequence[int]) -> 'ArrayDataset':
        return ArrayDataset(self.images[list(indices)], [self.targets[i] for i in indices], self.classes, self.mode)


class FileDataset(ImageDataset):
    """Images read from disk: a list of (path, label)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], mode: str):
        super().__init__(classes, mode)
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def subset(self, indices: Sequence[int]) -> 'FileDataset':
        return FileDataset([self.samples[i] for i in indices], self.classes, self.mode)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image.load()
            return image.copy(), label


def collate(batch: List[Any]) -> Tuple[torch.Tensor, torch.Tensor, List[Unreadable]]:
    """Stack the readable samples; return the unreadable ones separately so the caller can report them."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = default_collate(good)
    return images, labels, bad


@dataclass
class Splits:
    """Train and validation sets of one dataset, before transforms are attached."""
    train: ImageDataset
    val: ImageDataset
    classes: List[str]
    in_chans: int
    native_size: Optional[int]  # the size the images come in when it is fixed (digits 8, CIFAR 32)
    name: str


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Deterministic stratified (train, held-out) index split."""
    from sklearn.model_selection import train_test_split
    if not 0. < fraction < 1.:
        raise ValueError(f'--val-split must be a fraction between 0 and 1, got {fraction}.')
    indices = list(range(len(targets)))
    try:
        train, val = train_test_split(indices, test_size=fraction, stratify=list(targets), random_state=seed)
    except ValueError as e:  # too few images per class to stratify
        raise ValueError(f'cannot hold out {fraction:.0%} of {len(targets)} images per class ({e}); '
                         f'use a larger --val-split or more images.') from None
    return sorted(train), sorted(val)


def _digits(val_split: float, seed: int) -> Splits:
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 0..16 intensities to 0..255 so that the digits go through the same PIL pipeline as any image
    images = np.round(digits.images * (255. / 16.)).astype(np.uint8)
    train_idx, val_idx = stratified_split(digits.target, val_split or 0.2, seed)
    classes = [str(c) for c in digits.target_names]
    make = lambda idx: ArrayDataset(images[idx], digits.target[idx], classes, 'L')
    return Splits(make(train_idx), make(val_idx), classes, 1, 8, 'digits')


def _cifar(name: str, data_dir: str, mode: str) -> Splits:
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            sets.append(cls(root=data_dir, train=train, download=True))
        except Exception as e:  # URLError, timeouts, HTTP errors: whatever the network says
            raise ValueError(f'could not download {name} into {data_dir!r} ({type(e).__name__}: {e}); with no '
                             f'network, put the extracted python version there yourself or use --data PATH '
                             f'with an ImageFolder tree.') from None
    classes = list(sets[0].classes)
    train, val = (ArrayDataset(s.data, s.targets, classes, mode) for s in sets)
    return Splits(train, val, classes, 1 if mode == 'L' else 3, 32, name)


def _scan_folder(root: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes (sub-folder names, sorted) and image files of an ImageFolder-style tree."""
    if not root.is_dir():
        raise ValueError(f'{str(root)!r} is not a directory; expected an image folder with one sub-folder per class.')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    samples = []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
            samples += [(os.path.join(dirpath, f), i) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise ValueError(f'no images found in {str(root)!r}; expected sub-folders per class holding '
                         f'{", ".join(IMG_EXTENSIONS[:3])}... files (e.g. {root}/cat/001.jpg).')
    return classes, samples


def _folder(path: str, val_split: float, seed: int, mode: str) -> Splits:
    root = Path(path)
    if not root.exists():
        raise ValueError(f'data directory {path!r} does not exist; give digits, cifar10, cifar100 or a folder '
                         f'with train/ (and val/) holding one sub-folder per class.')
    train_root = root / 'train' if (root / 'train').is_dir() else root
    classes, samples = _scan_folder(train_root)
    present = sorted({classes[t] for _, t in samples})
    if len(present) < 2:
        raise ValueError(f'{str(train_root)!r} holds images of one class only ({present[0]}); a classifier needs at '
                         f'least 2: put each class\'s images in a sub-folder of its own (e.g. {train_root}/cat/, '
                         f'{train_root}/dog/).')
    if (root / 'val').is_dir() and not val_split:
        val_classes, val_samples = _scan_folder(root / 'val')
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise ValueError(f'{root / "val"} has classes that {train_root} lacks ({", ".join(extra[:5])}); '
                             f'val/ must use the training classes (add them to train/ or remove them from val/).')
        index = {c: i for i, c in enumerate(classes)}
        val_samples = [(p, index[val_classes[t]]) for p, t in val_samples]
        train_samples = samples
    elif val_split:
        train_idx, val_idx = stratified_split([t for _, t in samples], val_split, seed)
        train_samples, val_samples = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    else:
        raise ValueError(f'{path!r} has no val/ folder; add one, or hold out part of the training images '
                         f'with --val-split 0.1.')
    train, val = FileDataset(train_samples, classes, mode), FileDataset(val_samples, classes, mode)
    return Splits(train, val, classes, 1 if mode == 'L' else 3, None, root.name)


def limit(dataset: ImageDataset, count: Optional[int], seed: int) -> ImageDataset:
    """A stratified, deterministic subset of ``count`` images (all of them when count is None or too big)."""
    if not count or count >= len(dataset):
        return dataset
    _, keep = stratified_split(dataset.targets, count / len(dataset), seed)
    return dataset.subset(keep)


def load_splits(data: str, data_dir: str = 'data', val_split: float = 0., seed: int = 0,
                in_chans: Optional[int] = None, limit_train: Optional[int] = None,
                limit_val: Optional[int] = None) -> Splits:
    """``digits``, ``cifar10``, ``cifar100`` or the path of an ImageFolder tree, as train/val datasets
    (optionally cut to stratified subsets, for quick trials)."""
    splits = _load_splits(data, data_dir, val_split, seed, in_chans)
    splits.train = limit(splits.train, limit_train, seed)
    splits.val = limit(splits.val, limit_val, seed)
    return splits


def _load_splits(data: str, data_dir: str, val_split: float, seed: int, in_chans: Optional[int]) -> Splits:
    if data == 'digits':
        if in_chans not in (None, 1):
            raise ValueError('digits are grayscale; leave --in-chans unset (1) for --data digits.')
        return _digits(val_split, seed)
    mode = 'L' if in_chans == 1 else 'RGB'
    if in_chans not in (None, 1, 3):
        raise ValueError(f'--in-chans must be 1 or 3 for image data, got {in_chans}.')
    if data in ('cifar10', 'cifar100'):
        return _cifar(data, data_dir, mode)
    return _folder(data, val_split, seed, mode)


def _clamp_posterize_bits() -> None:
    """timm's 'increasing' posterize can ask for 0 bits at high magnitudes, which Pillow >= 10 rejects
    ("bits must be between 1 and 8") and which would kill a paper-recipe run at random; keep at least 1 bit."""
    from timm.data import auto_augment
    if getattr(auto_augment, '_dynamixer_clamped', False):
        return
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        return original(img, max(1, int(bits_to_keep)), **kwargs)

    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize
    auto_augment._dynamixer_clamped = True


def open_image(path: str, data_config: Dict[str, Any]) -> Tuple[Image.Image, Optional[str]]:
    """An image file in the mode the model reads (1 channel or RGB), and a note when it looks nothing like
    the model's inputs (a colour image for a grayscale model, or one more than 16 times their size), whose
    answer would then mean little."""
    channels, height, width = data_config['input_size']
    try:
        with Image.open(path) as original:
            original.load()
    except FileNotFoundError:
        raise FileNotFoundError(f'image {path!r} does not exist.') from None
    except OSError as e:
        raise ValueError(f'could not read {path!r} as an image ({e}).') from None
    rgb = original.convert('RGB')
    colour = channels == 1 and np.ptp(np.asarray(rgb.resize((32, 32)), dtype=np.int16), axis=2).mean() > 8
    too_big = max(original.width / width, original.height / height) > 16
    trained = f'{width}x{height} {"grayscale" if channels == 1 else "colour"}'
    unlike = _unlike_a_photo(rgb) if channels == 3 else None
    note = None
    if colour or too_big:
        kind = 'colour ' if colour else ''
        note = (f'{path} is a {original.width}x{original.height} {kind}image; this model was trained on {trained} '
                f'images, so its answer may mean little.')
    elif unlike:
        note = f'{path} {unlike}, unlike the {trained} photos this model was trained on, so its answer may mean little.'
    return (original.convert('L') if channels == 1 else rgb), note


def _unlike_a_photo(image: Image.Image) -> Optional[str]:
    """What makes an image plainly unlike a photograph, or None: one flat colour, or noise (neighbouring pixels
    of photographs are strongly correlated, of random noise not at all; the lowest of 100 CIFAR-10 images is
    0.58). Only for images of at least 16 x 16 pixels, where the statistic means something."""
    gray = np.asarray(image.convert('L'), dtype=np.float64)
    if min(gray.shape) < 16:
        return None
    if gray.std() < 2:
        return 'is one flat colour'
    left, right = gray[:, :-1].ravel(), gray[:, 1:].ravel()
    if left.std() > 0 and right.std() > 0 and np.corrcoef(left, right)[0, 1] < 0.3:
        return 'looks like random noise (neighbouring pixels are uncorrelated)'
    return None


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """timm's evaluation preprocessing (resize, centre crop, normalise) for the model's data config."""
    from timm.data import create_transform
    return create_transform(**data_config, is_training=False)


def train_transform(data_config: Dict[str, Any], crop: str = 'rrc', scale: Sequence[float] = (0.08, 1.),
                    hflip: float = 0.5, auto_augment: Optional[str] = None, color_jitter: float = 0.4,
                    reprob: float = 0., remode: str = 'pixel') -> Callable:
    """Training augmentation.

    ``rrc`` is timm's ImageNet pipeline (random resized crop, flip, RandAugment, colour jitter, random
    erasing). ``pad`` is the small-image one (resize, pad by 1/8 and random crop, flip, random erasing),
    which keeps tiny images (CIFAR) recognisable where a random resized crop would not. ``none`` only resizes
    (then flip and random erasing if asked): on 8 x 8 digits a one-pixel shift is an eighth of the image and
    slows learning several-fold (docs/training.md).
    """
    from timm.data import create_transform
    if crop == 'rrc':
        if auto_augment:
            _clamp_posterize_bits()
        return create_transform(
            **data_config, is_training=True, scale=tuple(scale), hflip=hflip, auto_augment=auto_augment,
            color_jitter=color_jitter, re_prob=reprob, re_mode=remode)
    if crop not in ('pad', 'none'):
        raise ValueError(f"--crop must be 'rrc', 'pad' or 'none', got {crop!r}.")
    from torchvision import transforms
    from timm.data.random_erasing import RandomErasing
    size = tuple(data_config['input_size'][1:])
    steps = [transforms.Resize(size)]
    if crop == 'pad':
        steps.append(transforms.RandomCrop(size, padding=max(1, size[0] // 8)))
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(data_config['mean'], data_config['std'])]
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode=remode, device='cpu'))
    return transforms.Compose(steps)
