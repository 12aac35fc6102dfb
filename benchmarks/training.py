"""What does distillation cost? One distillation step against its parts, measured in one process.

    python benchmarks/training.py [--size 256] [--batch 4] [--repeats 5] [--threads N]

Times, alternated so that machine noise hits every variant alike (best of `repeats`):
- student step: forward + backward + optimiser step of the ResNet-18 DeepLabV3+ (the raw baseline's step);
- teacher forward: the frozen ResNet-101 teacher as distillation runs it (inference mode, BN folded, channels_last);
- distillation step: the real `DistillTask` (default terms: ASPP and decoder hints + logit KD) + backward + step.
- distillation step with as many unlabelled images again (`batch['unlabeled']`, as `distill.unlabeled` batches are):
  the extra time per unlabelled image against the time per masked image of the plain distillation step.
Targets: distillation step <= 1.15 x (student step + teacher forward); an unlabelled image <= 1.2 x a masked one.
"""
import argparse
import time

import torch

from skinkd.config import Config
from skinkd.distill import DistillTask, freeze
from skinkd.learner import SegTask
from skinkd.losses import DistillationLoss, SegLoss
from skinkd.models import DeepLabV3Plus


def step_fn(task, model, params, batch):
    """One optimisation step of `task` on `batch`."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    def step():
        loss, _ = task.loss(model, batch)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step


def best_time(fn, repeats: int) -> float:
    """Best wall time of `fn` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=256); p.add_argument('--batch', type=int, default=4)
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    batch = {'image': torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=cl),
             'mask': (torch.rand(a.batch, 1, a.size, a.size) > 0.5).float()}
    student = DeepLabV3Plus('resnet18').train().to(memory_format=cl)
    teacher = freeze(DeepLabV3Plus('resnet101'), channels_last=True)
    kd = DistillationLoss(Config().distill.terms, student.tap_channels, teacher.tap_channels)
    seg = SegLoss()
    raw = step_fn(SegTask(seg), student, student.parameters(), batch)
    distil_task = DistillTask(seg, kd, teacher, [t.tap for t in Config().distill.terms])
    distil = step_fn(distil_task, student, [*student.parameters(), *kd.parameters()], batch)
    teach = lambda: distil_task.teacher_taps(batch['image'])
    mixed_batch = {**batch, 'unlabeled': torch.randn_like(batch['image'])}
    mixed = step_fn(distil_task, student, [*student.parameters(), *kd.parameters()], mixed_batch)
    variants = {'student step': raw, 'teacher forward': teach, 'distillation step': distil, 'distillation + unlabelled': mixed}
    for f in variants.values(): f()  # warm up
    t = {k: [] for k in variants}
    for _ in range(a.repeats):  # alternate the variants
        for name, f in variants.items(): t[name].append(best_time(f, 1))
    best = {k: min(v) for k, v in t.items()}
    print(f'size {a.size}, batch {a.batch}, threads {torch.get_num_threads()}, best of {a.repeats}')
    print(f"{'variant':20} {'seconds':>8}")
    for k, v in best.items(): print(f'{k:20} {v:8.3f}')
    ratio = best['distillation step'] / (best['student step'] + best['teacher forward'])
    print(f'distillation step / (student step + teacher forward) = {ratio:.3f}x (target <= 1.15x)')
    print(f"distillation step / student step = {best['distillation step'] / best['student step']:.2f}x")
    per_masked = best['distillation step'] / a.batch
    per_unlabeled = (best['distillation + unlabelled'] - best['distillation step']) / a.batch
    print(f'per image: masked {per_masked * 1e3:.1f} ms, unlabelled {per_unlabeled * 1e3:.1f} ms: '
          f'{per_unlabeled / per_masked:.2f}x (target <= 1.2x)')


if __name__ == '__main__':
    main()
