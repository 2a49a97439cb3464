"""Segmentation data: the folder layout and its mistakes, the decoded cache, and ``SegBatchLoader``."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynamixer.seg_data import (VOID, SegBatchLoader, SegSplit, crop_batch, is_segmentation_folder,
                                load_seg_data)

CLASSES = ['sky', 'road', 'car']
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _label(stem_index: int, h: int = 20, w: int = 30) -> np.ndarray:
    """Vertical stripes of the three classes, one void (3, the dataset's void value) and one 255 patch."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[:, w // 3:2 * w // 3] = 1
    label[:, 2 * w // 3:] = 2
    label[:2, :3] = 3
    label[-2:, -3:] = VOID
    return np.roll(label, stem_index, axis=0)


def _write_pair(root: Path, part: str, stem: str, label: np.ndarray, ext: str = '.png', seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, label.shape + (3,), dtype=np.uint8)
    (root / part).mkdir(parents=True, exist_ok=True)
    (root / f'{part}annot').mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / part / f'{stem}{ext}')
    Image.fromarray(label).save(root / f'{part}annot' / f'{stem}.png')


def make_seg_folder(root: Path, n_train: int = 6, n_val: int = 2, classes=CLASSES) -> Path:
    """root/{train,trainannot,val,valannot}/ of 20 x 30 images (PNG and JPEG) and classes.txt."""
    for i in range(n_train):
        _write_pair(root, 'train', f't{i:02d}', _label(i), '.jpg' if i % 2 else '.png', seed=i)
    for i in range(n_val):
        _write_pair(root, 'val', f'v{i:02d}', _label(i), '.png', seed=100 + i)
    (root / 'classes.txt').write_text(''.join(c + '\n' for c in classes))
    return root


def _load(root: Path, **kwargs):
    return load_seg_data(root, cache_dir=root.parent / 'cache', **kwargs)


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))


# ---------------------------------------------------------------- layout, classes, void


def test_layout_is_scanned_into_pixels_labels_and_classes(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    assert is_segmentation_folder(root) and not is_segmentation_folder(root / 'train')
    assert not is_segmentation_folder(tmp_path / 'nowhere')
    data = _load(root)
    assert data.classes == CLASSES and data.name == 'data' and data.warnings == []
    assert data.train.names == [f't{i:02d}' for i in range(6)] and data.val.names == ['v00', 'v01']
    assert len(data.train) == 6 and len(data.val) == 2 and not data.train.skipped
    image, label = data.val.images[1], data.val.labels[1]
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    assert label.shape == (20, 30) and label.dtype == torch.uint8
    stored = np.array(Image.open(root / 'val' / 'v01.png'))  # PNG: the exact pixels
    assert torch.equal(image, torch.from_numpy(stored).permute(2, 0, 1))
    # 0..2 kept, 3 (the dataset's void: no line in classes.txt) and 255 both become 255
    expected = _label(1).copy()
    expected[expected == 3] = VOID
    assert torch.equal(label, torch.from_numpy(expected))
    assert set(torch.unique(data.train.labels[0]).tolist()) == {0, 1, 2, VOID}


def test_values_beyond_the_classes_become_void_with_a_warning_naming_file_and_values(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    label = _label(0)
    label[5, 5], label[6, 6] = 17, 31  # a 32-class labelling given with a 3-line classes.txt
    Image.fromarray(label).save(root / 'trainannot' / 't00.png')
    data = _load(root)
    assert int(data.train.labels[0][5, 5]) == VOID and int(data.train.labels[0][6, 6]) == VOID
    assert len(data.warnings) == 1
    warning = data.warnings[0]
    assert 't00.png' in warning and '17, 31' in warning and 'void' in warning and 'trainannot' in warning
    assert 't01.png' not in warning  # 3 and 255 alone are the usual void values: no warning for them
    assert any(warning in m for m in data.messages())
    assert _load(root).warnings == data.warnings  # the same from the cache


def test_palette_and_grey_rgb_label_maps_are_read_as_indices(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    label = _label(0)
    p = Image.fromarray(label, mode='L').convert('P')  # indices with a palette (VOC style)
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] * 85 + [0])
    p.save(root / 'trainannot' / 't00.png')
    Image.fromarray(np.repeat(_label(1)[..., None], 3, axis=2)).save(root / 'trainannot' / 't01.png')
    data = _load(root)
    assert not data.train.skipped
    for i in (0, 1):
        expected = _label(i).copy()
        expected[expected == 3] = VOID
        assert torch.equal(data.train.labels[i], torch.from_numpy(expected))


# ---------------------------------------------------------------- bad input


def test_label_map_of_another_size_is_skipped_naming_both_sizes(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    Image.fromarray(np.zeros((10, 15), dtype=np.uint8)).save(root / 'trainannot' / 't02.png')
    data = _load(root)
    assert 't02' not in data.train.names and len(data.train) == 5
    (skip,) = data.train.skipped
    assert skip.path.endswith('t02.png') and '15x10' in skip.reason and '30x20' in skip.reason
    again = _load(root)  # reported again from the cache
    assert [(u.path, u.reason) for u in again.train.skipped] == [(skip.path, skip.reason)]


@pytest.mark.parametrize('remove, message', [
    (['trainannot/t01.png'], r"1 file\(s\) in .*train have no label map .*trainannot \(t01\)"),
    (['train/t00.png', 'train/t01.jpg', 'train/t02.png', 'train/t04.png'],
     r"4 file\(s\) in .*trainannot have no image .*train \(t00, t01, t02, \.\.\.\)"),
])
def test_unpaired_files_name_up_to_three_stems_and_the_count(tmp_path, remove, message):
    root = make_seg_folder(tmp_path / 'data')
    for name in remove:
        (root / name).unlink()
    with pytest.raises(ValueError, match=message):
        _load(root)


def test_colour_label_maps_are_skipped_and_all_colour_is_an_error(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    colour = np.zeros((20, 30, 3), dtype=np.uint8)
    colour[:, :10] = (128, 64, 128)  # a CamVid-style colour-coded class
    Image.fromarray(colour).save(root / 'trainannot' / 't03.png')
    data = _load(root)
    (skip,) = data.train.skipped
    assert skip.path.endswith('t03.png') and 'single-channel' in skip.reason and 'colour' in skip.reason
    assert 't03' not in data.train.names
    for i in range(2):
        Image.fromarray(colour).convert('RGBA').save(root / 'valannot' / f'v{i:02d}.png')
    with pytest.raises(ValueError, match=r'every label map in .*valannot is a colour image.*single-channel'):
        _load(root)


def test_truncated_image_and_label_are_skipped(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    for name in ('train/t01.jpg', 'trainannot/t04.png'):
        path = root / name
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    data = _load(root)
    assert sorted(Path(u.path).name for u in data.train.skipped) == ['t01.jpg', 't04.png']
    assert all('Error' in u.reason for u in data.train.skipped)
    assert data.train.names == ['t00', 't02', 't03', 't05']


def test_all_pairs_unreadable_is_an_error_naming_the_folders(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    for i in range(2):
        (root / 'val' / f'v{i:02d}.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    with pytest.raises(ValueError, match=r'none of the 2 image/label pairs of .*val and .*valannot'):
        _load(root)


@pytest.mark.parametrize('breakage, message', [
    ('empty_train', r'no images found in .*train'),
    ('no_valannot', r'valannot is missing'),
    ('no_train', r'train is missing'),
    ('no_val', r'no val/ folder; add val/ and valannot/, or .*--val-split'),
    ('jpeg_label', r't00\.jpg is a \.jpg label map; label maps must be lossless'),
    ('two_images_one_stem', r'two images named .t00.'),
])
def test_layout_mistakes_are_one_clear_error(tmp_path, breakage, message):
    import shutil
    root = make_seg_folder(tmp_path / 'data')
    if breakage == 'empty_train':
        for p in list((root / 'train').iterdir()) + list((root / 'trainannot').iterdir()):
            p.unlink()
    elif breakage == 'no_valannot':
        shutil.rmtree(root / 'valannot')
    elif breakage == 'no_train':
        shutil.rmtree(root / 'train')
    elif breakage == 'no_val':
        shutil.rmtree(root / 'val')
        shutil.rmtree(root / 'valannot')
    elif breakage == 'jpeg_label':
        Image.fromarray(_label(0)).save(root / 'trainannot' / 't00.jpg')
    elif breakage == 'two_images_one_stem':
        Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(root / 'train' / 't00.jpg')
    with pytest.raises(ValueError, match=message):
        _load(root)


@pytest.mark.parametrize('text, message', [
    (None, r'classes\.txt is missing'),
    ('sky\nroad\nsky\n', r"names 'sky' twice \(lines 1 and 3\)"),
    ('sky\n\nroad\n', r'empty line \(line 2\)'),
    ('sky\n', r'names 1 class\(es\); segmentation needs at least 2'),
])
def test_bad_classes_txt_is_one_clear_error(tmp_path, text, message):
    root = make_seg_folder(tmp_path / 'data')
    if text is None:
        (root / 'classes.txt').unlink()
    else:
        (root / 'classes.txt').write_text(text)
    with pytest.raises(ValueError, match=message):
        _load(root)


def test_trailing_blank_lines_of_classes_txt_are_ignored(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    (root / 'classes.txt').write_text('sky\r\nroad\r\ncar\r\n\n\n')
    assert _load(root).classes == CLASSES


# ---------------------------------------------------------------- cache, hold-out


def test_cache_is_reused_rebuilt_after_a_change_and_when_damaged(tmp_path, monkeypatch):
    import dynamixer.seg_data as seg_data
    root = make_seg_folder(tmp_path / 'data')
    cache = tmp_path / 'cache'
    first = _load(root)
    files = sorted(cache.glob('seg-*.pt'))
    assert len(files) == 2  # train and val, cached apart

    decoded = []
    real = seg_data._decode
    monkeypatch.setattr(seg_data, '_decode', lambda pairs, *a: decoded.append(len(pairs)) or real(pairs, *a))
    again = _load(root)
    assert decoded == []  # nothing decoded: both from the cache
    assert all(torch.equal(a, b) for a, b in zip(again.train.labels, first.train.labels))

    label = _label(0)
    label[:] = 1
    Image.fromarray(label).save(root / 'trainannot' / 't00.png')
    _touch_later(root / 'trainannot' / 't00.png')
    changed = _load(root)
    assert decoded == [6]  # train only
    assert (changed.train.labels[0] == 1).all() and torch.equal(changed.val.images[0], first.val.images[0])

    for path in cache.glob('seg-*.pt'):
        path.write_bytes(b'not a torch file')
    rebuilt = _load(root)
    assert decoded == [6, 6, 2]
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.train.images, changed.train.images))

    # a cache that loads but does not hold what it should (labels cut short) is rebuilt too
    current = [p for p in cache.glob('seg-*.pt') if p.read_bytes() != b'not a torch file']
    assert len(current) == 2
    for path in current:
        saved = torch.load(path, weights_only=True)
        saved['labels'] = [label[:5] for label in saved['labels']]
        torch.save(saved, path)
    again = _load(root)
    assert decoded == [6, 6, 2, 6, 2] and again.train.labels[0].shape == (20, 30)

    # the default cache folder is $XDG_CACHE_HOME/dynamixer
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    load_seg_data(root)
    assert len(list((tmp_path / 'xdg' / 'dynamixer').glob('seg-*.pt'))) == 2


def test_an_unwritable_cache_folder_is_a_warning_not_an_error(tmp_path):
    root = make_seg_folder(tmp_path / 'data')
    (tmp_path / 'blocked').write_text('a file where the cache folder would be')
    data = load_seg_data(root, cache_dir=tmp_path / 'blocked' / 'cache')
    assert len(data.train) == 6 and len(data.val) == 2
    assert len(data.warnings) == 2 and all('could not write the decoded-image cache' in w for w in data.warnings)


def test_val_split_holds_out_a_seeded_disjoint_fraction_of_train(tmp_path):
    import shutil
    root = make_seg_folder(tmp_path / 'data', n_train=10)
    shutil.rmtree(root / 'val')
    shutil.rmtree(root / 'valannot')
    data = _load(root, val_split=0.3, split_seed=1)
    assert len(data.val) == 3 and len(data.train) == 7
    assert set(data.val.names).isdisjoint(data.train.names)
    assert sorted(data.val.names + data.train.names) == [f't{i:02d}' for i in range(10)]
    assert _load(root, val_split=0.3, split_seed=1).val.names == data.val.names
    others = {tuple(_load(root, val_split=0.3, split_seed=s).val.names) for s in range(2, 6)}
    assert len(others - {tuple(data.val.names)}) >= 1  # another seed, another hold-out
    other = _load(root, val_split=0.5)
    by_name = dict(zip(other.train.names + other.val.names, other.train.labels + other.val.labels))
    assert all(torch.equal(by_name[n], l) for n, l in zip(data.val.names, data.val.labels))
    with pytest.raises(ValueError, match='--val-split must be a fraction'):
        _load(root, val_split=1.5)


# ---------------------------------------------------------------- the batch loader


def _split(n=7, sizes=((20, 30),), classes=3, seed=0) -> SegSplit:
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        images.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, classes, (h, w), generator=g, dtype=torch.uint8)
        label[0, 0] = VOID
        labels.append(label)
    return SegSplit(images, labels, [f'i{i}' for i in range(n)])


def _epoch(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


def test_loader_batches_are_a_function_of_seed_and_epoch(tmp_path):
    split = _split()
    make = lambda seed: SegBatchLoader(split, 2, MEAN, STD, train=True, crop_size=(16, 24), seed=seed)
    a, b = _epoch(make(0), 1), _epoch(make(0), 1)
    assert len(a) == len(make(0)) == 3  # 7 images, batches of 2, the last one dropped
    for (xa, ya, bad), (xb, yb, _) in zip(a, b):
        assert xa.shape == (2, 3, 16, 24) and xa.dtype == torch.float32
        assert ya.shape == (2, 16, 24) and ya.dtype == torch.int64 and bad == []
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(_epoch(make(0), 2)[0][0], a[0][0])
    assert not torch.equal(_epoch(make(1), 1)[0][0], a[0][0])


def test_resuming_at_start_k_gives_the_tail_of_the_full_epoch():
    loader = SegBatchLoader(_split(9), 2, MEAN, STD, train=True, crop_size=(16, 16))
    full = _epoch(loader, 3)
    tail = _epoch(loader, 3, start=2)
    assert len(full) == 4 and len(tail) == 2
    for (x, y, _), (xf, yf, _) in zip(tail, full[2:]):
        assert torch.equal(x, xf) and torch.equal(y, yf)


def test_each_images_augmentation_does_not_depend_on_the_batch_size():
    split = _split(6, sizes=((20, 30), (14, 26), (24, 18)))  # mixed sizes: padded differently per batch
    out = {}
    for bs in (1, 2, 3):
        batches = _epoch(SegBatchLoader(split, bs, MEAN, STD, train=True, crop_size=(16, 20), seed=4), 5)
        out[bs] = (torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches]))
    for bs in (2, 3):
        assert torch.allclose(out[bs][0], out[1][0], atol=1e-4)
        assert torch.equal(out[bs][1], out[1][1])


def test_augmented_labels_keep_their_values_nearest_not_interpolated():
    split = _split(8, classes=1)
    for label in split.labels:  # a checkerboard of 0 and 7: interpolation would invent 1..6
        label.copy_(torch.where((torch.arange(20)[:, None] + torch.arange(30)) % 2 == 0, 0, 7).to(torch.uint8))
    loader = SegBatchLoader(split, 4, MEAN, STD, train=True, crop_size=(24, 24), scale=(0.6, 1.7))
    seen = set()
    for epoch in range(3):
        for _, y, _ in _epoch(loader, epoch):
            seen |= set(torch.unique(y).tolist())
    assert seen <= {0, 7, VOID} and {0, 7} <= seen


def test_beyond_the_image_the_label_is_void_and_the_image_the_mean_colour():
    split = _split(4, sizes=((20, 30), (10, 12)))
    for label in split.labels:
        label.clamp_(max=2)
    loader = SegBatchLoader(split, 4, MEAN, STD, train=True, crop_size=(40, 40), scale=(1., 1.), hflip=0.)
    x, y, _ = _epoch(loader)[0]
    order = loader._order().tolist()
    for b, i in enumerate(order):
        h, w = split.labels[i].shape
        assert int((y[b] != VOID).sum()) == h * w  # scale 1: exactly the image inside the crop
        void = (y[b] == VOID).float()[None, None]
        # image pixels more than a pixel away from any labelled pixel are exactly the mean colour (0)
        far = F_max_pool(void) == 1
        assert far.sum() > 0 and (x[b][:, far] == 0).all()
        assert (x[b][:, y[b] != VOID].abs() > 1e-3).float().mean() > 0.95  # random pixels: rarely the mean


def F_max_pool(void: torch.Tensor) -> torch.Tensor:
    """1 where a pixel and its 8 neighbours are all void."""
    return -torch.nn.functional.max_pool2d(-void, 3, stride=1, padding=1)[0, 0]


def test_flip_and_scale_move_image_and_label_together():
    # 6 classes in blocks (2 rows x 3 columns, so that a flip changes the picture); colour encodes the class
    palette = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250],
                            [250, 10, 250]], dtype=torch.uint8)
    label = (torch.arange(20)[:, None] // 10 * 3 + torch.arange(30)[None, :] // 10).to(torch.uint8)
    image = palette[label.long()].permute(2, 0, 1).contiguous()
    split = SegSplit([image] * 8, [label] * 8, [f'i{i}' for i in range(8)])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for hflip in (0., 1.):
        loader = SegBatchLoader(split, 8, MEAN, STD, train=True, crop_size=(18, 22), scale=(0.5, 2.), hflip=hflip)
        x, y, _ = _epoch(loader)[0]
        colours = x * std + mean  # back to 0..255
        distance = ((colours[:, None] - palette.float()[None, :, :, None, None]) ** 2).sum(2)
        nearest = distance.argmin(1)
        for b in range(8):
            same = torch.ones_like(y[b], dtype=torch.bool)
            for dy in (-1, 0, 1):  # pixels whose neighbourhood is one class: no edge blending there
                for dx in (-1, 0, 1):
                    same &= torch.roll(y[b], (dy, dx), (0, 1)) == y[b]
            same[[0, -1], :] = False
            same[:, [0, -1]] = False
            same &= y[b] != VOID
            assert same.sum() > 20
            assert torch.equal(nearest[b][same], y[b][same])
    # scale 1 and the whole image as the crop: exactly the image, flipped or not
    for hflip in (0., 1.):
        loader = SegBatchLoader(split, 2, MEAN, STD, train=True, crop_size=(20, 30), scale=(1., 1.), hflip=hflip)
        x, y, _ = _epoch(loader)[0]
        want = label.flip(-1) if hflip else label
        assert torch.equal(y[0], want.long())
        expected = (image.float()[None] - mean) / std
        assert torch.allclose(x[0], (expected.flip(-1) if hflip else expected)[0], atol=1e-4)


def test_crop_batch_scales_labels_by_nearest_neighbour():
    label = torch.randint(0, 5, (1, 6, 8), dtype=torch.uint8)
    images = torch.randn(1, 3, 6, 8)
    x, y = crop_batch(images, label, torch.tensor([2.]), torch.tensor([0.]), torch.tensor([0.]),
                      torch.tensor([False]), (12, 16))
    assert torch.equal(y[0], label[0].long().repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert x.shape == (1, 3, 12, 16)


def test_validation_yields_whole_images_in_same_size_runs_split_over_ranks():
    sizes = [(20, 30), (20, 30), (20, 30), (14, 26), (20, 30), (14, 26), (14, 26)]
    split = _split(7)
    for i, (h, w) in enumerate(sizes):
        split.images[i] = split.images[i][:, :h, :w].contiguous()
        split.labels[i] = split.labels[i][:h, :w].contiguous()
    loader = SegBatchLoader(split, 2, MEAN, STD, train=False, crop_size=(8, 8))
    batches = list(loader)
    assert [tuple(y.shape) for _, y, _ in batches] == [(2, 20, 30), (1, 20, 30), (1, 14, 26), (1, 20, 30),
                                                      (2, 14, 26)]
    assert len(loader) == 5
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    x, y, _ = batches[2]
    assert torch.allclose(x[0], (split.images[3].float() - mean) / std, atol=1e-5)
    assert torch.equal(y[0], split.labels[3].long())
    for rank in range(3):  # rank r: images r, r + 3, ...
        got = [yy for _, y, _ in SegBatchLoader(split, 4, MEAN, STD, train=False, rank=rank, world=3) for yy in y]
        assert len(got) == len(range(rank, 7, 3))
        assert all(torch.equal(g, split.labels[i].long()) for g, i in zip(got, range(rank, 7, 3)))


def test_training_ranks_take_disjoint_shares_and_a_too_small_split_is_an_error():
    split = _split(8)
    for i, label in enumerate(split.labels):
        label.fill_(i % 3)
        label[0, 0] = VOID
    shares = []
    for rank in range(2):
        loader = SegBatchLoader(split, 2, MEAN, STD, train=True, crop_size=(20, 30), scale=(1., 1.), rank=rank,
                                world=2, seed=3)
        assert len(loader) == 2
        shares.append(loader._order().tolist())
    assert set(shares[0]).isdisjoint(shares[1]) and len(shares[0] + shares[1]) == 8
    with pytest.raises(ValueError, match='do not fill one batch of 16; use a smaller batch size'):
        SegBatchLoader(split, 16, MEAN, STD, train=True)
