"""Speed of skinkd's DeepLabV3+ against segmentation_models_pytorch (smp) on the CPU.

For the teacher (ResNet-101) and the student (ResNet-18), each with separable and standard ASPP, builds skinkd's
model and smp.DeepLabV3Plus with the same encoder, output stride 16 and ASPP style, and measures, alternating the
two models in the same process so that machine noise hits both alike:
  - parameters and MACs at 256x256 (torch.utils.flop_counter),
  - inference latency, batch 1, 256x256 (skinkd: prepare_for_inference(freeze=True) = BatchNorm folded, traced and
    frozen into oneDNN with pre-packed weights; its eager path, folded + channels_last, is shown too;
    smp: eager eval, as documented),
  - training throughput, batch 4, 256x256, SGD step on BCE (skinkd: channels_last, the train.channels_last default).
Ratios are skinkd speed / smp speed (> 1: skinkd faster). Targets (issue 4), checked on the separable rows, which
compare the same architecture: inference >= 1.3x, training >= 1.0x.
Times are the best of several alternated repetitions. Note: smp keeps separable convolutions after ASPP and in the
decoder even with decoder_aspp_separable=False, while skinkd's standard model has the paper's full 3x3 convolutions
there (about twice the MACs for ResNet-18), so only the separable rows compare the same amount of work.

Usage: python benchmarks/models.py [--quick] [--threads N]   (smp is a benchmark-only dependency)
"""
import argparse
import time

import torch
import torch.nn.functional as F

from skinkd.models import DeepLabV3Plus, aspp_rates, count_macs, count_params, prepare_for_inference, prepare_for_training


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
    frozen, eager, ref_eval = prepare_for_inference(ours, freeze=True), prepare_for_inference(ours), ref.eval()
    x1 = torch.randn(1, 3, size, size)
    with torch.inference_mode():  # relative to the logits' scale: random deep ResNets give logits in the hundreds
        ref_logits = eager(x1); diff = (frozen(x1) - ref_logits).abs().max() / ref_logits.abs().max().clamp(min=1)
    assert diff < 1e-4, f'frozen model differs from eager by {diff:.1e} (relative)'
    row['infer'] = alternate([lambda: infer_step(frozen, x1), lambda: infer_step(ref_eval, x1),
                              lambda: infer_step(eager, x1)], reps)
    del frozen, eager
    ours, ref = prepare_for_training(ours.train()), ref.train()
    xb, yb = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    oo, oa = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9), torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    row['train'] = alternate([lambda: train_step(ours, oo, xb, yb), lambda: train_step(ref, oa, xb, yb)], max(2, reps // 2))
    row['train'] = tuple(batch / t for t in row['train'])  # images per second
    return row


def print_table(rows):
    "The results as a text table with skinkd/smp ratios, then the target check on the separable rows."
    print(f"{'model':14} {'params M (skinkd/smp)':>22} {'GMACs (skinkd/smp)':>19} {'latency ms (frozen/smp)':>24} "
          f"{'speed x':>8} {'eager ms':>9} {'eager x':>8} {'train img/s (skinkd/smp)':>25} {'speed x':>8}")
    for r in rows:
        (pa, pb), (ma, mb), (ia, ib, ie), (ta, tb) = r['params'], r['macs'], r['infer'], r['train']
        print(f"{r['model']:14} {pa / 1e6:10.2f} / {pb / 1e6:6.2f}   {ma / 1e9:8.2f} / {mb / 1e9:6.2f}   "
              f"{ia * 1e3:12.1f} / {ib * 1e3:7.1f}   {ib / ia:7.2f}x {ie * 1e3:9.1f} {ib / ie:7.2f}x  "
              f"{ta:14.2f} / {tb:6.2f}   {ta / tb:7.2f}x")
    for r in (r for r in rows if r['model'].endswith('sep')):
        inf, tr = r['infer'][1] / r['infer'][0], r['train'][0] / r['train'][1]
        print(f"target {r['model']}: inference {inf:.2f}x >= 1.3x {'met' if inf >= 1.3 else 'NOT met'}; "
              f"training {tr:.2f}x >= 1.0x {'met' if tr >= 1.0 else 'NOT met'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='student (ResNet-18) rows only, fewer repetitions')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    pairs = [('resnet18', True), ('resnet18', False)] + ([] if a.quick else [('resnet101', True), ('resnet101', False)])
    reps = 5 if a.quick else 7
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 256x256; inference batch 1, training batch 4')
    rows = []
    for backbone, sep in pairs:
        rows.append(bench_pair(backbone, sep, reps if backbone == 'resnet18' else 3))
        print(f'  done {rows[-1]["model"]}', flush=True)
    print_table(rows)


if __name__ == '__main__': main()
