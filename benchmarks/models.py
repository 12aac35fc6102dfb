"""Speed of skinkd's DeepLabV3+ against segmentation_models_pytorch (smp) on the CPU.

For the teacher (ResNet-101) and the student (ResNet-18), each with separable and standard ASPP, builds skinkd's
model and smp.DeepLabV3Plus with the same encoder, output stride 16 and ASPP style, and measures, alternating the
two models in the same process so that machine noise hits both alike:
  - parameters and MACs at 256x256 (torch.utils.flop_counter),
  - inference latency, batch 1, 256x256, for skinkd's three inference paths:
      compiled: prepare_for_inference(compile=True) = BatchNorm folded, channels_last, torch.compile (Inductor) with
                frozen weights (`eval.compile`; compile time is excluded and printed separately),
      frozen:   prepare_for_inference(freeze=True) = traced and frozen into oneDNN by TorchScript,
      eager:    prepare_for_inference() = BatchNorm folded + channels_last (what evaluation runs by default),
    against smp in eager eval mode, as documented,
  - training throughput, batch 4, 256x256, SGD step on BCE (skinkd: channels_last, the train.channels_last default).
Ratios are skinkd speed / smp speed (> 1: skinkd faster). Targets (issue 4), checked on the separable rows, which
compare the same architecture: inference >= 1.3x (skinkd's fastest path, compiled), training >= 1.0x. "per MAC" scales
the training ratio by the MAC ratio: how fast each implementation turns arithmetic into steps.
Times are the best of several alternated repetitions. Note: smp keeps separable convolutions after ASPP and in the
decoder even with decoder_aspp_separable=False, while skinkd's standard model has the paper's full 3x3 convolutions
there (about twice the MACs for ResNet-18), so only the separable rows compare the same amount of work.

At one thread PyTorch sends 1x1 convolutions at batch < 16 to its native GEMM instead of oneDNN (for both models),
so run it at the default thread count and at --threads 1 to see both regimes.

A second table compares the students skinkd can build through its encoder registry: the MobileNetV3-Large student
against the ResNet-18 student (standard and separable ASPP/decoder each): parameters, MACs, compiled and eager
latency at batch 1 and training throughput, alternated in one process; ratios are against the ResNet-18 standard
student (the default).

Usage: python benchmarks/models.py [--quick] [--threads N] [--students-only]   (smp is a benchmark-only dependency)
"""
import argparse
import time

import torch
import torch.nn.functional as F

from skinkd.export import prepare_for_inference
from skinkd.models import DeepLabV3Plus, aspp_rates, count_macs, count_params, prepare_for_training


def smp_model(backbone, separable):
    "smp's DeepLabV3Plus with the same encoder, output stride 16 and ASPP style."
    import segmentation_models_pytorch as smp
    return smp.DeepLabV3Plus(encoder_name=backbone, encoder_weights=None, encoder_output_stride=16,
                             decoder_atrous_rates=aspp_rates(16), decoder_aspp_separable=separable, classes=1)


def infer_step(model, x):
    "One timed inference call."
    with torch.inference_mode():
        t = time.perf_counter(); model(x); return time.perf_counter() - t


def train_step(model, opt, x, y):
    "One timed SGD step on BCE."
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t


def alternate(fns, reps, warmup=1):
    "Best times of the timing functions `fns`, called in turn after warm-up (the minimum is the least disturbed by other load)."
    for _ in range(warmup):
        for f in fns: f()
    times = [[] for _ in fns]
    for i in range(reps):  # alternate the order too
        for j in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))): times[j].append(fns[j]())
    return tuple(min(t) for t in times)


def bench_pair(backbone, separable, reps, size=256, batch=4):
    "One table row: skinkd vs smp for an encoder and ASPP style."
    torch.manual_seed(0)
    ours, ref = DeepLabV3Plus(backbone, aspp_separable=separable), smp_model(backbone, separable)
    row = dict(model=f"{backbone} {'sep' if separable else 'std'}", params=(count_params(ours), count_params(ref)),
               macs=(count_macs(ours, size), count_macs(ref, size)))
    eager, frozen, ref_eval = prepare_for_inference(ours), prepare_for_inference(ours, freeze=True), ref.eval()
    compiled, x1 = prepare_for_inference(ours, compile=True), torch.randn(1, 3, size, size)
    row['compile_s'] = infer_step(compiled, x1)  # the first call compiles
    with torch.inference_mode():
        ref_logits = eager(x1)
        for name, fast in (('frozen', frozen), ('compiled', compiled)):  # relative: random deep ResNets give large logits
            diff = (fast(x1) - ref_logits).abs().max() / ref_logits.abs().max().clamp(min=1)
            assert diff < 1e-4, f'{name} model differs from eager by {diff:.1e} (relative)'
    row['infer'] = alternate([lambda: infer_step(compiled, x1), lambda: infer_step(frozen, x1),
                              lambda: infer_step(eager, x1), lambda: infer_step(ref_eval, x1)], reps)
    del compiled, frozen, eager
    ours, ref = prepare_for_training(ours.train()), ref.train()
    xb, yb = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    oo, oa = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9), torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    row['train'] = alternate([lambda: train_step(ours, oo, xb, yb), lambda: train_step(ref, oa, xb, yb)], reps)
    row['train'] = tuple(batch / t for t in row['train'])  # images per second
    return row


def print_table(rows):
    "The results as a text table with skinkd/smp ratios, then the target check on the separable rows."
    print(f"{'model':14} {'params M':>15} {'GMACs':>13} | {'latency ms: compiled  frozen   eager     smp':>44} | "
          f"{'speed x: compiled frozen eager':>30} | {'train img/s':>15} {'speed x':>7} {'per MAC':>7}")
    print(f"{'':14} {'skinkd / smp':>15} {'skinkd / smp':>13} | {'':44} | {'':30} | {'skinkd / smp':>15}")
    for r in rows:
        (pa, pb), (ma, mb), lat, (ta, tb) = r['params'], r['macs'], r['infer'], r['train']
        print(f"{r['model']:14} {pa / 1e6:6.2f} / {pb / 1e6:6.2f} {ma / 1e9:5.2f} / {mb / 1e9:5.2f} | "
              f"{'':7}" + ''.join(f'{t * 1e3:9.1f}' for t in lat) + ' | '
              f"{'':6}" + ''.join(f'{lat[-1] / t:7.2f}x' for t in lat[:-1]) + ' | '
              f"{ta:6.2f} / {tb:6.2f} {ta / tb:6.2f}x {ta / tb * ma / mb:6.2f}x")
    print('compile time of the first call (s): ' + ', '.join(f"{r['model']} {r['compile_s']:.0f}" for r in rows))
    for r in (r for r in rows if r['model'].endswith('sep')):
        inf, tr = r['infer'][-1] / r['infer'][0], r['train'][0] / r['train'][1]
        print(f"target {r['model']}: inference (compiled) {inf:.2f}x >= 1.3x {'met' if inf >= 1.3 else 'NOT met'}; "
              f"training {tr:.2f}x >= 1.0x {'met' if tr >= 1.0 else 'NOT met'}")


STUDENTS = [('resnet18', False), ('resnet18', True), ('mobilenet_v3_large', False), ('mobilenet_v3_large', True)]

def bench_students(reps, size=256, batch=4):
    "Rows of the student table: every student's size, compiled and eager latency and training speed, alternated."
    torch.manual_seed(0)
    models = {f"{b} {'sep' if s else 'std'}": DeepLabV3Plus(b, aspp_separable=s) for b, s in STUDENTS}
    rows = {k: dict(model=k, params=count_params(m), macs=count_macs(m, size)) for k, m in models.items()}
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    yb = (torch.rand(batch, 1, size, size) > 0.5).float()
    compiled = {k: prepare_for_inference(m, compile=True) for k, m in models.items()}
    eager = {k: prepare_for_inference(m) for k, m in models.items()}
    for k, c in compiled.items(): rows[k]['compile_s'] = infer_step(c, x1)
    times = alternate([(lambda c=c: infer_step(c, x1)) for c in compiled.values()] +
                      [(lambda e=e: infer_step(e, x1)) for e in eager.values()], reps)
    for i, k in enumerate(models): rows[k]['infer'] = (times[i], times[len(models) + i])
    train = {k: prepare_for_training(m.train()) for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in train.items()}
    tt = alternate([(lambda k=k: train_step(train[k], opts[k], xb, yb)) for k in train], reps)
    for k, t in zip(train, tt): rows[k]['train'] = batch / t
    return list(rows.values())


def print_students(rows):
    "The student table, with ratios against the first row (the default ResNet-18 student)."
    base = rows[0]
    print(f"\n{'student':24} {'params M':>8} {'GMACs':>6} {'compiled ms':>11} {'eager ms':>9} {'train img/s':>11} | "
          f"{'params':>6} {'MACs':>6} {'compiled':>8} {'train':>6}  (x the {base['model']} student)")
    for r in rows:
        print(f"{r['model']:24} {r['params'] / 1e6:8.2f} {r['macs'] / 1e9:6.2f} {r['infer'][0] * 1e3:11.1f} {r['infer'][1] * 1e3:9.1f} "
              f"{r['train']:11.2f} | {r['params'] / base['params']:6.2f} {r['macs'] / base['macs']:6.2f} "
              f"{base['infer'][0] / r['infer'][0]:7.2f}x {r['train'] / base['train']:5.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='student (ResNet-18) rows only, fewer repetitions')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--students-only', action='store_true', help='only the student table (ResNet-18 vs MobileNetV3-Large)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    pairs = [('resnet18', True), ('resnet18', False)] + ([] if a.quick else [('resnet101', True), ('resnet101', False)])
    reps = 5 if a.quick else 7
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 256x256; inference batch 1, training batch 4')
    if not a.students_only:
        rows = []
        for backbone, sep in pairs:
            rows.append(bench_pair(backbone, sep, reps if backbone == 'resnet18' else 5))
            print(f'  done {rows[-1]["model"]}', flush=True)
        print_table(rows)
    print_students(bench_students(reps))


if __name__ == '__main__': main()
