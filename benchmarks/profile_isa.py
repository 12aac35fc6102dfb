"""Which CPU kernels skinkd's students run, and where their time goes, under this CPU's instructions or an AVX2 cap.

For a student and its smp counterpart (same encoder, output stride 16, separable ASPP/decoder), profiles
  - compiled inference at batch 1 (skinkd: prepare_for_inference(compile=True); smp: eager eval, as users run it),
  - a training step at batch 4 (SGD on BCE; skinkd channels_last, as `fit` runs it),
and prints, per phase:
  - oneDNN's primitives by implementation (from oneDNN's verbose log: e.g. `brg_conv_fwd:avx512_core_amx`,
    `jit_dw:avx2`, `gemm:jit`), with calls and total milliseconds, and the layouts they ran in;
  - PyTorch's operators by self time (torch.profiler): the work outside oneDNN (native GEMM, depthwise fallbacks,
    BatchNorm, Inductor's generated kernels).
Run it twice to see what differs between instruction sets:
    python benchmarks/profile_isa.py                # this CPU's best instructions
    python benchmarks/profile_isa.py --isa avx2     # what an AVX2-only CPU runs (see benchmarks/isa.py)
"""
import argparse
import collections
import os
import sys
import tempfile

from isa import ISA_CAPS, cap_isa

if __name__ == '__main__':
    cap_isa(sys.argv)
    os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # the profiler's own start/stop chatter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from skinkd.models import DeepLabV3Plus  # noqa: E402
from skinkd.checkpoints import prepare_for_training  # noqa: E402
from skinkd.infer import prepare_for_inference  # noqa: E402
from skinkd.export import cpu_description  # noqa: E402

from models import smp_model  # noqa: E402


class CapturedStdout:
    "Collect what C++ libraries write to file descriptor 1 (oneDNN's verbose log) while the block runs."
    def __enter__(self):
        sys.stdout.flush()
        self.file, self.saved = tempfile.TemporaryFile(mode='w+'), os.dup(1)
        os.dup2(self.file.fileno(), 1)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush(); os.dup2(self.saved, 1); os.close(self.saved)
        self.file.seek(0); self.text = self.file.read(); self.file.close()


def onednn_summary(log: str) -> list[tuple]:
    "(primitive, implementation, direction, calls, total ms, layouts) per oneDNN implementation in a verbose log, slowest first."
    acc = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
    for line in log.splitlines():
        f = line.split(',')
        if len(f) < 11 or not line.startswith('onednn_verbose') or 'exec' not in f[:4]: continue
        i = f.index('exec')
        prim, impl, direction = f[i + 2], f[i + 3], f[i + 4]
        layout = ' '.join(':'.join(x.split(':')[i] for i in (0, 1, 4)) for x in f[i + 5].split() if x.startswith(('src', 'wei')))
        a = acc[(prim, impl, direction)]; a[0] += 1; a[1] += float(f[-1]); a[2][layout] += 1
    return sorted(((*k, n, ms, c.most_common(1)[0][0]) for k, (n, ms, c) in acc.items()), key=lambda r: -r[4])


def profile_phase(run, steps: int):
    "oneDNN implementations and PyTorch operators of `steps` calls of `run` (after two warm-up calls)."
    run(); run()
    with CapturedStdout() as cap, torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps): run()
    return onednn_summary(cap.text), prof.key_averages()


def print_phase(title: str, onednn: list, ops, top: int, steps: int):
    "oneDNN's kernels of one call, then PyTorch's operators by self time per call (averaged over `steps` calls)."
    print(f'\n--- {title}')
    total = sum(r[4] for r in onednn)
    print(f"oneDNN, one call: {total:.1f} ms in {sum(r[3] for r in onednn)} primitive executions")
    for prim, impl, direction, n, ms, layout in onednn[:top]:
        print(f'  {ms:8.2f} ms {n:4d}x  {prim:12} {impl:34} {direction:20} {layout}')
    print(f'PyTorch operators by self CPU time, per call (mean of {steps}):')
    rows = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]
    for e in rows: print(f'  {e.self_cpu_time_total / 1e3 / steps:8.1f} ms {e.count / steps:6.0f}x  {e.key}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbone', default='resnet18', help='student encoder (resnet18, mobilenet_v3_large)')
    p.add_argument('--standard', action='store_true', help="skinkd's standard ASPP/decoder instead of separable (no smp twin)")
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--steps', type=int, default=5, help='profiled calls per phase')
    p.add_argument('--top', type=int, default=12, help='rows per list')
    p.add_argument('--isa', choices=tuple(ISA_CAPS), default='native', help='cap the instructions (see benchmarks/isa.py)')
    a = p.parse_args(argv)
    print(f'CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads')
    torch.manual_seed(0)
    ours = DeepLabV3Plus(a.backbone, aspp_separable=not a.standard)
    models = {'skinkd': ours} if a.standard else {'skinkd': ours, 'smp': smp_model(a.backbone, True)}
    x1, xb = torch.randn(1, 3, a.size, a.size), torch.randn(4, 3, a.size, a.size)
    yb = (torch.rand(4, 1, a.size, a.size) > 0.5).float()
    for name, m in models.items():
        fast = prepare_for_inference(m, compile=True) if name == 'skinkd' else m.eval()
        def infer():
            with torch.inference_mode(): fast(x1)
        print_phase(f'{name} {a.backbone}: inference, batch 1, {a.size}px ({"compiled" if name == "skinkd" else "eager"})',
                    *profile_phase(infer, a.steps), a.top, a.steps)
        train = prepare_for_training(m.train()) if name == 'skinkd' else m.train()
        opt = torch.optim.SGD(train.parameters(), lr=1e-3, momentum=0.9)
        def step():
            opt.zero_grad(set_to_none=True); F.binary_cross_entropy_with_logits(train(xb), yb).backward(); opt.step()
        print_phase(f'{name} {a.backbone}: training step, batch 4, {a.size}px', *profile_phase(step, a.steps), a.top, a.steps)


if __name__ == '__main__': main()
