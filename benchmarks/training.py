"""What do precision and distillation cost? Training steps and inference, fp32 against bf16, in one process.

    python benchmarks/training.py [--size 96] [--batch 16] [--repeats 4] [--threads N] [--amp auto|none|bf16]
                                  [--isa avx2|avx512|native] [--no-distill-cost]

1. Precision. Each workload runs in fp32 and under bf16 autocast, alternated round after round so that machine noise
   hits both alike (best of `--repeats`); the table gives the bf16 speed-up and what `--amp` picks on this machine
   (`skinkd.device.resolve_precision`: `auto` is bf16 only where the CPU multiplies it natively):
   - student step: forward + BCE-Dice + backward + SGD step of the default student (the raw baseline's step);
   - teacher step: the same for the ResNet-101 teacher;
   - distillation step: the real `DistillTask` (default terms: ASPP and decoder hints + logit KD) with the frozen
     teacher, + backward + step;
   - teacher forward: the frozen teacher alone on the same batch (inference mode, BN folded, channels_last);
   - student inference: batch 1, BN folded, channels_last (what `skinkd_predict` runs).
   `--isa avx2` caps PyTorch, oneDNN and MKL at AVX2 (`isa.py`): `auto` then picks fp32, and the bf16 column shows
   what forcing bf16 would cost there.
2. Distillation cost, in the precision `--amp` picks: distillation step <= 1.15 x (student step + teacher forward);
   an unlabelled image (`batch['unlabeled']`, as `distill.unlabeled` batches are) <= 1.2 x a masked one.
3. Cached soft labels (`distill.soft_labels: cached`, 07a_soft_labels): a step of B masked + B unlabelled images whose
   logit term reads the cached teacher maps (no teacher forward), per image, against a raw student step per image
   (target <= 1.1x); and the same batch with the live teacher and the default terms.
"""
import argparse
import sys
import time

from isa import cap_isa

if __name__ == '__main__': cap_isa(sys.argv)

import torch  # noqa: E402

from skinkd.schema import Config  # noqa: E402
from skinkd.models import DeepLabV3Plus  # noqa: E402
from skinkd.device import PRECISION_NAMES, autocast, resolve_precision  # noqa: E402
from skinkd.export import cpu_description  # noqa: E402
from skinkd.losses import DistillationLoss, SegLoss  # noqa: E402
from skinkd.learner import SegTask  # noqa: E402
from skinkd.soft_labels import freeze  # noqa: E402
from skinkd.distill import DistillTask  # noqa: E402
from models import alternate  # noqa: E402  (benchmarks/models.py)

CPU = torch.device('cpu')


def train_step(task, model, params, batch, amp: str):
    """One optimisation step of `task` on `batch`, the networks under `amp` (as `Learner.train_step` runs it)."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    def step():
        with autocast(CPU, amp):
            loss, _ = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward(fn, amp: str):
    """`fn()` without autograd, under `amp`."""
    def run():
        with torch.inference_mode(), autocast(CPU, amp):
            fn()
    return run


def workloads(size: int, batch_size: int):
    """{name: amp -> callable} for the five workloads, on one shared set of models and batches."""
    torch.manual_seed(0)
    cl = torch.channels_last
    cfg = Config()
    batch = {'image': torch.randn(batch_size, 3, size, size).contiguous(memory_format=cl),
             'mask': (torch.rand(batch_size, 1, size, size) > 0.5).float()}
    student = DeepLabV3Plus(cfg.student.backbone, aspp_separable=cfg.student.aspp_separable)
    student = student.train().to(memory_format=cl)
    teacher_net = DeepLabV3Plus(cfg.teacher.backbone).train().to(memory_format=cl)
    frozen = freeze(DeepLabV3Plus(cfg.teacher.backbone), channels_last=True)
    deployed = freeze(student, channels_last=True)
    kd = DistillationLoss(cfg.distill.terms, student.tap_channels, frozen.tap_channels)
    seg = SegLoss()
    distil = DistillTask(seg, kd, frozen, [t.tap for t in cfg.distill.terms])
    one = batch['image'][:1]
    mixed = {**batch, 'unlabeled': torch.randn_like(batch['image'])}
    logit_terms = [t for t in cfg.distill.terms if t.tap == 'logits']
    kd_logit = DistillationLoss(logit_terms, student.tap_channels, frozen.tap_channels)
    cached = DistillTask(seg, kd_logit, None, ['logits'], cached={'logits'})   # distill.soft_labels: cached
    soft = {'soft': torch.randn(batch_size, 1, size, size), 'unlabeled_soft': torch.randn(batch_size, 1, size, size)}
    return {
        'student step': lambda amp: train_step(SegTask(seg), student, student.parameters(), batch, amp),
        'teacher step': lambda amp: train_step(SegTask(seg), teacher_net, teacher_net.parameters(), batch, amp),
        'distillation step': lambda amp: train_step(distil, student, [*student.parameters(), *kd.parameters()],
                                                    batch, amp),
        'teacher forward': lambda amp: forward(lambda: distil.teacher_taps(batch['image']), amp),
        'student inference (batch 1)': lambda amp: forward(lambda: deployed(one), amp),
        'distillation + unlabelled': lambda amp: train_step(distil, student, [*student.parameters(), *kd.parameters()],
                                                            mixed, amp),
        'cached soft labels + unlabelled': lambda amp: train_step(cached, student, student.parameters(),
                                                                  {**mixed, **soft}, amp),
    }


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each callable over `repeats` alternated rounds (`models.alternate`, after a warm-up call)."""
    def timer(f):
        def timed():
            t = time.perf_counter()
            f()
            return time.perf_counter() - t
        return timed
    times = alternate([timer(f) for f in fns.values()], repeats, warmup=1)
    return dict(zip(fns, times.min(axis=0)))


def precision_table(work: dict, chosen: str, repeats: int) -> dict:
    """Print fp32 against bf16 for each workload, and the chosen precision's speed-up; return the chosen times."""
    names = [n for n in work if '+ unlabelled' not in n]
    fns = {(n, amp): work[n](amp) for n in names for amp in ('none', 'bf16')}
    t = best_times(fns, repeats)
    picked = PRECISION_NAMES[chosen]
    print(f'| workload | fp32 s | bf16 s | bf16 speed-up | chosen ({picked}) x fp32 |')
    print('|---|---|---|---|---|')
    for n in names:
        fp32, bf16 = t[n, 'none'], t[n, 'bf16']
        print(f'| {n} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x | {fp32 / t[n, chosen]:.2f}x |')
    return {n: t[n, chosen] for n in names}


def distillation_cost(work: dict, chosen: str, repeats: int, batch_size: int):
    """Print the distillation step against its parts, and the cost of an unlabelled image, in the chosen precision."""
    names = ('student step', 'teacher forward', 'distillation step', 'distillation + unlabelled')
    best = best_times({n: work[n](chosen) for n in names}, repeats)
    ratio = best['distillation step'] / (best['student step'] + best['teacher forward'])
    print(f'\ndistillation cost in {PRECISION_NAMES[chosen]}:')
    print(f'distillation step / (student step + teacher forward) = {ratio:.3f}x (target <= 1.15x)')
    print(f"distillation step / student step = {best['distillation step'] / best['student step']:.2f}x")
    per_masked = best['distillation step'] / batch_size
    per_unlabeled = (best['distillation + unlabelled'] - best['distillation step']) / batch_size
    print(f'per image: masked {per_masked * 1e3:.1f} ms, unlabelled {per_unlabeled * 1e3:.1f} ms: '
          f'{per_unlabeled / per_masked:.2f}x (target <= 1.2x)')


def soft_label_cost(work: dict, chosen: str, repeats: int):
    """Print the cost per image of a distillation step with an unlabelled image per masked one, against a raw step."""
    names = ('student step', 'distillation + unlabelled', 'cached soft labels + unlabelled')
    best = best_times({n: work[n](chosen) for n in names}, repeats)
    raw = best['student step']          # B masked images
    print(f'\nper image, in {PRECISION_NAMES[chosen]}, against a raw student step (B masked images):')
    print(f"live teacher, default terms, B masked + B unlabelled: {best['distillation + unlabelled'] / 2 / raw:.2f}x")
    print(f"cached soft labels, logit term, B masked + B unlabelled: {best['cached soft labels + unlabelled'] / 2 / raw:.2f}x"
          ' (target <= 1.1x)')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=96, help='image size (configs/isic2018_cpu.yaml trains at 96)')
    p.add_argument('--batch', type=int, default=16, help='images per training step')
    p.add_argument('--repeats', type=int, default=4, help='timed rounds (the best is kept)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: PyTorch default)')
    p.add_argument('--amp', default='auto', choices=('auto', 'none', 'bf16'), help='the precision to report for')
    p.add_argument('--isa', default='native', help='avx2 | avx512 | native: cap the instructions (see isa.py)')
    p.add_argument('--no-distill-cost', action='store_true', help='only the precision table')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    precision = resolve_precision(a.amp, CPU)
    print(f'CPU: {cpu_description()}')
    print(f'--amp {a.amp}: {precision}' + (f'; warning: {precision.warning}' if precision.warning else ''))
    print(f'size {a.size}, batch {a.batch}, threads {torch.get_num_threads()}, best of {a.repeats} alternated rounds\n')
    work = workloads(a.size, a.batch)
    precision_table(work, precision.amp, a.repeats)
    if not a.no_distill_cost:
        distillation_cost(work, precision.amp, a.repeats, a.batch)
        soft_label_cost(work, precision.amp, a.repeats)


if __name__ == '__main__':
    main()
