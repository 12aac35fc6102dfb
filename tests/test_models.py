"""Tests of the model chapters (skinkd.models, checkpoints, infer, export): shapes, taps, sizes, pretrained weights,
checkpoints, BatchNorm folding, export, CLI."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from skinkd.core import SkinkdError
from skinkd.schema import ModelConfig
from skinkd.infer import fold_batchnorm, prepare_for_inference
from skinkd.export import (example_input, export_checkpoint, export_model, int8_instructions, mask_agreement,
                           run_exported)
from skinkd.models import (AtrousConv2d, DeepLabV3Plus, PretrainedError, ResNetBackbone, build_model,
                           count_macs, count_params, IMAGENET_WEIGHTS)
from skinkd.checkpoints import CheckpointError, load_checkpoint, load_model, load_weights, save_checkpoint

from conftest import with_trained_like_batchnorm

H, W = 65, 67  # odd and non-square


def cdiv(n, k): return -(-n // k)


def expected(model, n, h, w):
    os_ = model.backbone.output_stride
    hw = dict(layer1=4, layer2=8, layer3=min(16, os_), layer4=os_, aspp=os_, decoder=4)
    out = {k: (n, model.tap_channels[k], cdiv(h, s), cdiv(w, s)) for k, s in hw.items()}
    return {**out, 'logits': (n, model.tap_channels['logits'], h, w)}


@pytest.fixture(scope='module')
def x():
    torch.manual_seed(0)
    return torch.randn(1, 3, H, W)


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet34', 'resnet50'])
@pytest.mark.parametrize('os_', [8, 16])
def test_shapes_every_backbone(backbone, os_, x):
    m = DeepLabV3Plus(backbone, num_classes=2, output_stride=os_).eval()
    with torch.no_grad(): taps = m(x, return_features=True)
    assert list(taps) == ['layer1', 'layer2', 'layer3', 'layer4', 'aspp', 'decoder', 'logits']
    assert {k: tuple(v.shape) for k, v in taps.items()} == expected(m, 1, H, W)


def test_shapes_resnet101_both_strides():
    "ResNet-101 once per output stride, on a small odd input."
    for os_ in (16, 8):
        m = DeepLabV3Plus('resnet101', output_stride=os_).eval()
        with torch.no_grad(): taps = m(torch.randn(1, 3, 33, 35), return_features=True)
        assert {k: tuple(v.shape) for k, v in taps.items()} == expected(m, 1, 33, 35)
        assert m.tap_channels['layer4'] == 2048 and m.tap_channels['layer1'] == 256


def test_basicblock_dilation_is_patched():
    bb = ResNetBackbone('resnet18', 8)
    assert bb.layer3[0].conv1.stride == (1, 1) and bb.layer3[1].conv1.dilation == (2, 2)
    assert bb.layer4[0].conv1.dilation == (2, 2) and bb.layer4[1].conv2.dilation == (4, 4)
    assert bb.layer4[0].downsample[0].stride == (1, 1)


def test_taps_are_the_logits_path(x):
    m = DeepLabV3Plus('resnet18').eval()
    with torch.no_grad():
        logits, taps = m(x), m(x, return_features=True)
    assert isinstance(logits, torch.Tensor) and torch.equal(logits, taps['logits'])
    assert m.tap_channels == dict(layer1=64, layer2=128, layer3=256, layer4=512, aspp=256, decoder=256, logits=1)


def test_batch_and_gradients_flow():
    m = DeepLabV3Plus('resnet18', num_classes=3).train()
    out = m(torch.randn(2, 3, 64, 64), return_features=True)
    out['logits'].mean().backward()
    assert out['logits'].shape == (2, 3, 64, 64)
    assert all(p.grad is not None for p in m.parameters())


def test_param_counts():
    assert 15e6 < count_params(DeepLabV3Plus('resnet18')) < 17.5e6
    assert 57e6 < count_params(DeepLabV3Plus('resnet101')) < 61e6
    assert count_params(DeepLabV3Plus('resnet18', aspp_separable=True)) < count_params(DeepLabV3Plus('resnet18'))
    assert count_macs(nn.Conv2d(3, 4, 1, bias=False), 8) == 3 * 4 * 64


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet101'])
def test_separable_matches_smp_param_count(backbone):
    smp = pytest.importorskip('segmentation_models_pytorch', reason='smp is a benchmark-only dependency')
    ref = smp.DeepLabV3Plus(encoder_name=backbone, encoder_weights=None, encoder_output_stride=16,
                            decoder_aspp_separable=True, classes=1)
    ours = DeepLabV3Plus(backbone, aspp_separable=True)
    assert abs(count_params(ours) - count_params(ref)) / count_params(ref) < 0.02


def _conv_shapes(block: nn.Sequential) -> list[tuple]:
    "(weight shape, groups, dilation) of each convolution in a conv_bn_relu block."
    return [(tuple(c.weight.shape), c.groups, c.dilation[0]) for c in block if isinstance(c, nn.Conv2d)]


@pytest.mark.parametrize('backbone, c1, c4', [('resnet18', 64, 512), ('mobilenet_v3_large', 24, 960)])
def test_separable_switch_builds_the_documented_shapes(backbone, c1, c4):
    "aspp_separable=False: the paper's full 3x3 convolutions; True: depthwise 3x3 (same dilation) then pointwise 1x1."
    std, sep = DeepLabV3Plus(backbone), DeepLabV3Plus(backbone, aspp_separable=True)
    for i, rate in enumerate((6, 12, 18), start=1):
        assert _conv_shapes(std.aspp.branches[i]) == [((256, c4, 3, 3), 1, rate)]
        assert _conv_shapes(sep.aspp.branches[i]) == [((c4, 1, 3, 3), c4, rate), ((256, c4, 1, 1), 1, 1)]
    assert [_conv_shapes(b) for b in std.decoder.fuse] == [[((256, 304, 3, 3), 1, 1)], [((256, 256, 3, 3), 1, 1)]]
    assert [_conv_shapes(b) for b in sep.decoder.fuse] == [[((304, 1, 3, 3), 304, 1), ((256, 304, 1, 1), 1, 1)],
                                                           [((256, 1, 3, 3), 256, 1), ((256, 256, 1, 1), 1, 1)]]
    for m in (std, sep):  # the 1x1 branches, projection and reduction are the same in both
        assert _conv_shapes(m.aspp.branches[0]) == [((256, c4, 1, 1), 1, 1)] and _conv_shapes(m.decoder.reduce) == [((48, c1, 1, 1), 1, 1)]
        assert _conv_shapes(m.aspp.project[:3]) == [((256, 5 * 256, 1, 1), 1, 1)]
        with torch.no_grad(): out = m.eval()(torch.randn(1, 3, H, W), return_features=True)
        assert out['aspp'].shape == (1, 256, cdiv(H, 16), cdiv(W, 16)) and out['decoder'].shape == (1, 256, cdiv(H, 4), cdiv(W, 4))
        assert out['logits'].shape == (1, 1, H, W)


@pytest.mark.parametrize('backbone, separable, params_m, gmacs', [  # the student table in the README and 03_models
    ('resnet18', False, 16.60, 10.03), ('resnet18', True, 12.33, 4.82),
    ('mobilenet_v3_large', False, 11.72, 7.09), ('mobilenet_v3_large', True, 4.71, 1.41)])
def test_student_sizes_are_the_documented_ones(backbone, separable, params_m, gmacs):
    m = DeepLabV3Plus(backbone, aspp_separable=separable)
    assert round(count_params(m) / 1e6, 2) == params_m and round(count_macs(m, 256) / 1e9, 2) == gmacs


def test_build_model_from_config():
    m = build_model(ModelConfig('resnet34', output_stride=8, num_classes=2, aspp_separable=True, dropout=0.1))
    assert m.backbone.name == 'resnet34' and m.backbone.output_stride == 8 and m.tap_channels['logits'] == 2
    assert m.aspp.project[-1].p == 0.1


# --- pretrained weights -------------------------------------------------------------------------------------------

def test_pretrained_from_local_file(tmp_path):
    r18 = torchvision.models.resnet18(weights=None)
    torch.save(r18.state_dict(), tmp_path / 'r18.pth')
    m = DeepLabV3Plus('resnet18', pretrained=str(tmp_path / 'r18.pth'))
    assert torch.equal(m.backbone.layer4[1].conv2.weight, r18.layer4[1].conv2.weight)
    torch.save({'state_dict': {f'module.{k}': v for k, v in r18.state_dict().items()}}, tmp_path / 'wrapped.pth')
    m = DeepLabV3Plus('resnet18', pretrained=str(tmp_path / 'wrapped.pth'))
    assert torch.equal(m.backbone.conv1.weight, r18.conv1.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(PretrainedError, match='not found'):
        DeepLabV3Plus('resnet18', pretrained=str(tmp_path / 'missing.pth'))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / 'r50.pth')
    with pytest.raises(PretrainedError, match='do not fit a resnet18 backbone: 198 unexpected keys .*; 23 shape mismatches .layer1.0.conv1.weight .64, 64, 1, 1. instead of .64, 64, 3, 3.'):
        DeepLabV3Plus('resnet18', pretrained=str(tmp_path / 'r50.pth'))
    (tmp_path / 'junk.pth').write_text('junk')
    with pytest.raises(PretrainedError, match='not a readable PyTorch state dict'):
        DeepLabV3Plus('resnet18', pretrained=str(tmp_path / 'junk.pth'))


def _offline(monkeypatch):
    def no_network(*a, **k): raise OSError('Network is unreachable')
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)


def test_imagenet_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # empty hub cache
    _offline(monkeypatch)
    with pytest.raises(PretrainedError) as e:
        DeepLabV3Plus('resnet18', pretrained='imagenet')
    msg = str(e.value)
    assert 'cannot download ImageNet weights for resnet18' in msg and 'connected machine' in msg
    assert str(tmp_path / 'torch' / 'hub' / 'checkpoints') in msg and 'path of a local resnet18 state dict' in msg


def test_imagenet_from_hub_cache_offline(tmp_path, monkeypatch):
    "A file already in the hub cache is used without network."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    _offline(monkeypatch)
    r18 = torchvision.models.resnet18(weights=None)
    url = torchvision.models.get_weight(IMAGENET_WEIGHTS['resnet18']).url
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'; cache.mkdir(parents=True)
    torch.save(r18.state_dict(), cache / Path(url).name)
    m = DeepLabV3Plus('resnet18', pretrained='imagenet')
    assert torch.equal(m.backbone.layer1[0].conv1.weight, r18.layer1[0].conv1.weight)


# --- checkpoints --------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def student_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    cfg = ModelConfig('resnet18', num_classes=2, aspp_separable=True)
    m = build_model(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).mean().backward(); opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    path = tmp_path_factory.mktemp('ck') / 'checkpoints' / 'last.pt'
    save_checkpoint(path, m, cfg, 'student', epoch=4, optimizer=opt, scheduler=sched, metrics={'val_dice': np.float64(0.75)},
                    extra={'torch_rng': torch.get_rng_state(), 'np_rng': np.random.get_state(), 'bad_epochs': 2})
    return path, m.eval(), cfg


def test_checkpoint_round_trip(student_ckpt):
    path, m, cfg = student_ckpt
    model, ck = load_model(path)
    assert not model.training and model.backbone.name == 'resnet18' and model.tap_channels['logits'] == 2
    x = torch.randn(1, 3, 33, 31)
    with torch.no_grad(): assert torch.equal(model(x), m(x))
    assert ck['epoch'] == 4 and ck['role'] == 'student' and ck['metrics'] == {'val_dice': 0.75}
    assert ck['model_config'] == {**cfg.__dict__} and ck['scaler'] is None
    assert ck['optimizer']['state'] and ck['scheduler']['step_size'] == 2 and ck['extra']['bad_epochs'] == 2
    st = ck['extra']['np_rng']
    np.random.set_state((st[0], np.asarray(st[1]).astype(np.uint32), *st[2:]))  # numpy RNG state restores
    assert sorted(os.listdir(path.parent)) == ['last.pt']  # no temp files left


def test_checkpoint_resume_into_model(student_ckpt):
    path, m, cfg = student_ckpt
    m2 = load_weights(build_model(cfg), load_checkpoint(path), path)
    assert torch.equal(m2.classifier.weight, m.classifier.weight)


def test_save_is_atomic_on_failure(tmp_path, student_ckpt):
    path, m, cfg = student_ckpt
    target = tmp_path / 'best.pt'
    save_checkpoint(target, m, cfg, 'student', epoch=1)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['f'\] is a builtins.builtin_function_or_method"):
        save_checkpoint(target, m, cfg, 'student', epoch=2, extra={'f': print})
    assert load_checkpoint(target)['epoch'] == 1 and sorted(os.listdir(tmp_path)) == ['best.pt']


def test_bad_checkpoints(tmp_path, student_ckpt):
    path, m, cfg = student_ckpt
    with pytest.raises(CheckpointError, match='not found'): load_model(tmp_path / 'nope.pt')
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'): load_model(tmp_path / 'notes.txt')
    data = path.read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='is truncated or corrupted'): load_model(tmp_path / 'trunc.pt')
    torch.save(m.state_dict(), tmp_path / 'bare.pt')
    with pytest.raises(CheckpointError, match='is a PyTorch file but not a skinkd checkpoint .missing skinkd_version'):
        load_model(tmp_path / 'bare.pt')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(CheckpointError, match='not a skinkd checkpoint .a list'): load_model(tmp_path / 'list.pt')

    class Evil:
        def __reduce__(self): return (print, ('pwned',))
    torch.save({'model': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match='weights-only loading refuses'): load_model(tmp_path / 'evil.pt')


def test_wrong_architecture(tmp_path, student_ckpt):
    path, m, cfg = student_ckpt
    ck = load_checkpoint(path)
    with pytest.raises(CheckpointError) as e: load_weights(DeepLabV3Plus('resnet34', 2, aspp_separable=True), ck, path)
    assert f'checkpoint {path} (resnet18 OS16 separable, 2 classes) does not fit this model: 96 missing keys (backbone.layer1.2.conv1.weight' in str(e.value)
    with pytest.raises(CheckpointError, match=r'2 shape mismatches \(classifier.weight \(2, 256, 1, 1\) instead of \(1, 256, 1, 1\)'):
        load_weights(DeepLabV3Plus('resnet18', 1, aspp_separable=True), ck, path)
    ck['model_config']['aspp_separable'] = False  # a config that does not describe the weights
    torch.save(ck, tmp_path / 'lying.pt')
    with pytest.raises(CheckpointError, match=r'does not fit this model: \d+ missing keys .*\d+ unexpected keys'):
        load_model(tmp_path / 'lying.pt')
    ck['model_config']['backbone'] = 'resnet152'
    torch.save(ck, tmp_path / 'badcfg.pt')
    with pytest.raises(CheckpointError, match="bad model config: config key 'model_config.backbone' is 'resnet152'"):
        load_model(tmp_path / 'badcfg.pt')


# --- fast inference and export --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained_like():
    torch.manual_seed(2)
    return with_trained_like_batchnorm(DeepLabV3Plus('resnet18').eval())


def test_fold_batchnorm_equal(trained_like, x):
    folded = fold_batchnorm(trained_like)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in trained_like.modules())  # the original is untouched
    with torch.no_grad():
        ref = trained_like(x, return_features=True); out = folded(x, return_features=True)
    for k in ref: torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


def test_prepare_for_inference(trained_like, x):
    fast = prepare_for_inference(trained_like)
    assert not fast.training and fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(): torch.testing.assert_close(fast(x), trained_like(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('separable', [False, True])
def test_frozen_inference_equal_at_any_size(trained_like, separable):
    "The frozen oneDNN graph gives the eager logits at sizes and batches other than the one it was traced at."
    m = trained_like if not separable else DeepLabV3Plus('resnet18', aspp_separable=True, output_stride=8).eval()
    frozen = prepare_for_inference(m, freeze=True)
    assert isinstance(frozen, torch.jit.ScriptModule)
    for shape in [(1, 3, H, W), (2, 3, 33, 40), (1, 3, 128, 96)]:
        x = torch.randn(shape)
        with torch.no_grad(): ref, out = m(x), frozen(x)
        assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
def test_export_parity(fmt, trained_like, tmp_path):
    if fmt == 'onnx':
        pytest.importorskip('onnx', reason='onnx is optional'); pytest.importorskip('onnxruntime', reason='onnxruntime is optional')
    f = export_model(trained_like, fmt, tmp_path / f'm.{fmt}', example_input(64))
    x = example_input(48)  # a different size: height and width are dynamic
    with torch.no_grad(): torch.testing.assert_close(run_exported(f, fmt, x), trained_like(x), rtol=1e-3, atol=1e-3)


def _cli(*args):
    exe = Path(sys.executable).parent / 'skinkd_export'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-c', 'from skinkd.cli import export_main; export_main()']
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_export_cli(tmp_path, student_ckpt):
    pytest.importorskip('onnxruntime', reason='onnxruntime is optional')
    path = student_ckpt[0]
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / 'img.png')
    r = _cli('--weights', str(path), '--format', 'onnx', '--out', str(tmp_path / 'm.onnx'), '--size', '64',
             '--image', str(tmp_path / 'img.png'))
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.strip().rsplit(' ', 1)[-1])
    assert 'wrote' in r.stdout and diff < 1e-3 and (tmp_path / 'm.onnx').stat().st_size > 1e6
    r = _cli('--weights', str(tmp_path / 'missing.pt'), '--format', 'torchscript', '--out', str(tmp_path / 'm.pt'))
    assert r.returncode == 1 and r.stderr.strip().endswith('not found; check the path (runs/<name>/checkpoints/best.pt)')
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checkpoint_of_wrapped_model(tmp_path, student_ckpt):
    "DataParallel/DDP wrappers are unwrapped: the saved keys are the plain model's."
    path, m, cfg = student_ckpt
    save_checkpoint(tmp_path / 'dp.pt', nn.DataParallel(m), cfg, 'teacher')
    model, ck = load_model(tmp_path / 'dp.pt')
    assert ck['role'] == 'teacher' and not any(k.startswith('module.') for k in ck['model'])
    assert torch.equal(model.classifier.weight, m.classifier.weight)


def test_initial_logits_are_small():
    """A fresh head starts near p = 0.5 (a He-initialised 1-channel classifier gave logits with std ~10)."""
    torch.manual_seed(0)
    m = DeepLabV3Plus('resnet18').train()
    z = m(torch.randn(2, 3, 64, 64))
    assert z.abs().mean() < 1.0


def full_kernel_copy(model):
    "A copy of `model` whose atrous convolutions are plain nn.Conv2d with the same weights (all nine taps computed)."
    model = copy.deepcopy(model)
    for conv in [m for m in model.modules() if isinstance(m, AtrousConv2d)]:
        conv.__class__ = nn.Conv2d
    return model


@pytest.mark.parametrize('separable', [False, True])
def test_atrous_rates_beyond_the_map_skip_only_padding(separable):
    "At 256 px and OS 16 the map is 16x16: the rate-18 branch computes its centre tap only, with the same output and gradients."
    torch.manual_seed(0)
    ours = DeepLabV3Plus('resnet18', aspp_separable=separable, dropout=0.0).train()  # BatchNorm in training mode, no dropout noise
    full = full_kernel_copy(ours)
    x = torch.randn(2, 3, 256, 256)
    out, ref = ours(x), full(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward(); ref.square().mean().backward()
    for (name, a), b in zip(ours.named_parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
    rate18 = ours.aspp.branches[3][0]
    assert rate18.dilation == (18, 18) and rate18.weight.grad[:, :, 0].abs().max() == 0  # outer taps only see padding
    cin, cout = rate18.in_channels, rate18.out_channels // rate18.groups  # MACs: 8 of 9 taps skipped on a 16x16 map
    assert count_macs(full.eval(), 256) - count_macs(ours.eval(), 256) == 8 * cin * cout * 16 * 16
    assert count_macs(full.eval(), 320) == count_macs(ours.eval(), 320)  # a 20x20 map: every rate fits, nothing skipped


@pytest.fixture(scope='module')
def briefly_trained(tmp_path_factory):
    "A separable ResNet-18 student trained for 40 steps on the first 16 of 24 synthetic images at 64 px (its masks are real, if rough)."
    from skinkd.data import load_pair, scan
    from skinkd.cache import prepare_pair
    from skinkd.cache import normalize
    from skinkd.synthetic import make_synthetic
    root = tmp_path_factory.mktemp('int8')
    make_synthetic(root / 'synth', 24, 64, seed=3)
    samples = scan(root / 'synth')[1]
    prepared = [prepare_pair(*load_pair(s), 64) for s in samples]
    x = normalize(torch.stack([torch.tensor(img).permute(2, 0, 1) / 255 for img, _ in prepared]))
    y = torch.stack([torch.tensor(m > 0).float()[None] for _, m in prepared])
    torch.manual_seed(0)
    cfg = ModelConfig('resnet18', aspp_separable=True)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(40):
        idx = torch.randint(0, 16, (8,))
        opt.zero_grad(); torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx]).backward(); opt.step()
    path = save_checkpoint(root / 'best.pt', model, cfg, 'student', preprocessing=dict(image_size=64, mirror_pad=True, normalize=True))
    return path, model.eval(), x, [s.image for s in samples], root


def test_int8_export_masks_agree_with_fp32(briefly_trained, tmp_path):
    "skinkd_export --format onnx-int8: a real INT8 graph, 4x smaller, whose masks agree with fp32 within the default tolerance."
    onnx = pytest.importorskip('onnx', reason='onnx is optional'); pytest.importorskip('onnxruntime', reason='onnxruntime is optional')
    path, model, x, files, root = briefly_trained
    r = _cli('--weights', str(path), '--format', 'onnx-int8', '--out', str(tmp_path / 's8.onnx'), '--calib', *map(str, files[:16]),
             '--calib_count', '8')
    assert r.returncode == 0, r.stderr
    assert 'masks agree with fp32 on 8 other training images' in r.stdout and float(r.stdout.split('1 - Dice = ')[1]) <= 0.02
    graph = onnx.load(str(tmp_path / 's8.onnx')).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # every convolution is INT8
    assert {n.op_type for n in graph.node} >= {'QuantizeLinear', 'DequantizeLinear', 'Conv'}
    fp32 = export_model(model, 'onnx', tmp_path / 's.onnx', example_input(64))
    assert (tmp_path / 's8.onnx').stat().st_size < fp32.stat().st_size / 3.5
    held_out = x[16:]  # images neither the training nor the calibration saw: the fixed check input
    with torch.no_grad(): ref, got = model(held_out), run_exported(tmp_path / 's8.onnx', 'onnx-int8', held_out)
    lesion = (ref > 0).float().mean().item()
    assert 0.01 < lesion < 0.5 and not torch.allclose(got, ref, atol=1e-3)  # real masks, and the INT8 logits are not fp32's
    assert mask_agreement(got, ref) >= 0.98


def test_int8_export_calibrates_on_the_training_split_it_records(tmp_path):
    "Without --calib, the images of the split the checkpoint was trained on, from the config it records; never the test split."
    from skinkd.schema import Config
    from skinkd.loaders import split_data
    from skinkd.export import int8_inputs, training_images
    from skinkd.synthetic import make_synthetic
    from dataclasses import asdict, replace
    make_synthetic(tmp_path / 'syn', 30, 48, seed=1)
    cfg = Config()
    cfg = replace(cfg, data=replace(cfg.data, root=str(tmp_path / 'syn'), image_size=48, cache_dir=str(tmp_path / 'cache')))
    ckpt = dict(extra=dict(config=asdict(cfg)), preprocessing=dict(image_size=48, mirror_pad=True, normalize=True))
    splits = split_data(cfg)[1]
    assert {p.resolve() for p in training_images(ckpt, 'best.pt')} == {s.image.resolve() for s in splits['train']}
    calib, check, what = int8_inputs(ckpt, 'best.pt', None, count=8)
    assert calib.shape == (8, 3, 48, 48) and check.shape[1:] == (3, 48, 48) and what.endswith('other training images')
    with pytest.raises(SkinkdError, match='does not record the data it was trained on; pass --calib'):
        training_images({'extra': {}}, 'old.pt')
    with pytest.raises(SkinkdError, match='which is not here; pass --calib'):
        training_images(dict(extra=dict(config=asdict(replace(cfg, data=replace(cfg.data, root=str(tmp_path / 'gone')))))), 'moved.pt')


def test_int8_export_refusals_are_one_line_and_leave_nothing(briefly_trained, tmp_path):
    pytest.importorskip('onnxruntime', reason='onnxruntime is optional')
    path, _, _, _, root = briefly_trained
    out = tmp_path / 's8.onnx'
    for extra, message in [([], 'does not record the data it was trained on; pass --calib'), (['--calib', str(tmp_path / 'nothing')], 'nothing not found'),
                           (['--calib', str(root / 'synth'), '--calib_count', '0'], '--calib_count is 0'),
                           (['--calib', str(root / 'synth'), '--tol', '0'], 'INT8 masks differ from fp32 by 1 - Dice')]:
        r = _cli('--weights', str(path), '--format', 'onnx-int8', '--out', str(out), *extra)
        assert r.returncode == 1 and message in r.stderr and 'Traceback' not in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())  # no file, no temporary folder


def test_int8_instructions_named_from_the_cpu_flags():
    assert int8_instructions({'avx2', 'avx512f', 'avx512_vnni', 'amx_int8'}) == 'AMX-INT8'
    assert int8_instructions({'avx2', 'avx_vnni'}) == 'AVX-VNNI' and int8_instructions({'avx2'}) == 'AVX2'
    if os.uname().machine == 'x86_64': assert int8_instructions(set()) is None


def test_weights_only_checkpoint_exports_and_old_full_checkpoints_still_load(tmp_path, student_ckpt):
    "best.pt as runs now write it (no optimizer state) exports like the full checkpoints older runs left as best.pt."
    pytest.importorskip('onnxruntime', reason='onnxruntime is optional')
    full, m, cfg = student_ckpt
    best = save_checkpoint(tmp_path / 'best.pt', m, cfg, 'student', epoch=4, metrics={'dice': 0.75}, extra={'mode': 'raw'},
                           preprocessing={'image_size': 32})
    stored = torch.load(best, weights_only=True)
    assert not {'optimizer', 'scheduler', 'scaler'} & set(stored) and best.stat().st_size < full.stat().st_size / 1.5
    for path in (best, full):
        assert export_checkpoint(path, 'onnx', tmp_path / f'{path.stem}.onnx', size=32)[0] < 1e-3
    old = load_checkpoint(full)  # an older file: every key, and no preprocessing
    assert old['optimizer'] is not None and old['preprocessing'] is None and load_checkpoint(best)['preprocessing'] == {'image_size': 32}


@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
def test_export_onto_a_full_disk_fails_and_leaves_no_file(full_disk, fmt):
    model = nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.Conv2d(256, 1, 3, padding=1))  # ~40 KB of weights, 16 KiB of disk
    with pytest.raises(OSError):
        export_model(model, fmt, full_disk / 'model.bin', torch.zeros(1, 3, 8, 8))
    assert list(full_disk.iterdir()) == []  # neither a truncated model nor its temporary file


@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
def test_export_past_a_file_size_limit_fails_and_leaves_no_file(tmp_path, fmt):
    "The unprivileged twin of the full-disk test: RLIMIT_FSIZE makes the write itself fail (EFBIG), in a real process."
    code = ('import resource, signal, sys, torch\nfrom torch import nn\nfrom skinkd.export import export_model\n'
            'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n'
            'model = nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.Conv2d(256, 1, 3, padding=1))\n'
            f'try: export_model(model, {fmt!r}, sys.argv[1], torch.zeros(1, 3, 8, 8))\n'
            'except OSError as e: print(type(e).__name__, e.errno); sys.exit(3)\n')
    out = tmp_path / 'out'; out.mkdir()
    p = subprocess.run([sys.executable, '-c', code, str(out / 'model.bin')], capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout + p.stderr  # the export failed with an OSError, not a crash or a success
    assert list(out.iterdir()) == []  # neither a truncated model nor its temporary file


# --- the encoder seam ---------------------------------------------------------------------------------------------

def _geometry(net):
    return [(m.stride, m.dilation, m.padding) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


def test_mobilenet_encoder_matches_torchvisions_dilation_and_shapes():
    from skinkd.models import MobileNetV3Encoder
    enc = MobileNetV3Encoder('mobilenet_v3_large', 16)
    assert _geometry(enc) == _geometry(torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features)
    for os_ in (16, 8):
        m = build_model(ModelConfig('mobilenet_v3_large', output_stride=os_)).eval()
        with torch.no_grad(): taps = m(torch.randn(1, 3, 64, 48), return_features=True)
        strides = dict(layer1=4, layer2=8, layer3=min(16, os_), layer4=os_, aspp=os_, decoder=4)
        assert {k: tuple(taps[k].shape) for k in strides} == {
            k: (1, m.tap_channels[k], -(-64 // s), -(-48 // s)) for k, s in strides.items()}
        assert taps['logits'].shape == (1, 1, 64, 48) and m.backbone.channels == (24, 40, 112, 960)


def test_mobilenet_imagenet_weights_from_the_hub_cache_offline(tmp_path, monkeypatch):
    "torchvision's weights API names the file; a copy in the hub cache loads without network, renamed to the stages."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    _offline(monkeypatch)
    ref = torchvision.models.mobilenet_v3_large(weights=None)
    url = torchvision.models.get_weight('MobileNet_V3_Large_Weights.IMAGENET1K_V1').url
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'; cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / Path(url).name)
    m = DeepLabV3Plus('mobilenet_v3_large', pretrained='imagenet')
    assert torch.equal(m.backbone.layer4[-1][0].weight, ref.features[16][0].weight)
    assert torch.equal(m.backbone.layer2[0].block[1][0].weight, ref.features[4].block[1][0].weight)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(PretrainedError, match='do not fit a mobilenet_v3_large backbone'):
        DeepLabV3Plus('mobilenet_v3_large', pretrained=str(tmp_path / 'r18.pth'))


def test_a_registered_encoder_is_built_by_name():
    from skinkd.core import ENCODERS
    from skinkd.models import Encoder, encoder

    @encoder(tiny_cnn='')
    class TinyEncoder(Encoder):
        def __init__(self, name, output_stride):
            super().__init__()
            self.check_variant(name)
            chans, strides = (8, 16, 32, 64), (4, 2, 2, output_stride // 8)
            cins = (3, *chans[:-1])
            self.stages = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, s, 1) for a, b, s in zip(cins, chans, strides))
            self.name, self.output_stride, self.channels = name, output_stride, chans
        def forward(self, x):
            out = []
            for s in self.stages: x = s(x); out.append(x)
            return tuple(out)
    try:
        m = build_model(ModelConfig('tiny_cnn')).eval()
        assert m.tap_channels['layer4'] == 64 and m(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
        from skinkd.config import load_config
        assert load_config(overrides=['student.backbone=tiny_cnn']).student.backbone == 'tiny_cnn'
    finally: ENCODERS.unregister('tiny_cnn')
    with pytest.raises(SkinkdError, match="unknown encoder 'tiny_cnn'"):
        build_model(ModelConfig('tiny_cnn'))


@pytest.mark.parametrize('extra, message', [(['--size', '0'], '--size is 0'), (['--image', 'BROKEN'], 'cannot decode image')])
def test_export_argument_errors_are_one_line(tmp_path, student_ckpt, extra, message):
    (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
    extra = [str(tmp_path / 'broken.jpg') if a == 'BROKEN' else a for a in extra]
    r = subprocess.run(['skinkd_export', '--weights', str(student_ckpt[0]), '--format', 'onnx', '--out', str(tmp_path / 'm.onnx'), *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and message in r.stderr and 'Traceback' not in r.stderr and not (tmp_path / 'm.onnx').exists()
