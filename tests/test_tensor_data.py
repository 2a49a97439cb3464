"""The small-image data path: the decoded-tensor cache and the batch augmentations of ``TensorLoader``."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, write_corrupt_jpeg
from dynamixer.data import load_splits
from dynamixer.tensor_data import (TensorLoader, TensorSplit, cache_tensors, random_cutout, random_hflip,
                                   random_translate)


def _train_set(root: Path):
    return load_splits(str(root), val_split=0.25, seed=0).train


def test_cache_is_built_once_reused_and_rebuilt_when_an_image_changes(tmp_path):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=8, size=8)
    cache = tmp_path / 'cache'
    first, path, built = cache_tensors(_train_set(data.parent), (8, 8), cache, progress=False)
    assert built and path.is_file() and first.images.dtype == torch.uint8
    assert first.images.shape == (len(first), 3, 8, 8) and len(first) == 18
    again, path2, built2 = cache_tensors(_train_set(data.parent), (8, 8), cache, progress=False)
    assert not built2 and path2 == path
    assert torch.equal(again.images, first.images) and torch.equal(again.targets, first.targets)

    # the pixels in the cache are the file's pixels
    dataset = _train_set(data.parent)
    image, label = dataset.load(3)
    assert torch.equal(first.images[3], torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1))
    assert first.targets[3] == label

    # rewrite one image: a new cache entry, holding the new pixels
    changed = Path(dataset.samples[3][0])
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    rebuilt, path3, built3 = cache_tensors(_train_set(data.parent), (8, 8), cache, progress=False)
    assert built3 and path3 != path
    assert (rebuilt.images[3] == 7).all() and torch.equal(rebuilt.images[4], first.images[4])


def test_cache_resizes_skips_bad_images_and_reports_them_on_reuse(tmp_path):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=8, size=8)
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(data / 'cat' / 'big.png')
    write_corrupt_jpeg(data / 'dog' / 'broken.jpg')
    make_image_folder(tmp_path / 'data' / 'val', per_class=2, size=8)
    dataset = load_splits(str(data.parent)).train
    assert len(dataset) == 26
    for attempt in range(2):
        split, _, built = cache_tensors(dataset, (8, 8), tmp_path / 'cache', progress=False)
        assert built == (attempt == 0)  # the second time from the cache, with the same report
        assert [Path(u.path).name for u in split.skipped] == ['broken.jpg'] and 'Error' in split.skipped[0].reason
        assert len(split) == 25 and split.images.shape[-2:] == (8, 8)
        big = [i for i, (p, _) in enumerate(dataset.samples) if p.endswith('big.png')][0]
        assert (split.images[big] == 0).all()  # resized, in its place (broken.jpg comes later: dog > cat)


def test_damaged_cache_file_is_rebuilt(tmp_path):
    data = make_image_folder(tmp_path / 'data' / 'train', per_class=4, size=8)
    split, path, _ = cache_tensors(_train_set(data.parent), (8, 8), tmp_path / 'cache', progress=False)
    path.write_bytes(b'not a torch file')
    again, path2, built = cache_tensors(_train_set(data.parent), (8, 8), tmp_path / 'cache', progress=False)
    assert built and path2 == path and torch.equal(again.images, split.images)


def _images(n=6, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_translate_is_a_crop_of_the_reflection_padded_image():
    images = _images().float()
    out = random_translate(images, 2, torch.Generator().manual_seed(1))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2,) * 4, mode='reflect')
    shifts = []
    for b in range(len(images)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[b], padded[b, :, dy:dy + 8, dx:dx + 8])]
        assert found, f'image {b} is not a crop of its padded self'
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # per-image shifts, not one for the batch
    assert torch.equal(random_translate(images, 0, torch.Generator()), images)


def test_flip_and_cutout():
    images = _images(n=32).float()
    flipped = random_hflip(images, torch.Generator().manual_seed(0))
    same = [torch.equal(f, i) for f, i in zip(flipped, images)]
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and 4 < sum(mirrored) < 28
    cut = random_cutout(images + 1, 3, torch.Generator().manual_seed(0))  # +1: no pixel is zero before
    zeros = (cut == 0).all(dim=1).flatten(1).sum(1)
    assert (zeros >= 4).all() and (zeros <= 9).all()  # a 3 x 3 square, clipped at the border to >= 2 x 2


def test_loader_batches_are_reproducible_normalised_and_resumable():
    split = TensorSplit(_images(n=40), torch.arange(40) % 4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    make = lambda seed: TensorLoader(split, 8, mean, std, train=True, seed=seed, padding=2, cutout=3)
    a, b, c = make(0), make(0), make(1)
    batches = list(a)
    assert len(a) == 5 and len(batches) == 5
    for (x, y, bad), (x2, y2, _) in zip(batches, b):
        assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and bad == []
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(batches[0][0], next(iter(c))[0])
    low = (0 - torch.tensor(mean) * 255) / (torch.tensor(std) * 255)
    high = (255 - torch.tensor(mean) * 255) / (torch.tensor(std) * 255)
    x = torch.cat([t[0] for t in batches])
    assert (x >= low.view(1, 3, 1, 1) - 1e-5).all() and (x <= high.view(1, 3, 1, 1) + 1e-5).all()
    assert sorted(torch.cat([t[1] for t in batches]).tolist()) == sorted(split.targets.tolist())
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))[0], batches[0][0])  # another epoch, another order
    # the same images, augmented the same way, whatever the batch size (gradient accumulation)
    halves = TensorLoader(split, 4, mean, std, train=True, seed=0, padding=2, cutout=3)
    assert torch.equal(torch.cat([x for x, _, _ in halves]), torch.cat([t[0] for t in batches]))
    # resuming at batch 3 of epoch 1 gives the batches an uninterrupted epoch 1 gives from there
    whole = list(a)
    a.set_epoch(1, start=3)
    tail = list(a)
    assert len(tail) == 2 and all(torch.equal(t[0], w[0]) for t, w in zip(tail, whole[3:]))


def test_eval_loader_is_plain_and_complete():
    split = TensorSplit(_images(n=10), torch.arange(10))
    loader = TensorLoader(split, 4, (0., 0., 0.), (1 / 255,) * 3, train=False)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    assert [len(y) for y in ys] == [4, 4, 2]
    assert torch.equal(torch.cat(xs), split.images.float()) and torch.equal(torch.cat(ys), split.targets)
    with pytest.raises(ValueError, match='batch size'):
        TensorLoader(split, 0, (0.,), (1.,), train=False)
