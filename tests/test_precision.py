"""Precision (train.amp): what `auto` picks on each kind of device (PyTorch's capability queries faked), a bf16
step's numerics (fp32 weights, statistics, losses and KD terms), the recorded choice, resume, and the baseline check."""
import math
from unittest import mock

import pytest
import torch
import yaml
from torch import nn

from skinkd.core import SkinkdError
from skinkd.config import load_config, save_config
from skinkd.device import native_bf16, resolve_precision
from skinkd.checkpoints import load_checkpoint

from test_learner import learner


CPU = torch.device('cpu')


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    "Train on the CPU even on a host with a GPU: the CPU queries are what these tests fake."
    monkeypatch.setattr('skinkd.learner.default_device', lambda: CPU)
    monkeypatch.setattr('skinkd.distill.default_device', lambda: CPU)


def fake_cpu(avx512_bf16=False, amx=False):
    "PyTorch's CPU capability queries answering as on another machine."
    return mock.patch.multiple('torch.cpu', _is_avx512_bf16_supported=mock.Mock(return_value=avx512_bf16),
                               _is_amx_tile_supported=mock.Mock(return_value=amx))


@pytest.mark.parametrize('avx512_bf16, amx, cap, picked, reason', [
    (True, False, None, 'bf16', 'CPU has AVX512-BF16'),
    (True, True, None, 'bf16', 'CPU has AMX-BF16'),
    (False, False, None, 'none', 'CPU has no AVX512-BF16 or AMX-BF16'),
    (True, False, 'AVX2', 'none', 'CPU has AVX512-BF16, but ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below it'),
    (True, False, 'AVX512_CORE', 'none',
     'CPU has AVX512-BF16, but ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN below it'),
    (True, False, 'avx512_core_bf16', 'bf16', 'CPU has AVX512-BF16'),
])
def test_auto_picks_bf16_only_on_a_cpu_that_multiplies_it_natively(monkeypatch, avx512_bf16, amx, cap, picked, reason):
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
    if cap: monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', cap)
    with fake_cpu(avx512_bf16, amx):
        p = resolve_precision('auto', CPU)
    assert (p.amp, p.reason, p.warning) == (picked, reason, '')
    assert str(p) == f"precision: {'bf16' if picked == 'bf16' else 'fp32'} ({reason})"


@pytest.mark.parametrize('supported', [True, False])
def test_auto_on_a_gpu_asks_cuda_whether_bf16_is_native(supported):
    with mock.patch('torch.cuda.is_bf16_supported', return_value=supported) as query, \
         mock.patch('torch.cuda.get_device_name', return_value='NVIDIA T4'):
        p = resolve_precision('auto', torch.device('cuda:0'))
    query.assert_called_once_with(including_emulation=False)      # emulated bf16 does not count
    assert p.amp == ('bf16' if supported else 'none')
    assert p.reason == f"NVIDIA T4 {'supports' if supported else 'does not support'} bf16"


def test_explicit_precisions_are_honoured_and_slow_bf16_is_warned_about():
    with fake_cpu(avx512_bf16=False):
        assert resolve_precision('none', CPU).amp == 'none' and resolve_precision('fp16', CPU).amp == 'fp16'
        slow = resolve_precision('bf16', CPU)
        assert slow.amp == 'bf16' and '\n' not in slow.warning
        assert slow.warning.startswith('train.amp is bf16, but CPU has no AVX512-BF16 or AMX-BF16')
        assert '11-17x slower than in fp32' in slow.warning and 'train.amp: auto' in slow.warning
    with fake_cpu(avx512_bf16=True):
        assert resolve_precision('bf16', CPU).warning == '' and native_bf16(CPU) == (True, 'CPU has AVX512-BF16')


def test_a_bf16_step_keeps_fp32_weights_and_statistics_and_computes_the_loss_in_fp32(tmp_path, capsys):
    "The network runs in bf16; the loss sees fp32 logits outside autocast; weights and BatchNorm buffers stay fp32."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1))
    with fake_cpu(avx512_bf16=True):
        lrn = learner(tmp_path, sets=['train.epochs=1', 'train.amp=auto'], model=net)
    seen, seg_loss = [], lrn.task.seg_loss
    def recording_loss(logits, mask):
        seen.append((logits.dtype, torch.is_autocast_enabled('cpu')))
        return seg_loss(logits, mask)
    lrn.task.seg_loss = recording_loss
    outputs = []
    net[0].register_forward_hook(lambda m, i, o: outputs.append((m.training, o.dtype)))
    stats = net[1].running_mean.clone()
    lrn.fit()
    assert {d for training, d in outputs if training} == {torch.bfloat16}  # training ran the convolutions in bf16...
    assert {d for training, d in outputs if not training} == {torch.float32}  # ...validation in fp32
    assert seen and set(seen) == {(torch.float32, False)}               # ...the loss in fp32, outside autocast
    assert math.isfinite(lrn.history[0]['train_loss'])
    assert all(t.dtype == torch.float32 for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
    assert not torch.equal(stats, net[1].running_mean)                   # the statistics were updated, in fp32
    assert 'precision: bf16 (CPU has AVX512-BF16)' in capsys.readouterr().out.splitlines()
    ck = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last.pt')
    assert ck['extra']['config']['train']['amp'] == 'bf16'                # the resolved value, never 'auto'
    assert ck['extra']['precision'] == {'amp': 'bf16', 'reason': 'CPU has AVX512-BF16', 'warning': ''}
    assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())['train']['amp'] == 'bf16'


def test_resume_keeps_the_precision_the_run_started_in(tmp_path, capsys):
    with fake_cpu(avx512_bf16=False):                                     # started where auto means fp32
        learner(tmp_path, sets=['train.epochs=1', 'train.amp=auto']).fit()
    with fake_cpu(avx512_bf16=True):                                      # resumed where auto would mean bf16
        resumed = learner(tmp_path, sets=['train.epochs=2', 'train.resume=true', 'train.amp=auto'])
        resumed.fit()
        out = capsys.readouterr().out
        assert 'precision: fp32 (the run started in fp32; this device alone would pick bf16)' in out.splitlines()
        assert resumed.tc.amp == 'none' and [r['epoch'] for r in resumed.history] == [1, 2]
        assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())['train']['amp'] == 'none'
        last = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last.pt')
        assert last['extra']['config']['train']['amp'] == 'none'
        with pytest.raises(SkinkdError, match=r'changed since it was written: train.amp'):  # explicit: refused
            learner(tmp_path, sets=['train.epochs=3', 'train.resume=true', 'train.amp=bf16']).fit()


def test_distillation_runs_the_networks_in_bf16_and_every_term_in_fp32():
    "Teacher taps come back in fp32; the segmentation loss and the KD terms see fp32 inputs with autocast off."
    from skinkd.schema import Config, DistillTerm
    from skinkd.soft_labels import freeze
    from skinkd.distill import DistillTask
    from skinkd.device import autocast
    from skinkd.losses import DistillationLoss, SegLoss
    from skinkd.models import DeepLabV3Plus
    torch.manual_seed(0)
    student, teacher = DeepLabV3Plus('resnet18').train(), freeze(DeepLabV3Plus('resnet50'))
    terms = [*Config().distill.terms, DistillTerm('hint', 'layer3', 1.0)]   # 256 -> 1024 channels: a 1x1 adapter
    kd = DistillationLoss(terms, student.tap_channels, teacher.tap_channels)
    seen = []
    for term in kd.terms.values():
        term.register_forward_pre_hook(lambda m, args: seen.append(
            ({a.dtype for a in args if torch.is_tensor(a)}, torch.is_autocast_enabled('cpu'))))
    task = DistillTask(SegLoss(), kd, teacher, [t.tap for t in terms])
    batch = {'image': torch.randn(2, 3, 32, 32), 'mask': (torch.rand(2, 1, 32, 32) > 0.5).float()}
    with autocast(torch.device('cpu'), 'bf16'):
        assert student(batch['image']).dtype == torch.bfloat16       # the networks run in bf16
        taps = task.teacher_taps(batch['image'])
        loss, logs = task.loss(student, batch)
    assert taps and {t.dtype for t in taps.values()} == {torch.float32}
    assert not any(t.is_inference() for t in taps.values())
    assert len(seen) == len(terms) and all(s == ({torch.float32}, False) for s in seen)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(v.dtype == torch.float32 for v in logs.values())
    loss.backward()
    adapters, encoder = list(kd.parameters()), student.backbone.conv1.weight
    assert adapters and all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)
    assert encoder.dtype == torch.float32 and encoder.grad.dtype == torch.float32 and encoder.grad.abs().sum() > 0


def test_the_baseline_check_compares_resolved_precisions(tmp_path):
    "An fp32 raw student is no baseline for a student that auto trains in bf16, and is one where auto means fp32."
    from skinkd.distill import check_baseline
    save_config(load_config(overrides=['train.amp=none']), tmp_path / 'raw' / 'config.yaml')
    auto = load_config(overrides=['train.amp=auto'])
    refused = r"differ in train.amp \('bf16' vs 'none'\) \(train.amp: auto picks by machine; --set train.amp=none"
    with fake_cpu(avx512_bf16=True), pytest.raises(SkinkdError, match=refused):
        check_baseline(auto, tmp_path / 'raw')
    with fake_cpu(avx512_bf16=False):
        assert check_baseline(auto, tmp_path / 'raw') == tmp_path / 'raw' / 'config.yaml'


def test_a_bf16_run_resumed_where_bf16_is_emulated_stays_bf16_and_warns(tmp_path, capsys):
    with fake_cpu(avx512_bf16=True):
        learner(tmp_path, sets=['train.epochs=1', 'train.amp=auto']).fit()
    with fake_cpu(avx512_bf16=False):
        resumed = learner(tmp_path, sets=['train.epochs=2', 'train.resume=true', 'train.amp=auto'])
        resumed.fit()
    lines = capsys.readouterr().out.splitlines()
    assert 'precision: bf16 (the run started in bf16; this device alone would pick fp32)' in lines
    assert any(line.startswith('warning: train.amp is bf16, but CPU has no AVX512-BF16') for line in lines)
    assert resumed.tc.amp == 'bf16' and [r['epoch'] for r in resumed.history] == [1, 2]
