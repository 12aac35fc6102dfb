"""Cached soft labels (07a_soft_labels): a cached map equals a fresh teacher pass, the cache follows its teachers and
is rebuilt when damaged, the maps move with their images through real DataLoader workers, the teacher does not run
when every term reads the cache, and a killed distillation from cached labels resumes to the uninterrupted weights."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinkd.schema import AugmentConfig, ModelConfig
from skinkd.config import load_config
from skinkd.synthetic import make_synthetic
from skinkd.data import discover
from skinkd.cache import build_cache
from skinkd.loaders import SegDataset, build_loader, build_transforms
from skinkd.models import build_model
from skinkd.checkpoints import load_model, save_checkpoint
from skinkd.infer import predict
from skinkd.soft_labels import SoftLabels, build_soft_labels, freeze, probs_to_logits

from test_training import _kill_in_epoch_2_and_resume, data_args, last_json, run, teacher  # noqa: F401 (fixtures)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    "Synthetic pairs, their 48-px cache and a config caching soft labels beside it."
    tmp = tmp_path_factory.mktemp('soft')
    make_synthetic(tmp / 'syn', 10, 64, seed=2)
    cfg = load_config(overrides=[f'data.cache_dir={tmp / "cache"}', 'data.image_size=48', 'train.amp=none',
                                 'distill.soft_labels=cached', 'distill.cache_scales=[0.75, 1.0]'])
    samples = discover(tmp / 'syn')
    return tmp, cfg, samples, build_cache(samples, cfg.data.cache_dir, 48)


def save_teacher(path, seed: int, size: int = 48):
    "An untrained ResNet-18 'teacher' checkpoint that says it was trained at `size` px."
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(ModelConfig('resnet18')), ModelConfig('resnet18'), 'teacher',
                           preprocessing={'image_size': size, 'mirror_pad': True, 'normalize': True})


def built(paths, samples, cache, cfg):
    "build_soft_labels, and what it printed."
    with contextlib.redirect_stderr(io.StringIO()) as err: soft = build_soft_labels(paths, samples, cache, cfg)
    return soft, err.getvalue()


def test_cached_maps_equal_a_fresh_ensemble_pass_at_the_teachers_own_size(images):
    tmp, cfg, samples, cache = images
    a, b = save_teacher(tmp / 'a.pt', 0, size=64), save_teacher(tmp / 'b.pt', 1)
    soft, said = built([a, b], samples, cache, cfg)
    assert 'building the soft labels of 10 images (2 teacher(s), flip TTA, scales [0.75, 1.0]): ' in said
    assert soft.logits.shape == (10, 1, 48, 48) and soft.logits.dtype == np.float16
    big = build_cache(samples, cfg.data.cache_dir, 64)            # teacher a sees its own 64 px
    pa = F.interpolate(predict(freeze(load_model(a)[0]), big, tta=True, scales=(0.75, 1.0)), size=(48, 48),
                       mode='bilinear', antialias=True)
    pb = predict(freeze(load_model(b)[0]), cache, tta=True, scales=(0.75, 1.0))
    expected = probs_to_logits((pa + pb) / 2)
    cached = torch.from_numpy(np.asarray(soft.logits, dtype=np.float32))
    assert (cached - expected).abs().max() < 2e-2                      # float16 logits: a step of 1/64 at |z| > 8
    assert (torch.sigmoid(cached) - torch.sigmoid(expected)).abs().max() < 5e-4
    meta = json.loads((soft.path / 'meta.json').read_text())
    assert meta['ids'] == list(cache.ids) and meta['scales'] == [0.75, 1.0] and len(meta['digests']) == 2


def test_the_cache_follows_its_teachers_and_settings_and_rebuilds_when_damaged(images):
    tmp, cfg, samples, cache = images
    t = save_teacher(tmp / 't.pt', 3)
    first, said = built([t], samples, cache, cfg)
    again, said_again = built([t], samples, cache, cfg)
    assert again.path == first.path and said_again == ''              # intact: reused, nothing computed
    no_tta = load_config(overrides=[f'data.cache_dir={cfg.data.cache_dir}', 'data.image_size=48', 'train.amp=none',
                                    'distill.soft_labels=cached', 'distill.cache_tta=false'])
    assert built([t], samples, cache, no_tta)[0].path != first.path   # another setting: another cache
    blob = (first.path / 'logits.npy').read_bytes()
    (first.path / 'logits.npy').write_bytes(blob[:-1000])             # truncated
    repaired, said = built([t], samples, cache, cfg)
    assert repaired.path == first.path and f'cache {first.path} is damaged (logits.npy has' in said
    assert 'rebuilding it' in said and (first.path / 'logits.npy').read_bytes() == blob
    save_teacher(t, 4)                                                # retrained into the same file
    other, said = built([t], samples, cache, cfg)
    assert other.path != first.path and 'building the soft labels of ' in said and '(1 teacher(s), ' in said
    assert not np.array_equal(np.asarray(other.logits), np.asarray(first.logits))


def test_soft_maps_move_with_their_images_through_loader_workers(images):
    "Logits made from each image's own mask: after real augmentation in workers, their sign is the augmented mask."
    _, _, _, cache = images
    logits = np.asarray(cache.masks, dtype=np.float16)[:, None] * 16 - 8      # +8 in the lesion, -8 outside
    aug = AugmentConfig(affine_p=1.0, degrees=45, translate=0.2, shear=10, resized_crop_p=1.0, jitter_p=1.0)
    ds = SegDataset(cache, build_transforms(aug, train=True, size=48), soft=logits)
    loader = build_loader(ds, batch_size=5, shuffle=True, num_workers=2, seed=0)
    seen = 0
    for batch in loader:
        mask, soft = batch['mask'], batch['soft']
        assert soft.shape == mask.shape and soft.dtype == torch.float32
        band = F.max_pool2d(mask, 5, 1, 2) != -F.max_pool2d(-mask, 5, 1, 2)   # where nearest and bilinear may differ
        assert ((soft > 0) == (mask > 0.5))[~band].all()
        assert ((soft > -7.9) & (soft < 7.9)).any()                           # resampled bilinearly: soft edges
        seen += len(mask)
    assert seen == len(cache)


@pytest.mark.parametrize('terms,line', [
    ('[{kind: logit, tap: logits, weight: 1.0}]', 'logit_logits read them, and the teacher does not run while training'),
    ('[{kind: hint, tap: decoder, weight: 1.0}, {kind: logit, tap: logits, weight: 1.0}]',
     'soft labels: cached for logit_logits; hint_decoder need the teacher'),
])
def test_distillation_from_cached_labels_says_what_still_needs_the_teacher(data_args, teacher, tmp_path, terms, line):
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    p = run(['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw), '--out', str(tmp_path / 'r'),
             '--set', 'distill.soft_labels=cached', '--set', f'distill.terms={terms}'])
    assert line in p.stdout and last_json(p.stdout)['epochs'] == 2
    ck = torch.load(tmp_path / 'r' / 'checkpoints' / 'last.pt', weights_only=False)
    assert ck['extra']['config']['distill']['soft_labels'] == 'cached'
    cache_dir = next(a.split('=', 1)[1] for a in data_args if a.startswith('data.cache_dir='))
    soft = [SoftLabels(f) for f in Path(cache_dir).glob('soft-*')]
    assert any(s.meta['teachers'] == [str(tw)] and s.meta['tta'] for s in soft)


def test_a_killed_distillation_from_cached_labels_resumes_to_the_uninterrupted_weights(data_args, teacher, tmp_path):
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    _kill_in_epoch_2_and_resume(['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw),
                                 '--set', 'train.deterministic=true', '--set', 'train.epochs=3', '--set', 'data.num_workers=1',
                                 '--set', 'train.batch_size=2', '--set', 'data.labeled_fraction=0.5',
                                 '--set', 'distill.soft_labels=cached',
                                 '--set', 'distill.terms=[{kind: logit, tap: logits, weight: 1.0}]'], tmp_path)


def test_resume_refuses_changed_soft_label_settings(data_args, teacher, tmp_path):
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    base = ['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw), '--out', str(tmp_path / 'r'),
            '--set', 'train.epochs=1', '--set', 'distill.soft_labels=cached']
    run(base)
    p = run([*base, '--set', 'train.epochs=2', '--set', 'train.resume=true', '--set', 'distill.cache_tta=false'], check=False)
    assert p.returncode == 1 and 'changed since it was written: distill.cache_tta' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
