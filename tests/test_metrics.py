"""ISIC 2018 Task 1 metrics, HD95, summaries, the streaming accumulator and scoring at the original size (skinkd.metrics)."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from skinkd.infer import predict_mask
from skinkd.metrics import (JACCARD_THRESHOLD, MetricAccumulator, metric_names, as_binary, confusion, hd95,
                            per_image_metrics, score_at_original, summarize)


def one(pred, target, **kw):
    r = per_image_metrics(torch.tensor([pred]), torch.tensor([target]), **kw)
    return {k: v.item() for k, v in r.items()}


# ---------------------------------------------------------------- per-image metrics, by hand

def test_confusion_counts():
    tp, fp, fn, tn = confusion(torch.tensor([[[1, 1, 0], [0, 1, 0]]]), torch.tensor([[[1, 0, 1], [0, 1, 0]]]))
    assert (tp.item(), fp.item(), fn.item(), tn.item()) == (2, 1, 1, 2)
    assert tp.dtype == torch.float64


def test_partial_overlap_by_hand():
    # TP=2 FP=1 FN=1 TN=2
    r = one([[1, 1, 0], [0, 1, 0]], [[1, 0, 1], [0, 1, 0]], with_hd95=False)
    assert r['dice'] == pytest.approx(4 / 6)
    assert r['jaccard'] == pytest.approx(2 / 4)
    assert r['thresholded_jaccard'] == 0.0
    assert r['sensitivity'] == pytest.approx(2 / 3)
    assert r['specificity'] == pytest.approx(2 / 3)
    assert r['accuracy'] == pytest.approx(4 / 6)


def test_thresholded_jaccard_at_the_threshold():
    # 13 of 20 truth pixels predicted, nothing else: J = 0.65 exactly -> kept
    t = torch.zeros(1, 4, 5, dtype=torch.bool); t[0] = True
    p = torch.zeros(1, 4, 5, dtype=torch.bool); p.view(-1)[:13] = True
    r = per_image_metrics(p, t, with_hd95=False)
    assert r['jaccard'].item() == pytest.approx(0.65) and r['thresholded_jaccard'].item() == pytest.approx(0.65)
    p.view(-1)[12] = False                                       # J = 0.6 -> 0
    assert per_image_metrics(p, t, with_hd95=False)['thresholded_jaccard'].item() == 0.0
    assert JACCARD_THRESHOLD == 0.65


def test_empty_truth():
    "A lesion invented on an image without one: HD95 is undefined, so it scores the miss penalty (the diagonal)."
    r = one([[1, 0], [0, 0]], [[0, 0], [0, 0]])
    assert r == dict(dice=0.0, jaccard=0.0, thresholded_jaccard=0.0, sensitivity=1.0, specificity=0.75,
                     accuracy=0.75, hd95=pytest.approx(math.hypot(2, 2)), hd95_miss=1.0)


def test_empty_prediction():
    "A missed lesion scores the diagonal in HD95 and is flagged."
    r = one([[0, 0], [0, 0]], [[0, 1], [1, 1]])
    assert {k: v for k, v in r.items() if not k.startswith('hd95')} == dict(dice=0.0, jaccard=0.0, thresholded_jaccard=0.0,
                                                                          sensitivity=0.0, specificity=1.0, accuracy=0.25)
    assert (r['hd95'], r['hd95_miss']) == (pytest.approx(math.sqrt(8)), 1.0)


def test_a_missed_lesion_counts_in_the_mean_hd95():
    "One perfect image and one missed lesion: the mean HD95 is no longer 0.0 (it was, when misses were left out)."
    t = torch.zeros(2, 30, 40, dtype=torch.bool); t[:, 10:20, 10:20] = True
    p = t.clone(); p[1] = False                                 # image 1: the lesion is missed
    s = summarize(per_image_metrics(p, t))
    assert s['hd95'] == pytest.approx((0.0 + 50.0) / 2)         # the 30x40 image's diagonal is 50 px
    assert s['hd95_misses'] == 1 and s['hd95_std'] > 0 and 'hd95_failures' not in s
    rough = t.clone(); rough[:, 9:21, 9:21] = True              # a model that finds both lesions, 1 px too large
    assert summarize(per_image_metrics(rough, t))['hd95'] < s['hd95']


def test_both_empty():
    r = one([[0, 0], [0, 0]], [[0, 0], [0, 0]])
    assert r == dict(dice=1.0, jaccard=1.0, thresholded_jaccard=1.0, sensitivity=1.0, specificity=1.0, accuracy=1.0, hd95=0.0, hd95_miss=0.0)


def test_full_image():
    r = one([[1, 1], [1, 1]], [[1, 1], [1, 1]])
    assert r == dict(dice=1.0, jaccard=1.0, thresholded_jaccard=1.0, sensitivity=1.0, specificity=1.0, accuracy=1.0, hd95=0.0, hd95_miss=0.0)
    r = one([[1, 1], [1, 0]], [[1, 1], [1, 1]], with_hd95=False)   # truth fills the image: specificity is a freebie
    assert r['specificity'] == 1.0 and r['sensitivity'] == 0.75 and r['jaccard'] == 0.75


def test_dice_jaccard_identity_on_random_masks():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(32, 40, 30, generator=g) > torch.rand(32, 1, 1, generator=g)
    t = torch.rand(32, 40, 30, generator=g) > torch.rand(32, 1, 1, generator=g)
    r = per_image_metrics(p, t, with_hd95=False)
    torch.testing.assert_close(r['jaccard'], r['dice'] / (2 - r['dice']))
    assert all(v.shape == (32,) and v.dtype == torch.float64 for v in r.values())


def test_matches_a_numpy_reference():
    rng = np.random.default_rng(1)
    p, t = rng.random((5, 9, 7)) > 0.5, rng.random((5, 9, 7)) > 0.3
    r = per_image_metrics(torch.tensor(p), torch.tensor(t), with_hd95=False)
    for i in range(5):
        tp, fp, fn, tn = (p[i] & t[i]).sum(), (p[i] & ~t[i]).sum(), (~p[i] & t[i]).sum(), (~p[i] & ~t[i]).sum()
        assert r['dice'][i].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert r['sensitivity'][i].item() == pytest.approx(tp / (tp + fn))
        assert r['specificity'][i].item() == pytest.approx(tn / (tn + fp))


def test_input_validation():
    with pytest.raises(ValueError, match='threshold probabilities'):
        per_image_metrics(torch.full((1, 2, 2), 0.3), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match='differ in shape'):
        per_image_metrics(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r'\(N, H, W\)'):
        as_binary(torch.zeros(2, 2))
    assert as_binary(torch.ones(3, 1, 4, 4)).shape == (3, 4, 4)


def test_predict_mask():
    z = torch.tensor([[[[-0.1, 0.0, 0.1]]]])
    assert predict_mask(z).tolist() == [[[False, False, True]]]          # strictly above the threshold, as the scorer
    assert predict_mask(z, threshold=0.48).tolist() == [[[False, True, True]]]
    z3 = torch.tensor([[[[5.0, 0.0]], [[0.0, 0.0]], [[0.0, 5.0]]]])
    assert predict_mask(z3).tolist() == [[[False, True]]]                 # multi-class: argmax != background


# ---------------------------------------------------------------- HD95

def blank(h=24, w=24):
    return torch.zeros(1, h, w, dtype=torch.bool)


def test_hd95_single_pixels():
    a, b = blank(), blank()
    a[0, 1, 1] = True; b[0, 7, 9] = True                                 # 6-8-10 triangle
    assert hd95(a, b).item() == pytest.approx(10.0)


def test_hd95_shifted_square():
    # a 10x10 square shifted right by 3: contour distances are 0 on the shared rows' overlap and up to 3
    a, b = blank(), blank()
    a[0, 5:15, 5:15] = True; b[0, 5:15, 8:18] = True
    ref = _hd95_bruteforce(a[0].numpy(), b[0].numpy())
    assert hd95(a, b).item() == pytest.approx(ref)
    assert hd95(a, b).item() == pytest.approx(3.0)


def test_hd95_concentric_squares():
    outer, inner = blank(), blank()
    outer[0, 5:15, 5:15] = True; inner[0, 7:13, 7:13] = True
    # 56 distances: 44 of 2, 8 of sqrt 5, 4 of sqrt 8; the 95th percentile (index 52.25) is sqrt 8
    assert hd95(inner, outer).item() == pytest.approx(math.sqrt(8))
    assert hd95(outer, inner).item() == pytest.approx(math.sqrt(8))


def test_hd95_ignores_a_stray_pixel_but_not_a_blob():
    outer = blank(); outer[0, 5:15, 5:15] = True
    stray = outer.clone(); stray[0, 0, 23] = True
    assert hd95(stray, outer).item() == 0.0
    blob = outer.clone(); blob[0, 18:24, 18:24] = True
    assert hd95(blob, outer).item() > 3


def test_hd95_edge_cases():
    full = torch.ones(1, 6, 6, dtype=torch.bool)
    assert hd95(full, full).item() == 0.0
    assert hd95(blank(), blank()).item() == 0.0
    diagonal = math.hypot(*blank().shape[1:])
    assert hd95(blank(), _sq()).item() == pytest.approx(diagonal)        # empty prediction: the miss penalty
    assert hd95(_sq(), blank()).item() == pytest.approx(diagonal)        # a lesion where there is none: the same


def _sq():
    m = blank(); m[0, 4:8, 4:8] = True
    return m


def _hd95_bruteforce(p, t):
    from scipy import ndimage
    def contour(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(2, 1), border_value=0)
    cp, ct = np.argwhere(contour(p)), np.argwhere(contour(t))
    d = np.sqrt(((cp[:, None] - ct[None]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = F.max_pool2d(torch.tensor(rng.random((1, 1, 30, 30)) > 0.97).float(), 5, 1, 2)[0] > 0
        t = F.max_pool2d(torch.tensor(rng.random((1, 1, 30, 30)) > 0.97).float(), 7, 1, 3)[0] > 0
        if not p.any() or not t.any(): continue
        assert hd95(p, t).item() == pytest.approx(_hd95_bruteforce(p[0].numpy(), t[0].numpy()))


# ---------------------------------------------------------------- summaries

def test_summarize_means_std_failures():
    per = dict(dice=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
               jaccard=torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64),
               hd95=torch.tensor([0.0, 4.0, float('nan')], dtype=torch.float64))
    s = summarize(per)
    assert s['dice'] == pytest.approx(0.5)
    assert s['dice_std'] == pytest.approx(0.5)                             # sample std of 1, .5, 0
    assert s['hd95'] == pytest.approx(2.0) and s['hd95_failures'] == 1     # reported, not silently dropped
    assert s['failure_rate'] == pytest.approx(2 / 3)
    assert s['n_images'] == 3
    assert 'dice_failures' not in s


def test_summarize_real_metrics():
    t = torch.zeros(4, 16, 16, dtype=torch.bool); t[:, 4:12, 4:12] = True
    p = t.clone(); p[1, 4:12, 12] = True; p[2] = False; p[3, 4:12, 4:8] = False
    s = summarize(per_image_metrics(p, t))
    assert s['n_images'] == 4 and s['hd95_misses'] == 1                   # the empty prediction, at the 16x16 diagonal
    assert s['hd95'] > math.hypot(16, 16) / 4
    assert s['failure_rate'] == pytest.approx(2 / 4)                      # the empty one and the half one
    assert s['jaccard'] == pytest.approx((1 + 64 / 72 + 0 + 0.5) / 4)
    assert s['thresholded_jaccard'] == pytest.approx((1 + 64 / 72) / 4)
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_summarize_single_and_all_failed():
    s = summarize(per_image_metrics(_sq(), blank()))
    assert s['n_images'] == 1 and s['dice_std'] == 0.0 and s['hd95_misses'] == 1
    assert s['hd95'] == pytest.approx(math.hypot(*blank().shape[1:])) and s['hd95_std'] == 0.0


# ---------------------------------------------------------------- streaming accumulator

def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, 1, 16, 16, generator=g) > 0.5
    logits = torch.randn(n, 1, 16, 16, generator=g) + torch.where(t, 1.0, -1.0) * 1.5
    return logits, t.float()


def test_accumulator_equals_per_image_mean():
    acc = MetricAccumulator()
    batches = [_batch(i, n) for i, n in enumerate((3, 5, 1))]
    for lg, t in batches: acc.update(lg, t)
    preds = torch.cat([predict_mask(lg) for lg, _ in batches]); truth = torch.cat([t for _, t in batches])
    ref = summarize(per_image_metrics(preds, truth, with_hd95=False))
    out = acc.compute()
    assert out['n_images'] == 9
    for k in metric_names(costly=False) + ('failure_rate',):
        assert out[k] == pytest.approx(ref[k]), k
    assert acc.state.shape == (len(metric_names(costly=False)) + 2,) and acc.state.dtype == torch.float64
    acc.reset()
    assert acc.compute()['n_images'] == 0 and math.isnan(acc.compute()['dice'])


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    acc = MetricAccumulator()
    lg, t = _batch(rank, n=rank + 1)
    acc.update(lg, t)
    r1, r2 = acc.compute(), acc.compute()                      # computing twice must not double the sums
    if rank == 0: torch.save((r1, r2), out_file)
    dist.destroy_process_group()


def test_accumulator_all_reduce(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out.pt')), nprocs=2, start_method='spawn')
    r1, r2 = torch.load(tmp_path / 'out.pt', weights_only=False)
    batches = [_batch(0, 1), _batch(1, 2)]
    preds = torch.cat([predict_mask(lg) for lg, _ in batches]); truth = torch.cat([t for _, t in batches])
    ref = summarize(per_image_metrics(preds, truth, with_hd95=False))
    assert r1 == r2 and r1['n_images'] == 3
    assert r1['dice'] == pytest.approx(ref['dice']) and r1['jaccard'] == pytest.approx(ref['jaccard'])


# ---------------------------------------------------------------- original resolution

def restore_contract(prob, hw):
    """The data chapter's contract: bilinear resize to the padded square, crop the centre (top = (S'-H)//2)."""
    H, W = hw; side = max(H, W)
    sq = F.interpolate(prob[None], size=(side, side), mode='bilinear', align_corners=False)[0]
    top, left = (side - H) // 2, (side - W) // 2
    return sq[:, top:top + H, left:left + W]


class FakeCache:
    def __init__(self, masks):
        self.masks = masks
        self.orig_hw = np.array([m.shape for m in masks])
    def original_mask(self, i):
        return self.masks[i]


def _to_square(mask, S):
    H, W = mask.shape; side = max(H, W)
    sq = np.zeros((side, side), np.float32)
    top, left = (side - H) // 2, (side - W) // 2
    sq[top:top + H, left:left + W] = mask
    return F.interpolate(torch.tensor(sq)[None, None], size=(S, S), mode='bilinear', align_corners=False)[0, 0]


def _masks():
    a = np.zeros((30, 60), bool); a[5:25, 10:40] = True
    b = np.zeros((50, 20), bool); b[10:40, 4:16] = True
    c = np.zeros((16, 16), bool)                                   # an image without lesion
    return [a, b, c]


def test_score_at_original_perfect_and_shapes():
    cache = FakeCache(_masks())
    probs = torch.stack([_to_square(m, 64) for m in cache.masks])
    r = score_at_original(probs, cache, [0, 1, 2], restore=restore_contract)
    assert r['dice'].tolist() == [1.0, 1.0, 1.0] and r['hd95'].tolist() == [0.0, 0.0, 0.0]
    r2 = score_at_original(probs[:, None], cache, torch.tensor([0, 1, 2]), restore=restore_contract)   # (N, 1, S, S)
    assert torch.equal(r['dice'], r2['dice'])


def test_score_at_original_uses_indices_and_threshold():
    cache = FakeCache(_masks())
    probs = torch.stack([_to_square(m, 64) for m in cache.masks])
    swapped = score_at_original(probs[[1, 0]], cache, [0, 1], restore=restore_contract, with_hd95=False)
    assert (swapped['dice'] < 0.6).all()
    assert 'hd95' not in swapped
    none = score_at_original(probs * 0.4, cache, [0, 1, 2], threshold=0.5, restore=restore_contract)
    assert none['dice'].tolist() == [0.0, 0.0, 1.0] and none['hd95_miss'].tolist() == [1.0, 1.0, 0.0]
    assert none['hd95'][:2].tolist() == pytest.approx([math.hypot(*m.shape) for m in cache.masks[:2]])  # at the original size
    assert score_at_original(probs[:0], cache, [], restore=restore_contract)['dice'].shape == (0,)


def test_thresholding_after_upsampling_differs_from_before():
    # a thin diagonal probability ridge: upsampling probabilities first keeps a smooth contour
    cache = FakeCache([np.eye(64, dtype=bool) | np.eye(64, k=1, dtype=bool)])
    p = _to_square(cache.masks[0], 16)[None]
    r = score_at_original(p, cache, [0], restore=restore_contract, with_hd95=False)
    assert 0 < r['dice'].item() <= 1


def test_score_at_original_with_the_cache_chapter():
    "The default restore is the cache chapter's `restore_original`, padded or squashed as the cache was built."
    cache = FakeCache(_masks())
    probs = torch.stack([_to_square(m, 64) for m in cache.masks])
    r = score_at_original(probs, cache, [0, 1, 2])
    assert r['dice'].min().item() > 0.95
    squashed = FakeCache(_masks()); squashed.mirror_pad = False   # a cache that resized without padding
    probs = torch.stack([F.interpolate(torch.tensor(m, dtype=torch.float32)[None, None], size=(64, 64), mode='bilinear',
                                       align_corners=False)[0, 0] for m in squashed.masks])
    assert score_at_original(probs, squashed, [0, 1, 2])['dice'].min().item() > 0.95
