"""Tests of the data chapters (skinkd.data, checks, cache, loaders): layouts, checks, splits, synthetic data, cache,
augmentation, loaders and CLIs."""
import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from skinkd.schema import AugmentConfig
from skinkd.config import load_config
from skinkd.core import DataError
from skinkd.synthetic import make_synthetic
from skinkd.data import Sample, detect_layout, discover, load_pair, split_samples
from skinkd.checks import check_data, usable_samples
from skinkd.cache import build_cache, mirror_pad_to_square, restore_original
from skinkd.cache import denormalize
from skinkd.loaders import EpochSampler, SegDataset, build_loader, build_transforms, get_data
from skinkd.synthetic import synth_image


def _pair(h=24, w=32, seed=0):
    """A small synthetic image (PIL RGB) and its 0/255 mask (PIL L)."""
    im, m = synth_image(np.random.default_rng(seed), h, w)
    return Image.fromarray(im), Image.fromarray(m.astype(np.uint8) * 255)


def _write(img_path: Path, mask_path: Path | None, seed=0, h=24, w=32):
    img_path.parent.mkdir(parents=True, exist_ok=True)
    im, m = _pair(h, w, seed)
    im.save(img_path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        m.save(mask_path)


# ---------------------------------------------------------------- layouts on generated fixtures
def _isic2016(root):
    for i, part in enumerate(('Training', 'Training', 'Test')):
        _write(root / f'ISBI2016_ISIC_Part1_{part}_Data' / f'ISIC_{i:07d}.jpg',
               root / f'ISBI2016_ISIC_Part1_{part}_GroundTruth' / f'ISIC_{i:07d}_Segmentation.png', seed=i)
    return {'train': 2, 'test': 1}


def _isic2017(root):
    for i, part in enumerate(('Training', 'Training', 'Validation', 'Test_v2')):
        _write(root / f'ISIC-2017_{part}_Data' / f'ISIC_{i:07d}.jpg',
               root / f'ISIC-2017_{part}_Part1_GroundTruth' / f'ISIC_{i:07d}_segmentation.png', seed=i)
        Image.new('RGB', (32, 24)).save(root / f'ISIC-2017_{part}_Data' / f'ISIC_{i:07d}_superpixels.png')
    (root / 'ISIC-2017_Training_Data' / 'ISIC-2017_Training_Data_metadata.csv').write_text('image_id,age\n')
    return {'train': 2, 'val': 1, 'test': 1}


def _isic2018(root):
    make_synthetic(root, n=10, size=32, seed=0)
    return {'train': 7, 'val': 1, 'test': 2}


def _ph2(root):
    base = root / 'PH2Dataset' / 'PH2 Dataset images'
    for i in (2, 3, 4):
        n = f'IMD{i:03d}'
        _write(base / n / f'{n}_Dermoscopic_Image' / f'{n}.bmp', base / n / f'{n}_lesion' / f'{n}_lesion.bmp', seed=i)
    return {None: 3}


def _generic(root):
    for i, suffix in enumerate(('', '_segmentation', '_mask', '_lesion')):
        _write(root / 'images' / f'img{i}.png', root / 'masks' / f'img{i}{suffix}.png', seed=i)
    return {None: 4}


LAYOUT_FIXTURES = dict(isic2016=_isic2016, isic2017=_isic2017, isic2018=_isic2018, ph2=_ph2, generic=_generic)


@pytest.mark.parametrize('layout', list(LAYOUT_FIXTURES))
def test_layout_discovery(tmp_path, layout):
    expected = LAYOUT_FIXTURES[layout](tmp_path)
    assert detect_layout(tmp_path) == layout
    for name in ('auto', layout):
        samples = discover(tmp_path, name)
        assert all(s.mask is not None and s.mask.is_file() and s.image.is_file() for s in samples)
        assert {k: sum(s.split == k for s in samples) for k in expected} == expected
        assert not any('superpixels' in s.image.name for s in samples)
    report = check_data(tmp_path, layout)
    assert report.ok, report.summary()
    splits = split_samples(report.good, 0.25, 0.25, seed=0)
    assert sum(map(len, splits.values())) == len(report.good) and splits['train']


def test_forced_wrong_layout_and_missing_root(tmp_path):
    _generic(tmp_path)
    with pytest.raises(DataError, match='has no isic2018 folders'):
        discover(tmp_path, 'isic2018')
    with pytest.raises(DataError, match=r'not found; .*skinkd_synth'):
        discover(tmp_path / 'missing')
    (tmp_path / 'other').mkdir()
    with pytest.raises(DataError, match='no known dataset layout'):
        discover(tmp_path / 'other')


def test_isic_part_without_ground_truth_is_ignored(tmp_path):
    _isic2018(tmp_path)
    shutil.rmtree(tmp_path / 'ISIC2018_Task1_Test_GroundTruth')
    with pytest.warns(UserWarning, match='no ground-truth folder'):
        samples = discover(tmp_path)
    assert {s.split for s in samples} == {'train', 'val'}


# ---------------------------------------------------------------- real data
REAL = [('isic2018-512', 'isic2018', 2207, (512, 512)), ('isic2017-256', 'isic2017', 206, (256, 256)),
        ('ham10000-5', 'generic', 5, (450, 600))]


@pytest.mark.parametrize('folder,layout,count,hw', REAL)
def test_real_folders(shared_data, tmp_path, folder, layout, count, hw):
    root = shared_data / folder
    if not root.is_dir():
        pytest.skip(f'{root} not present')
    samples = discover(root)
    assert detect_layout(root) == layout and len(samples) == count
    assert all(s.mask is not None for s in samples) and all(s.split == ('train' if layout != 'generic' else None) for s in samples)
    splits = split_samples(samples, 0.15, 0.15, seed=0)
    assert len(splits['val']) > 0 and len(splits['test']) > 0 and sum(map(len, splits.values())) == count
    few = samples[:5]
    report = check_data(root, layout) if count <= 206 else None
    if report is not None:
        assert report.ok, report.summary()
        assert {report.sizes[s.id] for s in few} == {hw}
    cache = build_cache(few, tmp_path / 'cache', size=64)
    assert cache.images.shape == (5, 64, 64, 3) and set(np.unique(cache.masks)) <= {0, 1}
    for i, s in enumerate(few):
        truth = np.asarray(Image.open(s.mask)) > 127
        assert tuple(cache.orig_hw[i]) == hw
        np.testing.assert_array_equal(cache.original_mask(i), truth)
        back = cache.restore(torch.from_numpy(cache.masks[i][None].astype(np.float32)), i)[0].numpy() > 0.5
        dice = 2 * (back & truth).sum() / max(1, back.sum() + truth.sum())
        assert back.shape == hw and dice > 0.9, dice


# ---------------------------------------------------------------- bad input, each case with its message
def _bad_case(root: Path, case: str):
    """A generic folder with one good pair plus the bad case `case`; returns the id concerned."""
    img, msk = root / 'images', root / 'masks'
    _write(img / 'good.png', msk / 'good.png', seed=1)
    im, m = _pair(seed=2)
    if case == 'undecodable_image':
        (img / 'x.jpg').parent.mkdir(parents=True, exist_ok=True); (img / 'x.jpg').write_bytes(b'\xff\xd8 truncated'); m.save(msk / 'x.png')
    elif case == 'undecodable_mask':
        im.save(img / 'x.png'); (msk / 'x.png').write_bytes(b'\x89PNG broken')
    elif case == 'size_mismatch':
        im.save(img / 'x.png'); m.resize((16, 12), Image.NEAREST).save(msk / 'x.png')
    elif case == 'non_binary_mask':
        im.save(img / 'x.png'); Image.fromarray((np.asarray(m) // 2).astype(np.uint8) + 5).save(msk / 'x.png')
    elif case == 'non_utf8_name':  # bytes that are not UTF-8, as a Latin-1 system writes 'é'
        im.save(img / 'x.png'); m.save(msk / 'x.png'); os.rename(bytes(img / 'x.png'), bytes(img) + b'/x\xe9.png')
        os.rename(bytes(msk / 'x.png'), bytes(msk) + b'/x\xe9.png'); return 'x\udce9'
    elif case == 'image_without_mask':
        im.save(img / 'x.png')
    elif case == 'mask_without_image':
        m.save(msk / 'x.png')
    return 'x'


BAD = {'undecodable_image': 'cannot decode image', 'undecodable_mask': 'cannot decode mask',
       'size_mismatch': 'is 32x24 but mask', 'non_binary_mask': 'not 0/255 or 0/1; save it as a binary PNG',
       'non_utf8_name': 'is not valid UTF-8; rename the file', 'image_without_mask': 'has no mask; add its mask',
       'mask_without_image': 'has no image; add the image'}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_is_reported(tmp_path, case):
    _bad_case(tmp_path, case)
    report = check_data(tmp_path)
    assert not report.ok and report.n_bad == 1
    lines = report.bad_lines()
    assert len(lines) == 1 and BAD[case] in lines[0] and str(tmp_path) in lines[0], lines
    assert [s.id for s in usable_samples(report, skip_bad=True)] == ['good']
    with pytest.raises(DataError, match=r'1 unusable image/mask pairs in .*first: .*skip_bad'):
        usable_samples(report)


@pytest.mark.parametrize('mode,note', [('L', 'grayscale image converted'), ('RGBA', 'RGBA (alpha dropped)'),
                                       ('P', 'palette image converted'), ('I;16', '16-bit image converted')])
def test_converted_images_are_reported_and_usable(tmp_path, mode, note):
    _write(tmp_path / 'images' / 'good.png', tmp_path / 'masks' / 'good.png', seed=1)
    im, m = _pair(seed=2)
    conv = Image.fromarray(np.asarray(im.convert('L')).astype(np.uint16) * 257) if mode == 'I;16' else im.convert(mode)
    conv.save(tmp_path / 'images' / 'x.png'); m.save(tmp_path / 'masks' / 'x.png')
    report = check_data(tmp_path)
    assert report.ok and note in report.notes['x'][0] and 'x.png' in report.notes['x'][0]
    cache = build_cache(report.good, tmp_path / 'cache', size=16)
    assert cache.images.shape == (2, 16, 16, 3)


def test_zero_one_masks_and_duplicates(tmp_path):
    _write(tmp_path / 'images' / 'a.png', tmp_path / 'masks' / 'a.png', seed=1)
    shutil.copy(tmp_path / 'images' / 'a.png', tmp_path / 'images' / 'b.png')
    m = (np.asarray(Image.open(tmp_path / 'masks' / 'a.png')) > 0).astype(np.uint8)  # a 0/1 mask is fine
    Image.fromarray(m).save(tmp_path / 'masks' / 'b.png')
    report = check_data(tmp_path)
    assert report.ok and report.duplicates == [['a', 'b']]
    assert 'exact duplicates' in report.summary()
    splits = split_samples(report.good, 0.5, 0.0, seed=0, groups=report.duplicates)
    assert sorted(len(v) for v in splits.values()) == [0, 0, 2]  # the duplicates stay on one side


def test_training_stops_on_bad_data_unless_skip_bad(tmp_path):
    _bad_case(tmp_path / 'd', 'size_mismatch')
    for i in range(4):
        _write(tmp_path / 'd' / 'images' / f'g{i}.png', tmp_path / 'd' / 'masks' / f'g{i}.png', seed=10 + i)
    params = {'data.root': str(tmp_path / 'd'), 'data.cache_dir': str(tmp_path / 'c'), 'data.num_workers': 0,
              'data.image_size': 32, 'data.val_fraction': 0.2, 'data.test_fraction': 0.2}
    with pytest.raises(DataError, match=r"1 unusable image/mask pairs .*x\.png.*skinkd_check_data"):
        get_data(load_config(params=params))
    bundle = get_data(load_config(params={**params, 'data.skip_bad': True}))
    assert sum(len(v) for v in bundle.samples.values()) == 5 and 'x' not in {s.id for v in bundle.samples.values() for s in v}


# ---------------------------------------------------------------- splits
def _flat(n):
    return [Sample(f'id{i:03d}', Path(f'/x/{i}.jpg'), Path(f'/x/{i}.png'), None) for i in range(n)]


def test_hash_split_is_deterministic_and_order_free():
    s = _flat(200)
    a = split_samples(s, 0.15, 0.15, seed=3)
    b = split_samples(list(reversed(s)), 0.15, 0.15, seed=3)
    assert {k: sorted(x.id for x in v) for k, v in a.items()} == {k: sorted(x.id for x in v) for k, v in b.items()}
    assert [len(a[k]) for k in ('train', 'val', 'test')] == [140, 30, 30]
    c = split_samples(s, 0.15, 0.15, seed=4)
    assert {x.id for x in c['val']} != {x.id for x in a['val']}


def test_groups_file_honoured_by_every_split(tmp_path):
    s = _flat(60)
    groups = [[f'id{i:03d}' for i in range(0, 8)], ['id010', 'id011']]
    gf = tmp_path / 'groups.csv'
    with open(gf, 'w', newline='') as f:
        csv.writer(f).writerows(groups)
    def side(splits, ids):
        return {k for k, v in splits.items() for x in v if x.id in ids}
    for seed in range(5):  # hash split
        sp = split_samples(s, 0.2, 0.2, seed=seed, groups_file=gf)
        assert all(len(side(sp, set(g))) == 1 for g in groups)
    official = [x._replace(split='test' if i == 5 else 'val' if i == 10 else 'train') for i, x in enumerate(s)]
    sp = split_samples(official, groups_file=gf)  # groups straddling official parts move to the held-out side
    assert side(sp, set(groups[0])) == {'test'} and side(sp, set(groups[1])) == {'val'}
    sf = tmp_path / 'split.csv'
    sf.write_text('id,split\n' + ''.join(f'{x.id},{"test" if i == 3 else "train"}\n' for i, x in enumerate(s)))
    sp = split_samples(s, split_file=sf, groups_file=gf)
    assert side(sp, set(groups[0])) == {'test'} and len(sp['test']) == 8


def test_split_file_errors(tmp_path):
    s = _flat(4)
    (tmp_path / 'a.csv').write_text('id,split\nid000,train\n')
    with pytest.raises(DataError, match=r'a\.csv has no row for 3 ids .*data\.split_file'):
        split_samples(s, split_file=tmp_path / 'a.csv')
    (tmp_path / 'b.csv').write_text('id000,training\n')
    with pytest.raises(DataError, match=r'b\.csv, line 1: split must be train, val or test'):
        split_samples(s, split_file=tmp_path / 'b.csv')
    with pytest.raises(DataError, match='groups file .* not found'):
        split_samples(s, groups_file=tmp_path / 'nope.csv')


def test_official_training_only_gets_carved_val_and_test():
    s = [x._replace(split='train') for x in _flat(100)]
    sp = split_samples(s, 0.1, 0.2, seed=0)
    assert [len(sp[k]) for k in ('train', 'val', 'test')] == [70, 10, 20]


# ---------------------------------------------------------------- synthetic data
def test_make_synthetic_is_deterministic_and_atomic(tmp_path):
    a, b = make_synthetic(tmp_path / 'a', 6, 48, seed=1), make_synthetic(tmp_path / 'b', 6, 48, seed=1)
    fa = sorted(p.relative_to(a) for p in a.rglob('*.*'))
    assert fa == sorted(p.relative_to(b) for p in b.rglob('*.*')) and len(fa) == 13
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)
    c = make_synthetic(tmp_path / 'c', 6, 48, seed=2)
    assert (c / fa[0]).read_bytes() != (a / fa[0]).read_bytes() or (c / fa[1]).read_bytes() != (a / fa[1]).read_bytes()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.'))
    assert left == ['.a.lock', '.b.lock', '.c.lock']  # no temporary folders left; the build locks stay, released
    assert all((tmp_path / name).read_text() == '' for name in left)
    make_synthetic(tmp_path / 'a', 8, 48, seed=1)  # a generated folder is replaced
    assert len(discover(tmp_path / 'a')) == 8
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('x')
    with pytest.raises(DataError, match='not a skinkd synthetic folder'):
        make_synthetic(tmp_path / 'mine', 4, 32)


def test_synthetic_images_are_realistic_enough():
    for i in range(20):
        im, m = synth_image(np.random.default_rng([0, i]), 96, 128)
        assert 0.01 < m.mean() < 0.8
        g = im.mean(axis=2)
        assert g[m].mean() < g[~m & (g > 40)].mean()  # lesions are darker than the skin around them (vignette left out), ...
    assert np.std([synth_image(np.random.default_rng([0, i]), 64, 64)[0].mean() for i in range(20)]) > 10  # ... tones vary


# ---------------------------------------------------------------- padding, cache
def test_mirror_pad_and_restore_original():
    a = np.arange(12).reshape(3, 4)
    p = mirror_pad_to_square(a)
    assert p.shape == (4, 4) and (p[:3] == a).all() and (p[3] == a[1]).all()
    x = torch.rand(1, 40, 40)
    assert torch.equal(restore_original(x, (30, 40)), x[:, 5:35])


def test_cache_is_keyed_and_invalidated(tmp_path):
    root = make_synthetic(tmp_path / 's', 6, 40, seed=0)
    samples = discover(root)
    c1 = build_cache(samples, tmp_path / 'cache', size=32)
    assert build_cache(samples, tmp_path / 'cache', size=32).path == c1.path
    assert c1.masks.dtype == np.uint8 and isinstance(c1.images, np.memmap)
    assert build_cache(samples, tmp_path / 'cache', size=32, mask_resize='area').path != c1.path
    assert build_cache(samples, tmp_path / 'cache', size=32, mirror_pad=False).path != c1.path
    Image.new('L', Image.open(samples[0].mask).size, 255).save(samples[0].mask)  # the user fixes a mask
    os.utime(samples[0].mask, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    c2 = build_cache(samples, tmp_path / 'cache', size=32)
    assert c2.path != c1.path and c2.masks[0].all() and not c1.masks[0].all()
    assert not [p for p in (tmp_path / 'cache').iterdir() if p.name.startswith('.') and not p.name.endswith('.lock')]


# ---------------------------------------------------------------- augmentation
def _red_is_lesion(n=64):
    """An image whose lesion (an L shape) is red and background green: the mask is recomputable from pixels."""
    m = np.zeros((n, n), np.uint8); m[8:40, 10:22] = 1; m[30:40, 10:50] = 1
    img = np.stack([m * 200 + 30, (1 - m) * 200 + 30, np.full_like(m, 40)])
    return tv_tensors.Image(torch.from_numpy(img)), tv_tensors.Mask(torch.from_numpy(m)[None])


def test_augmentation_keeps_geometry_and_binary_masks():
    torch.manual_seed(0)
    img, mask = _red_is_lesion()
    cfg = AugmentConfig(affine_p=1.0, degrees=60, translate=0.2, shear=10, resized_crop_p=0.5)  # jitter + normalise on
    tf = build_transforms(cfg, train=True, size=64)
    moved = 0
    for _ in range(30):
        ti, tm = tf(img, mask)
        assert ti.dtype == torch.float32 and tm.dtype == torch.uint8 and set(tm.unique().tolist()) <= {0, 1}
        rgb = denormalize(ti)
        inside = (rgb[0] > rgb[1]) & (rgb[0] > 0.05)  # red beats green on the lesion, black borders are background
        assert (inside == tm[0].bool()).float().mean() > 0.97
        moved += not torch.equal(tm, mask)
    assert moved > 20
    ti, tm = build_transforms(cfg, train=False)(img, mask)  # evaluation: no geometry change
    assert torch.equal(tm, mask) and ti.shape == (3, 64, 64)


# ---------------------------------------------------------------- loaders
def test_loader_with_workers_is_seeded(tmp_path):
    root = make_synthetic(tmp_path / 's', 12, 40, seed=0)
    cache = build_cache(discover(root), tmp_path / 'cache', size=32)
    ds = SegDataset(cache, build_transforms(AugmentConfig(), train=True, size=32))
    def first(seed):
        dl = build_loader(ds, 4, shuffle=True, num_workers=2, seed=seed, drop_last=True)
        assert dl.persistent_workers and dl.num_workers == 2 and not dl.pin_memory
        batches = [b for b in dl]
        return batches[0]
    a, b, c = first(0), first(0), first(1)
    assert a['image'].shape == (4, 3, 32, 32) and a['mask'].shape == (4, 1, 32, 32)
    assert torch.equal(a['index'], b['index']) and torch.equal(a['image'], b['image'])  # same seed, same batch
    assert not torch.equal(a['image'], c['image'])


def test_get_data_generates_synthetic_data(tmp_path):
    cfg = load_config(params={'data.root': str(tmp_path / 'syn'), 'data.synthetic_n': 10, 'data.image_size': 32,
                              'data.cache_dir': str(tmp_path / 'cache'), 'data.num_workers': 0, 'train.batch_size': 2})
    bundle = get_data(cfg)
    assert (tmp_path / 'syn' / 'synthetic.json').is_file()
    assert {k: len(v) for k, v in bundle.datasets.items()} == {'train': 7, 'val': 1, 'test': 2}
    assert bundle.loaders['train'].drop_last and not bundle.loaders['val'].drop_last
    batch = next(iter(bundle.loaders['train']))
    assert batch['image'].shape == (2, 3, 32, 32) and set(batch['mask'].unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------- command lines
def _run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_cli_synth_and_check(tmp_path):
    r = _run('skinkd_synth', '--out', str(tmp_path / 's'), '--n', '5', '--size', '32', '--seed', '3')
    assert r.returncode == 0 and 'wrote 5 synthetic images' in r.stdout, r.stderr
    r = _run('skinkd_check_data', '--data', str(tmp_path / 's'))
    assert r.returncode == 0 and 'isic2018 layout, 5 images, 5 masks' in r.stdout and 'OK: all 5 pairs usable' in r.stdout
    _bad_case(tmp_path / 'bad', 'size_mismatch')
    r = _run('skinkd_check_data', '--data', str(tmp_path / 'bad'), '--layout', 'generic')
    assert r.returncode == 1 and 'is 32x24 but mask' in r.stdout and 'FAIL: 1 unusable' in r.stdout
    r = _run('skinkd_check_data', '--data', str(tmp_path / 'missing'))
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'skinkd_check_data: error: data folder' in r.stderr


def test_epoch_is_reproducible_from_scratch_with_workers(tmp_path):
    """What exact resume needs: epoch 2 of a fresh loader equals epoch 2 of a loader that ran epochs 0 and 1."""
    root = make_synthetic(tmp_path / 's', 12, 40, seed=0)
    ds = SegDataset(build_cache(discover(root), tmp_path / 'cache', size=32), build_transforms(AugmentConfig(), train=True, size=32))
    def epoch(dl, e):
        dl.sampler.set_epoch(e)
        return [b for b in dl]
    running = build_loader(ds, 4, shuffle=True, num_workers=2, seed=3)
    seen = [epoch(running, e) for e in range(3)]
    fresh = epoch(build_loader(ds, 4, shuffle=True, num_workers=1, seed=3), 2)
    assert all(torch.equal(a['image'], b['image']) and torch.equal(a['mask'], b['mask']) for a, b in zip(seen[2], fresh))
    assert not torch.equal(seen[1][0]['image'], seen[2][0]['image'])


def test_epoch_sampler_shards_like_distributed_sampler(tmp_path):
    import torch.distributed as dist
    shards = []
    for rank in (0, 1):
        s = EpochSampler(11, shuffle=True, seed=5)
        s.rank, s.world = rank, 2
        shards.append([i for i, _ in s])
    assert len(shards[0]) == len(shards[1]) == 6 and sorted(set(shards[0] + shards[1])) == list(range(11))
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        assert (EpochSampler(4).rank, EpochSampler(4).world) == (0, 1)
    finally:
        dist.destroy_process_group()


def _generic(root):
    for d in ('images', 'masks'): (root / d).mkdir(parents=True, exist_ok=True)
    return root


def test_an_exif_rotated_photo_is_read_as_displayed(tmp_path):
    "A camera photo stored sideways with EXIF orientation 6, its mask drawn on the displayed view: they agree, with a note."
    from PIL import Image
    upright, mask = synth_image(np.random.default_rng(4), 48, 64)
    exif = Image.Exif(); exif[0x0112] = 6  # 'rotate 90 clockwise to display'
    root = _generic(tmp_path / 'phone')
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(root / 'images' / 'a.jpg', quality=95, exif=exif.tobytes())
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / 'masks' / 'a_mask.png')
    report = check_data(root)
    assert report.ok, report.bad_lines()  # was: a size mismatch (64x48 stored, 48x64 mask)
    assert any('turned upright by its EXIF orientation (6)' in n for n in report.notes['a'])
    img, m = load_pair(report.samples[0])
    assert img.shape == (48, 64, 3) and (m == mask).all()
    assert np.abs(img.astype(int) - upright.astype(int)).mean() < 6  # the displayed pixels, up to JPEG noise


def test_a_palette_mask_is_read_through_its_palette(tmp_path):
    "A mode-P mask whose palette maps index 0 to white: the white lesion is the lesion (it was read inverted)."
    from PIL import Image
    shown = np.zeros((20, 30), bool); shown[5:15, 10:20] = True
    root = _generic(tmp_path / 'pal')
    Image.fromarray(synth_image(np.random.default_rng(0), 20, 30)[0]).save(root / 'images' / 'b.png')
    pal = Image.fromarray(np.where(shown, 0, 1).astype(np.uint8), mode='P'); pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    pal.save(root / 'masks' / 'b_mask.png')
    report = check_data(root)
    assert report.ok and any('palette mask read through its palette' in n for n in report.notes['b'])
    assert (load_pair(report.samples[0])[1] == shown).all()


def test_two_images_with_the_same_stem_are_named(tmp_path):
    "a.jpg and a.png would share the id 'a' (and its mask): check_data names both files."
    from PIL import Image
    root = _generic(tmp_path / 'same')
    im, m = synth_image(np.random.default_rng(0), 20, 20)
    for ext in ('jpg', 'png'): Image.fromarray(im).save(root / 'images' / f'a.{ext}')
    Image.fromarray(m.astype(np.uint8) * 255).save(root / 'masks' / 'a_mask.png')
    report = check_data(root)
    assert not report.ok and "share the id 'a'" in report.problems['a'][0]
    assert 'a.jpg' in report.problems['a'][0] and 'a.png' in report.problems['a'][0]


def test_a_synthetic_folder_made_with_other_settings_is_regenerated(tmp_path):
    "A demo whose config asks for 12 synthetic images must not silently train on the 10 an older config generated."
    from skinkd.loaders import prepare_root
    cfg = lambda n: load_config(overrides=[f'data.root={tmp_path / "syn"}', f'data.synthetic_n={n}', 'data.image_size=32'])
    prepare_root(cfg(10)); assert len(discover(tmp_path / 'syn')) == 10
    prepare_root(cfg(12)); assert len(discover(tmp_path / 'syn')) == 12
    mine = tmp_path / 'mine'; (mine / 'images').mkdir(parents=True)  # a user's own folder is never touched
    prepare_root(load_config(overrides=[f'data.root={mine}', 'data.synthetic_n=12'])); assert list(mine.iterdir()) == [mine / 'images']
