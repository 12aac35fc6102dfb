"""Is bf16 inference close enough to fp32? Validation Dice and the teacher's outputs, on real images, in one process.

    python benchmarks/precision.py --config configs/isic2018_cpu.yaml --teacher T.pt --weights S1.pt [S2.pt ...]
                                   [--set KEY=VALUE ...]

For every checkpoint (the teacher and any students), on the validation split of `--config` at its working size:
  - validation Dice as training computes it (`skinkd.learner.validate`, channels_last), in fp32 and under bf16
    autocast, and the difference (the issue's bar: within 0.0005), with the time of each pass;
For the teacher as distillation runs it (frozen: BatchNorm folded, channels_last), bf16 against fp32 on the same images:
  - the probability maps: mean, 99.9th percentile and largest absolute difference, and the Dice between the two
    thresholded masks;
  - each distillation tap (`distill.terms` of the config): the relative L2 error of the bf16 features;
  - the default KD terms evaluated on the fp32 targets and on the bf16 ones, for a fixed student (how much the
    distillation loss itself moves).
"""
import argparse
import time

import numpy as np
import torch

from skinkd.config import load_config, resolve_paths
from skinkd.loaders import get_data
from skinkd.checkpoints import load_model
from skinkd.device import autocast
from skinkd.infer import probs_to_mask
from skinkd.export import cpu_description
from skinkd.losses import DistillationLoss
from skinkd.learner import validate
from skinkd.soft_labels import freeze
from skinkd.distill import DistillTask

CPU = torch.device('cpu')


def timed(fn):
    """(fn(), seconds)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def validation_dice(path: str, loader, threshold: float) -> str:
    """A table row: validation Dice in fp32 and bf16 for the checkpoint at `path`."""
    model, ck = load_model(path)
    model = model.to(memory_format=torch.channels_last)
    fp32, t32 = timed(lambda: validate(model, loader, CPU, threshold, True, 'none')['dice'])
    bf16, t16 = timed(lambda: validate(model, loader, CPU, threshold, True, 'bf16')['dice'])
    name = f"{ck['role']} {ck['model_config']['backbone']} ({ck['extra'].get('mode', '?')})"
    return f'| {name} | {fp32:.4f} | {bf16:.4f} | {bf16 - fp32:+.4f} | {t32:.1f} / {t16:.1f} |'


def teacher_outputs(teacher, images: torch.Tensor, taps: list[str], amp: str) -> dict:
    """The frozen teacher's taps and logits on `images` in `amp`, in fp32."""
    task = DistillTask(None, None, teacher, [*taps, 'logits'])
    with autocast(CPU, amp):
        return task.teacher_taps(images)


def teacher_distance(path: str, loader, cfg, threshold: float):
    """Print how far the bf16 teacher pass is from the fp32 one on the validation images."""
    model, _ = load_model(path)
    teacher = freeze(model, channels_last=True)
    taps = sorted({t.tap for t in cfg.distill.terms})
    images = torch.cat([b['image'] for b in loader]).contiguous(memory_format=torch.channels_last)
    fp32, t32 = timed(lambda: teacher_outputs(teacher, images, taps, 'none'))
    bf16, t16 = timed(lambda: teacher_outputs(teacher, images, taps, 'bf16'))
    p32, p16 = torch.sigmoid(fp32['logits']), torch.sigmoid(bf16['logits'])
    diff = (p32 - p16).abs().flatten().numpy()
    m32, m16 = probs_to_mask(p32, threshold), probs_to_mask(p16, threshold)
    agree = 2 * (m32 & m16).sum().item() / max(1, m32.sum().item() + m16.sum().item())
    print(f'\nteacher pass on {len(images)} validation images: fp32 {t32:.1f} s, bf16 {t16:.1f} s ({t32 / t16:.2f}x)')
    print(f'P(lesion) |bf16 - fp32|: mean {diff.mean():.5f}, 99.9th percentile {np.quantile(diff, 0.999):.4f}, '
          f'max {diff.max():.4f}; thresholded masks agree at Dice {agree:.5f}')
    for k in taps:
        rel = ((bf16[k] - fp32[k]).norm() / fp32[k].norm()).item()
        print(f'tap {k}: relative L2 error of the bf16 features {rel:.4f}')
    kd_moves(model, teacher, images[:32], fp32, bf16, cfg)


def kd_moves(model, teacher, images, fp32: dict, bf16: dict, cfg):
    """Print the KD terms of a fixed student against the fp32 and the bf16 teacher targets."""
    torch.manual_seed(0)
    student = type(model)(cfg.student.backbone, aspp_separable=cfg.student.aspp_separable).eval()
    kd = DistillationLoss(cfg.distill.terms, student.tap_channels, teacher.tap_channels).eval()
    with torch.no_grad():
        s = student(images, return_features=True)
        a = kd(s, {k: v[:len(images)] for k, v in fp32.items()})[1]
        b = kd(s, {k: v[:len(images)] for k, v in bf16.items()})[1]
    for k in a:
        print(f'KD term {k} of an untrained student: fp32 targets {a[k].item():.6f}, bf16 targets {b[k].item():.6f} '
              f'({(b[k] / a[k] - 1).item() * 100:+.3f}%)')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True)
    p.add_argument('--teacher', required=True, help="the teacher's checkpoint")
    p.add_argument('--weights', nargs='*', default=[], help='student checkpoints to validate too')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
    a = p.parse_args()
    cfg = resolve_paths(load_config(a.config, overrides=a.set))
    loader = get_data(cfg).loaders['val']
    print(f'CPU: {cpu_description()}; {torch.get_num_threads()} threads')
    print('\n| checkpoint | val Dice fp32 | val Dice bf16 | bf16 - fp32 | seconds fp32 / bf16 |')
    print('|---|---|---|---|---|')
    for path in [a.teacher, *a.weights]: print(validation_dice(path, loader, cfg.eval.threshold))
    teacher_distance(a.teacher, loader, cfg, cfg.eval.threshold)


if __name__ == '__main__':
    main()
