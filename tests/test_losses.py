"""Segmentation and distillation losses (skinkd.losses): values by hand, edge cases, gradients, config wiring."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from skinkd.schema import Config, ConfigError, DistillTerm, TrainConfig
from skinkd.losses import (AttentionTransfer, ChannelWiseKD, DistillationLoss, FeatureHint, LogitKD,
                           PairwiseAffinity, SegLoss, affinity_loss, attention_loss, bce_loss, boundary_band,
                           boundary_weights, cwd_loss, hint_loss, logit_kd, seg_loss_from_config,
                           soft_dice_loss)

R18 = dict(layer1=64, layer2=128, layer3=256, layer4=512, aspp=256, decoder=256, logits=1)
R101 = dict(layer1=256, layer2=512, layer3=1024, layer4=2048, aspp=256, decoder=256, logits=1)
STRIDE = dict(layer1=4, layer2=8, layer3=16, layer4=16, aspp=16, decoder=4, logits=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def feats(channels, size=32, n=2, grad=False):
    return {k: torch.randn(n, c, size // STRIDE[k], size // STRIDE[k], requires_grad=grad) for k, c in channels.items()}


# ---------------------------------------------------------------- segmentation losses

def test_bce_matches_hand_value():
    # logit 0 -> p = 0.5 -> -log 0.5 whatever the target
    assert bce_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[1., 0.], [0., 1.]]])).item() == pytest.approx(math.log(2))
    z = torch.tensor([[[[2.0]]]])
    assert bce_loss(z, torch.ones(1, 1, 1, 1)).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))), rel=1e-6)


def test_soft_dice_by_hand():
    z = torch.full((1, 1, 2, 2), 50.)                  # p = 1 everywhere
    y = torch.tensor([[[[1., 1.], [0., 0.]]]])
    # 1 - (2*2 + 1) / (4 + 2 + 1)
    assert soft_dice_loss(z, y).item() == pytest.approx(1 - 5 / 7, abs=1e-6)
    assert soft_dice_loss(-z, torch.zeros(1, 1, 2, 2)).item() == pytest.approx(0, abs=1e-6)   # empty vs empty


def test_soft_dice_is_per_image_mean():
    z = torch.cat([torch.full((1, 1, 2, 2), 50.), torch.full((1, 1, 2, 2), -50.)])
    y = torch.ones(2, 1, 2, 2)
    assert soft_dice_loss(z, y).item() == pytest.approx((0 + (1 - 1 / 5)) / 2, abs=1e-6)


def test_multiclass_losses():
    lbl = torch.randint(0, 3, (2, 8, 8))
    good = F.one_hot(lbl, 3).permute(0, 3, 1, 2) * 30.
    assert soft_dice_loss(good, lbl).item() < 1e-4
    assert soft_dice_loss(good, lbl[:, None]).item() < 1e-4        # (N, 1, H, W) labels are accepted
    loss = SegLoss('bce_dice', 1.0, 1.0, num_classes=3)
    z = torch.randn(2, 3, 8, 8)
    assert loss(z, lbl).item() == pytest.approx((F.cross_entropy(z, lbl) + soft_dice_loss(z, lbl)).item(), rel=1e-5)


def test_seg_loss_weights_and_kinds():
    z, y = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    b, d = bce_loss(z, y).item(), soft_dice_loss(z, y).item()
    assert SegLoss('bce_dice', 0.3, 2.0)(z, y).item() == pytest.approx(0.3 * b + 2 * d, rel=1e-5)
    assert SegLoss('bce', 0.3, 2.0)(z, y).item() == pytest.approx(0.3 * b, rel=1e-5)
    assert SegLoss('dice', 0.3, 2.0)(z, y).item() == pytest.approx(2 * d, rel=1e-5)
    tc = TrainConfig(loss='dice', dice_weight=0.5)
    assert seg_loss_from_config(tc)(z, y).item() == pytest.approx(0.5 * d, rel=1e-5)
    with pytest.raises(ConfigError, match='train.loss'):
        SegLoss('focal')


def test_seg_loss_gradient_and_bf16_input():
    z = torch.randn(2, 1, 8, 8, requires_grad=True)
    y = (torch.rand(2, 8, 8) > 0.5).float()                       # (N, H, W) targets are accepted
    loss = SegLoss()(z.bfloat16(), y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.abs().sum() > 0


# ---------------------------------------------------------------- boundary band

def test_boundary_band_square():
    y = torch.zeros(1, 1, 12, 12); y[..., 4:8, 4:8] = 1
    band = boundary_band(y, 1)[0, 0]
    expect = torch.zeros(12, 12); expect[3:9, 3:9] = 1; expect[5:7, 5:7] = 0
    assert torch.equal(band, expect)
    assert boundary_band(y, 2)[0, 0].sum() == 8 * 8 - 0       # 4x4 lesion, width 2: 8x8 square, no interior left
    assert boundary_band(torch.ones(1, 6, 6), 2).sum() == 0    # the frame is not a boundary
    assert boundary_band(torch.zeros(1, 6, 6), 2).sum() == 0


def test_boundary_band_class_indices():
    lbl = torch.zeros(1, 6, 6, dtype=torch.long); lbl[:, :, 3:] = 2
    band = boundary_band(lbl, 1)[0, 0]
    assert band[:, 2:4].sum() == 12 and band.sum() == 12


def test_boundary_weights_pooled_to_feature_grid():
    y = torch.zeros(1, 1, 16, 16); y[..., 6:10, 6:10] = 1       # band: rows/cols 5..10 -> grid cells 1 and 2
    w = boundary_weights(y, (4, 4), 1, 3.0)
    expect = torch.ones(4, 4); expect[1:3, 1:3] = 4.0
    assert torch.equal(w[0, 0], expect)
    assert boundary_weights(y, (16, 16), 1, 3.0)[0, 0].sum() == 256 + 3 * 32


# ---------------------------------------------------------------- distillation: the functions

def test_logit_kd_bernoulli_by_hand():
    zs, zt = torch.tensor([[[[0.0]]]]), torch.tensor([[[[math.log(3)]]]])   # q = 0.5, p = 0.75
    p, q = 0.75, 0.5
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert logit_kd(zs, zt, 1.0).item() == pytest.approx(kl, rel=1e-5)


def test_logit_kd_temperature_scaling():
    zs, zt = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for T in (2.0, 4.0):
        assert logit_kd(zs, zt, T).item() == pytest.approx(T * T * logit_kd(zs / T, zt / T, 1.0).item(), rel=1e-4)
    # high-temperature limit: T^2 * Bernoulli KL -> (zs - zt)^2 / 8 (logit matching)
    assert logit_kd(zs * 0.1, zt, 30.0).item() == pytest.approx(((zs * 0.1 - zt) ** 2).mean().item() / 8, rel=2e-2)
    zs3, zt3 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert logit_kd(zs3, zt3, 3.0).item() == pytest.approx(9 * logit_kd(zs3 / 3, zt3 / 3, 1.0).item(), rel=1e-4)


def test_logit_kd_softmax_matches_kl_div():
    zs, zt = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    ref = F.kl_div(F.log_softmax(zs, 1), F.log_softmax(zt, 1), log_target=True, reduction='none').sum(1).mean()
    assert logit_kd(zs, zt).item() == pytest.approx(ref.item(), rel=1e-5)


ALL_FNS = [lambda s, t: logit_kd(s, t, 2.0), hint_loss, lambda s, t: hint_loss(s, t, True),
           lambda s, t: cwd_loss(s, t, 4.0), lambda s, t: affinity_loss(s, t, 4), attention_loss]


@pytest.mark.parametrize('fn', ALL_FNS)
def test_zero_when_equal_positive_otherwise(fn):
    t = torch.randn(2, 6, 8, 8)
    assert fn(t.clone(), t).item() == pytest.approx(0, abs=1e-6)
    assert fn(t + torch.randn_like(t), t).item() > 1e-4


@pytest.mark.parametrize('fn', ALL_FNS)
def test_gradients_reach_student_never_teacher(fn):
    s = torch.randn(2, 6, 8, 8, requires_grad=True)
    t = torch.randn(2, 6, 8, 8, requires_grad=True)
    fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_hint_by_hand_and_resizing():
    t = torch.zeros(1, 4, 8, 8)
    assert hint_loss(torch.full((1, 4, 8, 8), 2.0), t).item() == pytest.approx(4.0)
    assert hint_loss(torch.full((1, 4, 2, 2), 3.0), t).item() == pytest.approx(9.0)   # stride mismatch: resized
    s = torch.randn(1, 4, 8, 8)
    assert hint_loss(5 * s, s, normalize=True).item() == pytest.approx(0, abs=1e-6)


def test_cwd_by_hand():
    s = torch.tensor([[[[0.0, 0.0]]]])                 # uniform: q = (1/2, 1/2)
    t = torch.tensor([[[[math.log(3), 0.0]]]])         # p = (3/4, 1/4)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert cwd_loss(s, t, 1.0).item() == pytest.approx(kl, rel=1e-5)
    assert cwd_loss(s, t, 2.0).item() == pytest.approx(4 * cwd_loss(s / 2, t / 2, 1.0).item(), rel=1e-5)


def test_affinity_and_attention_by_hand():
    a = torch.zeros(1, 2, 1, 2); a[0, 0, 0, 0] = 1; a[0, 1, 0, 1] = 1   # orthogonal positions: a_01 = 0
    b = torch.ones(1, 2, 1, 2)                                          # parallel positions: a_01 = 1
    assert affinity_loss(a, b, 2).item() == pytest.approx(2 / 4)
    x, y = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    x[..., 0], y[..., 1] = 1, 1
    assert attention_loss(x, y).item() == pytest.approx(2.0)
    # scale and channel count do not matter to either
    f = torch.randn(2, 4, 8, 8)
    assert affinity_loss(f, torch.cat([f, f], 1) * 3, 8).item() == pytest.approx(0, abs=1e-6)
    assert attention_loss(f, torch.cat([f, f], 1) * 3).item() == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------- boundary weighting in the terms

def _lesion(size=32):
    y = torch.zeros(1, 1, size, size); y[..., 8:24, 8:24] = 1
    return y


LOCAL_TERMS = [lambda **k: LogitKD(2.0, **k), lambda **k: FeatureHint(2, 2, **k)]
GLOBAL_TERMS = [lambda **k: ChannelWiseKD(2, 2, 1.0, **k), lambda **k: PairwiseAffinity(8, **k),
                lambda **k: AttentionTransfer(**k)]


def _maps(channels):
    y = _lesion()
    band = boundary_band(y, 2)
    t = torch.cat([torch.where(y > 0, 2.0, 0.5), torch.where(y > 0, 0.5, 2.0)], 1)[:, :channels]
    bump = torch.zeros_like(t); bump[:, 0] = 2.0
    return y, band, t, bump


@pytest.mark.parametrize('make', LOCAL_TERMS + GLOBAL_TERMS)
def test_boundary_weighting_raises_errors_in_the_band(make):
    plain, weighted = make(), make(boundary_weight=8.0, boundary_width=2)
    y, band, t, bump = _maps(1 if isinstance(plain, LogitKD) else 2)
    near = t + bump * band
    assert weighted(t, t, y).item() == pytest.approx(0, abs=1e-6)
    assert weighted(near, t, y) > plain(near, t, y) > 0


@pytest.mark.parametrize('make', LOCAL_TERMS)
def test_boundary_weighting_lowers_errors_outside_the_band(make):
    # per-pixel terms: an error far from the boundary weighs less (normalised terms spread errors everywhere)
    plain, weighted = make(), make(boundary_weight=8.0, boundary_width=2)
    y, band, t, bump = _maps(1 if isinstance(plain, LogitKD) else 2)
    far = t + bump * (1 - band) * y
    assert 0 < weighted(far, t, y) < plain(far, t, y)


def test_boundary_weighting_needs_target():
    with pytest.raises(ValueError, match='needs the target'):
        FeatureHint(4, 4, boundary_weight=1.0)(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4))


def test_uniform_weight_is_plain_mean():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    w = torch.full((2, 1, 8, 8), 5.0)
    assert hint_loss(s, t, weight=w).item() == pytest.approx(hint_loss(s, t).item(), rel=1e-5)
    assert logit_kd(s, t, 2.0, w).item() == pytest.approx(logit_kd(s, t, 2.0).item(), rel=1e-5)
    assert attention_loss(s, t, w).item() == pytest.approx(attention_loss(s, t).item(), rel=1e-5)
    assert affinity_loss(s, t, 4, w).item() == pytest.approx(affinity_loss(s, t, 4).item(), rel=1e-5)
    assert cwd_loss(s, t, 2.0, w).item() == pytest.approx(cwd_loss(s, t, 2.0).item(), rel=1e-5)


# ---------------------------------------------------------------- DistillationLoss

ALL_KINDS = [DistillTerm('hint', 'layer3', 1.0), DistillTerm('hint', 'aspp', 0.5, normalize=True),
             DistillTerm('cwd', 'layer2', 2.0, temperature=4.0), DistillTerm('affinity', 'decoder', 1.0, pool_size=4),
             DistillTerm('attention', 'layer1', 3.0), DistillTerm('logit', 'logits', 1.0, temperature=2.0, boundary_weight=2.0)]


def test_default_config_terms():
    kd = DistillationLoss(Config().distill.terms, R18, R101)
    assert list(kd.terms) == ['hint_aspp', 'hint_decoder', 'logit_logits']
    assert kd.adapters == {}                                     # ASPP and decoder have 256 channels in both models


def test_names_unique_and_readable():
    terms = [DistillTerm('hint', 'aspp'), DistillTerm('hint', 'aspp', normalize=True), DistillTerm('hint', 'aspp')]
    assert list(DistillationLoss(terms, R18, R101).terms) == ['hint_aspp', 'hint_aspp_2', 'hint_aspp_3']


def test_total_is_weighted_sum_and_gradients():
    kd = DistillationLoss(ALL_KINDS, R18, R101)
    assert sorted(kd.adapters) == ['cwd_layer2', 'hint_layer3']
    s, t = feats(R18, grad=True), feats(R101, grad=True)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    total, parts = kd(s, t, y)
    assert set(parts) == {'hint_layer3', 'hint_aspp', 'cwd_layer2', 'affinity_decoder', 'attention_layer1', 'logit_logits'}
    assert all(not v.requires_grad and v.item() > 0 for v in parts.values())
    assert total.item() == pytest.approx(sum(kd.weights[n] * v.item() for n, v in parts.items()), rel=1e-5)
    total.backward()
    assert all(v.grad is None for v in t.values())
    for tap in ('layer3', 'aspp', 'layer2', 'decoder', 'layer1', 'logits'):
        assert s[tap].grad is not None and s[tap].grad.abs().sum() > 0, tap
    for name, adapter in kd.adapters.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters()), name


def test_teacher_under_no_grad_and_optimizer_step():
    kd = DistillationLoss([DistillTerm('hint', 'layer3')], R18, R101)
    teacher = nn.Conv2d(3, 1024, 1)
    student = nn.Conv2d(3, 256, 1)
    opt = torch.optim.SGD(list(student.parameters()) + list(kd.parameters()), lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        tf = {'layer3': teacher(x)}
    before = [p.clone() for p in teacher.parameters()]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, _ = kd({'layer3': student(x)}, tf)
        loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]                                # student and adapter learn
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_zero_when_student_is_teacher():
    terms = [DistillTerm('hint', 'aspp'), DistillTerm('cwd', 'decoder', temperature=2.0),
             DistillTerm('affinity', 'layer3'), DistillTerm('attention', 'layer2'), DistillTerm('logit', 'logits', temperature=3.0)]
    f = {k: v.detach() for k, v in feats(R101).items()}
    total, parts = DistillationLoss(terms, R101, R101)(f, f)
    assert total.item() == pytest.approx(0, abs=1e-5)
    assert all(v.item() == pytest.approx(0, abs=1e-5) for v in parts.values())


def test_adapters_in_state_dict_roundtrip(tmp_path):
    kd = DistillationLoss(ALL_KINDS, R18, R101)
    torch.save(kd.state_dict(), tmp_path / 'kd.pt')
    keys = kd.state_dict().keys()
    assert any(k.startswith('terms.hint_layer3.adapter.0.weight') for k in keys)
    assert any(k.startswith('terms.cwd_layer2.adapter.1.running_mean') for k in keys)
    kd2 = DistillationLoss(ALL_KINDS, R18, R101)
    kd2.load_state_dict(torch.load(tmp_path / 'kd.pt', weights_only=True))
    for a, b in zip(kd.parameters(), kd2.parameters()):
        assert torch.equal(a, b)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"distill.terms\[1\].tap"):
        DistillationLoss([DistillTerm('hint', 'aspp'), DistillTerm('hint', 'layer4')], R18, {'aspp': 256})
    with pytest.raises(ConfigError, match='num_classes'):
        DistillationLoss([DistillTerm('logit', 'logits')], {'logits': 1}, {'logits': 2})


def test_missing_feature_and_no_terms():
    kd = DistillationLoss([DistillTerm('hint', 'aspp')], R18, R101)
    with pytest.raises(KeyError, match='return_features'):
        kd({'logits': torch.zeros(1, 1, 4, 4)}, {'aspp': torch.zeros(1, 256, 2, 2)})
    total, parts = DistillationLoss([], R18, R101)(feats(R18), feats(R101))
    assert total.item() == 0 and parts == {}


# --- the distillation-term registry ------------------------------------------------------------------------------

def test_a_registered_term_is_configured_validated_and_built():
    from skinkd.config import describe, load_config
    from skinkd.core import KD_TERMS
    from skinkd.losses import kd_term, KDTerm

    @kd_term('scaled_attention')
    class ScaledAttention(KDTerm):
        "Attention transfer times a constant."
        def __init__(self, scale: float = 1.0, # the constant
                     **kwargs):
            super().__init__(**kwargs); self.scale = scale
        def forward(self, student, teacher, target=None): return self.scale * attention_loss(student, teacher)
    try:
        cfg = load_config(overrides=['distill.terms=[{kind: scaled_attention, tap: layer2, scale: "3"}]'])
        assert cfg.distill.terms[0].scale == 3.0 and cfg.distill.terms[0].params['boundary_width'] == 3
        assert dict((k, h) for k, _, h in describe())['distill.terms[kind=scaled_attention].scale'] == 'the constant'
        with pytest.raises(ConfigError, match=r"'distill.terms\[0\].scal': did you mean 'scale'\?"):
            load_config(overrides=['distill.terms=[{kind: scaled_attention, scal: 2}]'])
        s, t = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8)
        kd = DistillationLoss(cfg.distill.terms, {'layer2': 4}, {'layer2': 8})
        assert torch.allclose(kd({'layer2': s}, {'layer2': t})[0], 3 * attention_loss(s, t))
    finally: KD_TERMS.unregister('scaled_attention')
    with pytest.raises(ConfigError, match="is 'scaled_attention'; allowed: logit, hint, cwd, affinity, attention"):
        load_config(overrides=['distill.terms=[{kind: scaled_attention}]'])


def test_terms_written_before_the_registry_still_load(tmp_path):
    "Old run folders list every old field for every kind; their defaults are accepted, anything else is refused."
    from skinkd.config import load_config
    old = ('distill:\n  terms:\n  - {kind: hint, tap: aspp, weight: 50.0, temperature: 1.0, normalize: true, boundary_weight: 0.0,'
           ' boundary_width: 3, pool_size: 16}\n')
    (tmp_path / 'old.yaml').write_text(old)
    assert load_config(tmp_path / 'old.yaml').distill.terms == [DistillTerm('hint', 'aspp', 50.0, normalize=True)]
    (tmp_path / 'wrong.yaml').write_text(old.replace('temperature: 1.0', 'temperature: 4.0'))
    with pytest.raises(ConfigError, match=r"'distill.terms\[0\].temperature'.*'hint' terms take: kind, tap, weight, normalize"):
        load_config(tmp_path / 'wrong.yaml')
