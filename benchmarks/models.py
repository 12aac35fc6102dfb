"""Speed of skinkd's DeepLabV3+ students and teacher against segmentation_models_pytorch (smp) on the CPU, with spread.

Pairs (skinkd against smp.DeepLabV3Plus with the same encoder, output stride 16 and ASPP style): ResNet-18 and
ResNet-101, separable and standard, and the separable MobileNetV3-Large student against smp's timm MobileNetV3-Large
(`tu-mobilenetv3_large_100`, the same 4.71 M parameters). For each pair:
  - parameters and MACs at 256x256 (torch.utils.flop_counter),
  - inference latency, batch 1, 256x256, for skinkd's three inference paths:
      compiled: prepare_for_inference(compile=True) = BatchNorm folded, channels_last, torch.compile (Inductor) with
                frozen weights (`eval.compile`; compile time is excluded and printed separately),
      frozen:   prepare_for_inference(freeze=True) = traced and frozen into oneDNN by TorchScript,
      eager:    prepare_for_inference() = BatchNorm folded + channels_last (what evaluation runs by default),
    against smp in eager eval mode, as documented,
  - training throughput, batch 4, 256x256, SGD step on BCE (skinkd: channels_last, the train.channels_last default).
The student table then compares every student skinkd can build (ResNet-18 and MobileNetV3-Large, standard and
separable ASPP/decoder) against the default student: parameters, MACs, compiled and eager latency at batch 1 and
`--student-size` pixels, eager latency under bf16 autocast and its speed-up over fp32 eager (alternated in blocks of
calls before anything is compiled; large only on a CPU that multiplies bf16 natively, see nbs/03b_device.ipynb), and
training throughput.

Every measurement alternates the models in one process, round after round (the order reversed every other round), so
that machine noise hits them alike. Times are the median over `--rounds` rounds with the interquartile range; each
ratio is computed within a round (skinkd speed / smp speed, > 1: skinkd faster) and summarised the same way. Targets
(issue 17), on the separable rows, which compare the same architecture: compiled inference >= 1.3x, training >= 1.0x.
"per MAC" scales the training ratio by the MAC ratio: how fast each implementation turns arithmetic into steps.
smp keeps separable convolutions after ASPP and in the decoder even with decoder_aspp_separable=False, while skinkd's
standard model has the paper's full 3x3 convolutions there, so only the separable rows compare the same work.

The first line printed names the CPU and the instructions PyTorch may use. `--isa avx2` caps PyTorch's kernels, oneDNN
and MKL at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS; Inductor follows ATen's cap): what
an AVX2-only CPU runs, on this CPU's cores and caches.

Usage: python benchmarks/models.py [--quick] [--rounds N] [--threads N] [--isa avx2|native] [--students-only | --no-students]
       [--student-size 96]   (smp is a benchmark-only dependency)
"""
import argparse
import sys

from isa import ISA_CAPS, cap_isa

if __name__ == '__main__': cap_isa(sys.argv)

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from skinkd.models import DeepLabV3Plus, aspp_rates, count_macs, count_params  # noqa: E402
from skinkd.checkpoints import prepare_for_training  # noqa: E402
from skinkd.infer import prepare_for_inference  # noqa: E402
from skinkd.export import cpu_description  # noqa: E402

SMP_ENCODER = {'resnet18': 'resnet18', 'resnet101': 'resnet101', 'mobilenet_v3_large': 'tu-mobilenetv3_large_100'}
STUDENTS = [('resnet18', False), ('resnet18', True), ('mobilenet_v3_large', False), ('mobilenet_v3_large', True)]


def smp_model(backbone, separable):
    "smp's DeepLabV3Plus with the same encoder, output stride 16 and ASPP style."
    import segmentation_models_pytorch as smp
    return smp.DeepLabV3Plus(encoder_name=SMP_ENCODER[backbone], encoder_weights=None, encoder_output_stride=16,
                             decoder_atrous_rates=aspp_rates(16), decoder_aspp_separable=separable, classes=1)


def infer_step(model, x):
    "One timed inference call."
    with torch.inference_mode():
        t = time.perf_counter(); model(x); return time.perf_counter() - t


def infer_step_bf16(model, x):
    "One timed inference call under bf16 autocast (the convolutions in bf16, the weights fp32)."
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        t = time.perf_counter()
        model(x)
        return time.perf_counter() - t


def train_step(model, opt, x, y):
    "One timed SGD step on BCE."
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t


def alternate(fns, rounds, warmup=2):
    "Times of the timing functions `fns`, called in turn for `rounds` rounds after warm-up: an array (rounds, len(fns))."
    for _ in range(warmup):
        for f in fns: f()
    times = np.zeros((rounds, len(fns)))
    for i in range(rounds):  # alternate the order too
        for j in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))): times[i, j] = fns[j]()
    return times


def spread(x):
    "(median, 25th percentile, 75th percentile) of `x`."
    return tuple(float(v) for v in np.percentile(x, [50, 25, 75]))


def alternate_blocks(fns, rounds, block=5):
    """Like `alternate`, but each turn is a warm-up call and `block` timed calls, summarised by their median.

    For models in different runtimes (PyTorch, ONNX Runtime): each runtime's idle threads spin for a while after a call
    and slow the other's next call, which a single alternated call would measure."""
    times = np.zeros((rounds, len(fns)))
    for i in range(rounds):
        for j in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))):
            fns[j](); times[i, j] = np.median([fns[j]() for _ in range(block)])
    return times


def fmt_spread(s, scale=1.0, digits=1, unit=''):
    "'12.3 (11.9-12.8)' from a `spread`."
    m, lo, hi = (v * scale for v in s)
    return f'{m:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})'


def label(backbone, separable):
    return f"{backbone} {'sep' if separable else 'std'}"


def bench_pair(backbone, separable, rounds, size=256, batch=4):
    "One table row: skinkd against smp for an encoder and ASPP style."
    torch.manual_seed(0)
    ours, ref = DeepLabV3Plus(backbone, aspp_separable=separable), smp_model(backbone, separable)
    row = dict(model=label(backbone, separable), params=(count_params(ours), count_params(ref)),
               macs=(count_macs(ours, size), count_macs(ref, size)))
    eager, frozen, ref_eval = prepare_for_inference(ours), prepare_for_inference(ours, freeze=True), ref.eval()
    compiled, x1 = prepare_for_inference(ours, compile=True), torch.randn(1, 3, size, size)
    row['compile_s'] = infer_step(compiled, x1)  # the first call compiles
    with torch.inference_mode():
        ref_logits = eager(x1)
        for name, fast in (('frozen', frozen), ('compiled', compiled)):  # relative: random deep ResNets give large logits
            diff = (fast(x1) - ref_logits).abs().max() / ref_logits.abs().max().clamp(min=1)
            assert diff < 1e-4, f'{name} model differs from eager by {diff:.1e} (relative)'
    t = alternate([lambda: infer_step(compiled, x1), lambda: infer_step(frozen, x1),
                   lambda: infer_step(eager, x1), lambda: infer_step(ref_eval, x1)], rounds)
    row['infer'] = [spread(t[:, j]) for j in range(4)]
    row['infer_ratio'] = [spread(t[:, 3] / t[:, j]) for j in range(3)]  # smp time / skinkd time, per round
    del compiled, frozen, eager
    ours, ref = prepare_for_training(ours.train()), ref.train()
    xb, yb = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    oo, oa = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9), torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    t = alternate([lambda: train_step(ours, oo, xb, yb), lambda: train_step(ref, oa, xb, yb)], rounds)
    row['train'] = [spread(batch / t[:, j]) for j in range(2)]  # images per second
    row['train_ratio'] = spread(t[:, 1] / t[:, 0])
    return row


def print_table(rows):
    "The results as a text table with skinkd/smp ratios (median, interquartile range), then the target check on the separable rows."
    print(f"\n{'model':22} {'params M':>15} {'GMACs':>13} | latency ms, median (IQR): {'compiled':>20} {'frozen':>20} {'eager':>20} "
          f"{'smp':>20} | speed x (compiled) {'':12} | train img/s: {'skinkd':>18} {'smp':>18} | {'speed x':>18} {'per MAC':>7}")
    for r in rows:
        (pa, pb), (ma, mb) = r['params'], r['macs']
        print(f"{r['model']:22} {pa / 1e6:6.2f} / {pb / 1e6:6.2f} {ma / 1e9:5.2f} / {mb / 1e9:5.2f} | {'':27}"
              + ''.join(f'{fmt_spread(s, 1e3):>21}' for s in r['infer'])
              + f" | {fmt_spread(r['infer_ratio'][0], digits=2, unit='x'):>31}"
              + f" | {'':12}" + ''.join(f'{fmt_spread(s, digits=2):>19}' for s in r['train'])
              + f" | {fmt_spread(r['train_ratio'], digits=2, unit='x'):>18} {r['train_ratio'][0] * ma / mb:6.2f}x")
    print('frozen and eager speed x (median): ' + ', '.join(f"{r['model']} {r['infer_ratio'][1][0]:.2f}x / {r['infer_ratio'][2][0]:.2f}x" for r in rows))
    print('compile time of the first call (s): ' + ', '.join(f"{r['model']} {r['compile_s']:.0f}" for r in rows))
    for r in (r for r in rows if r['model'].endswith('sep')):
        inf, tr = r['infer_ratio'][0], r['train_ratio']
        print(f"target {r['model']}: inference (compiled) {fmt_spread(inf, digits=2, unit='x')} >= 1.3x "
              f"{'met' if inf[0] >= 1.3 else 'NOT met'}; training {fmt_spread(tr, digits=2, unit='x')} >= 1.0x "
              f"{'met' if tr[0] >= 1.0 else 'NOT met'} (median; IQR in brackets)")


def bench_students(rounds, size=256, batch=4):
    "Rows of the student table: every student's size, compiled and eager latency and training speed, alternated."
    torch.manual_seed(0)
    models = {label(b, s): DeepLabV3Plus(b, aspp_separable=s) for b, s in STUDENTS}
    rows = {k: dict(model=k, params=count_params(m), macs=count_macs(m, size)) for k, m in models.items()}
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    yb = (torch.rand(batch, 1, size, size) > 0.5).float()
    eager = {k: prepare_for_inference(m) for k, m in models.items()}
    n = len(models)
    # bf16 against fp32 (eager), in blocks of calls, before anything is compiled: once Inductor has compiled a model in
    # the process, eager bf16 calls run ~25% slower (8.6 -> 10.9 ms for the default student at 96 px), fp32 ones do not
    t = alternate_blocks([(lambda e=e: infer_step(e, x1)) for e in eager.values()] +
                         [(lambda e=e: infer_step_bf16(e, x1)) for e in eager.values()], rounds)
    for i, k in enumerate(models):
        rows[k]['bf16'] = spread(t[:, n + i])
        rows[k]['bf16_speedup'] = spread(t[:, i] / t[:, n + i])  # bf16 eager against fp32 eager, per round
    compiled = {k: prepare_for_inference(m, compile=True) for k, m in models.items()}
    for k, c in compiled.items(): rows[k]['compile_s'] = infer_step(c, x1)
    t = alternate([(lambda c=c: infer_step(c, x1)) for c in compiled.values()] +
                  [(lambda e=e: infer_step(e, x1)) for e in eager.values()], rounds)
    for i, k in enumerate(models):
        rows[k]['infer'] = (spread(t[:, i]), spread(t[:, n + i]))
        rows[k]['infer_speedup'] = spread(t[:, 0] / t[:, i])  # against the first (default) student, per round
    train = {k: prepare_for_training(m.train()) for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in train.items()}
    t = alternate([(lambda k=k: train_step(train[k], opts[k], xb, yb)) for k in train], rounds)
    for i, k in enumerate(train):
        rows[k]['train'] = spread(batch / t[:, i])
        rows[k]['train_speedup'] = spread(t[:, 0] / t[:, i])
    return list(rows.values())


def print_students(rows, size):
    "The student table, with speed ratios against the first row (the default ResNet-18 student)."
    base = rows[0]
    print(f"\nstudents at {size}x{size} (batch 1 latency, batch 4 training), median (IQR); speed x the {base['model']} student")
    print(f"{'student':24} {'params M':>8} {'GMACs':>6} {'compiled ms':>18} {'eager ms':>18} {'bf16 eager ms':>18} "
          f"{'bf16 x fp32 eager':>20} {'train img/s':>18} | {'compiled speed':>20} {'train speed':>20}")
    for r in rows:
        print(f"{r['model']:24} {r['params'] / 1e6:8.2f} {r['macs'] / 1e9:6.2f} {fmt_spread(r['infer'][0], 1e3):>18} "
              f"{fmt_spread(r['infer'][1], 1e3):>18} {fmt_spread(r['bf16'], 1e3):>18} "
              f"{fmt_spread(r['bf16_speedup'], digits=2, unit='x'):>20} {fmt_spread(r['train'], digits=2):>18} | "
              f"{fmt_spread(r['infer_speedup'], digits=2, unit='x'):>20} {fmt_spread(r['train_speedup'], digits=2, unit='x'):>20}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='the separable pairs only (the targets), and the student table')
    p.add_argument('--rounds', type=int, default=15, help='alternation rounds per measurement (median and IQR over them)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--isa', choices=tuple(ISA_CAPS), default='native',
                   help='cap the instructions PyTorch, oneDNN and MKL use (applied before PyTorch loads)')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--students-only', action='store_true', help='only the student table')
    which.add_argument('--no-students', action='store_true', help='only the pairs against smp')
    p.add_argument('--student-size', type=int, default=256, help='input side of the student table (the ISIC CPU students run at 96)')
    a = p.parse_args(argv)
    if a.rounds < 3: p.error(f'--rounds is {a.rounds}; a median and a spread need at least 3')
    if a.threads: torch.set_num_threads(a.threads)
    pairs = [('resnet18', True), ('resnet101', True), ('mobilenet_v3_large', True)]
    if not a.quick: pairs += [('resnet18', False), ('resnet101', False)]
    print(f'CPU: {cpu_description()}')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; inference batch 1, training batch 4; {a.rounds} rounds')
    if not a.students_only:
        rows = []
        for backbone, sep in pairs:
            rows.append(bench_pair(backbone, sep, a.rounds))
            print(f'  done {rows[-1]["model"]}', flush=True)
        print_table(rows)
    if not a.no_students: print_students(bench_students(a.rounds, a.student_size), a.student_size)


if __name__ == '__main__': main()
