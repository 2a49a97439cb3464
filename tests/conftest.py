"""Shared test helpers: tiny image folders and a tiny DynaMixer, so that training tests take seconds."""
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

# A DynaMixer small enough to train in a second on 8 x 8 images (about 20k parameters).
TINY_MODEL = ['--model-kwargs', 'patch_size=1', 'depths=(1,1,1,1)', 'embed_dims=(16,16,32,32)',
              'stage_strides=(1,1,2,1)', 'num_segments=(2,2,4,4)']
# A segmentation pyramid small enough to train in seconds: windows of 4 tokens, one block a stage.
TINY_PYRAMID = ['depths=(1,1,1,1)', 'embed_dims=(16,16,32,32)', 'num_segments=(2,2,4,4)', 'window_size=4']
SEG_COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])


def make_image_folder(root: Path, classes=('cat', 'dog', 'fox'), per_class: int = 12, size: int = 8,
                      seed: int = 0) -> Path:
    """Class folders of small RGB PNGs whose colour says the class (so a tiny model can learn them)."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float64)
            base[..., i % 3] = 200
            image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f'{j:03d}.png')
    return root


def make_seg_folder(root: Path, train: int = 12, val: int = 4, size=(32, 48), seed: int = 0, void: int = 11) -> Path:
    """train/, trainannot/, val/, valannot/, classes.txt (red, green, blue): each image a few coloured boxes on a
    red background, the label map saying which colour (class) every pixel is, with a one-pixel frame of ``void``
    (11 as in CamVid: beyond the 3 classes, so void with a warning; 3 or 255: void without one)."""
    rng = np.random.default_rng(seed)
    (root / 'classes.txt').parent.mkdir(parents=True, exist_ok=True)
    (root / 'classes.txt').write_text('red\ngreen\nblue\n')
    H, W = size
    for split, count in (('train', train), ('val', val)):
        (root / split).mkdir(exist_ok=True)
        (root / f'{split}annot').mkdir(exist_ok=True)
        for i in range(count):
            label = np.zeros((H, W), dtype=np.uint8)
            for _ in range(3):
                y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
                label[y:y + rng.integers(6, 14), x:x + rng.integers(6, 14)] = rng.integers(1, 3)
            image = np.clip(SEG_COLOURS[label] + rng.normal(0, 15, (H, W, 3)), 0, 255).astype(np.uint8)
            label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = void
            Image.fromarray(image).save(root / split / f'{split}{i:03d}.png')
            Image.fromarray(label, mode='L').save(root / f'{split}annot' / f'{split}{i:03d}.png')
    return root


def write_corrupt_jpeg(path: Path) -> Path:
    """A file named .jpg that holds a truncated JPEG header and garbage: PIL cannot decode it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF\x00' + b'\x00garbage' * 10)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """tmp/data/train/{cat,dog,fox} and tmp/data/val/{cat,dog,fox}."""
    data = tmp_path / 'data'
    make_image_folder(data / 'train', per_class=12, seed=0)
    make_image_folder(data / 'val', per_class=4, seed=1)
    return data


def train_args(output: Path, *extra: str) -> List[str]:
    return ['train', '--output', str(output), '--no-progress', '--workers', '0', *TINY_MODEL, *extra]


@pytest.fixture(scope='session', autouse=True)
def _cpu_kernels_built_once(tmp_path_factory):
    """The CPU mixing kernels are built once for the session, in its own temporary folder, before any test runs
    (a training subprocess would otherwise spend its time budget building them)."""
    import os
    from dynamixer.models import cpu_mix
    before = os.environ.get('TORCH_EXTENSIONS_DIR')
    os.environ['TORCH_EXTENSIONS_DIR'] = str(tmp_path_factory.getbasetemp() / 'torch_extensions')
    cpu_mix.available()
    yield
    if before is None:
        del os.environ['TORCH_EXTENSIONS_DIR']
    else:
        os.environ['TORCH_EXTENSIONS_DIR'] = before


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches of the tests go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path_factory.mktemp('xdg_cache')))


def child_pids(pid: int) -> List[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
