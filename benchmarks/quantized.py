"""INT8 students for CPU deployment: Dice drop on the test split, file size, and latency against fp32 eager and compiled.

For each checkpoint (`--weights`, e.g. the distilled students of a `skinkd_experiment` folder) and the data of `--config`:
  1. exports fp32 ONNX and INT8 ONNX (`skinkd.export.export_model(..., 'onnx-int8')`: ONNX Runtime's static
     quantizer, QDQ, per-channel int8 weights, uint8 activations), calibrated on `--calib_count` images spread evenly
     over the config's training split (read from its cache, at the working size the config gives);
  2. scores fp32 (PyTorch eager, BatchNorm folded) and INT8 (ONNX Runtime) on the test split at each image's original
     resolution, as `skinkd_evaluate` does, and reports the paired Dice drop with a 95% bootstrap CI, the largest drop
     on one image, and the agreement of the two models' masks;
  3. times batch-1 inference at the working size and at 256 px (median and IQR over rounds; each round gives every
     model a warm-up call and 5 timed calls, so that one runtime's spinning threads do not slow the other's first
     call): fp32 eager, fp32 compiled (Inductor, frozen weights), fp32 ONNX Runtime, INT8 ONNX Runtime.
INT8 latency is skipped, with the reason, on a CPU without int8 dot-product instructions (AVX2 at least on x86).

Usage: python benchmarks/quantized.py --config configs/isic2018_cpu.yaml --weights runs/isic2018/seed0/distill/checkpoints/best.pt
       [--set data.cache_dir=...] [--calib_count 64] [--rounds 20]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from skinkd.config import load_config, resolve_paths
from skinkd.loaders import get_data
from skinkd.checkpoints import load_model
from skinkd.infer import (to_input, predict, trained_preprocessing, compile_for_inference,
                          prepare_for_inference)
from skinkd.export import OnnxModel, spread_pick, cpu_description, export_model, int8_instructions, masks_dice
from skinkd.compare import bootstrap_ci
from skinkd.evaluate import binary_masks, score_model

from models import alternate_blocks, fmt_spread, infer_step, spread


def calibration_from_cache(cache, count: int, normalize: bool) -> np.ndarray:
    "`count` training images spread evenly over the cached training split, as model inputs."
    return to_input(cache.images[spread_pick(list(range(len(cache.images))), count)], normalize).numpy()


def test_dice(model, cache, normalize: bool, e) -> np.ndarray:
    "Per-image test Dice of `model` at the original resolution, and its working-size logits' probabilities."
    probs = predict(model, cache, None, False, 8, normalize)
    return score_model(probs, cache, range(len(cache.images)), e.threshold, e.original_resolution)['dice'], probs


def bench_checkpoint(path: Path, data, cfg, calib_count: int, rounds: int, sizes, tmp: Path) -> dict:
    "Size, test Dice and latency of one checkpoint in fp32 and INT8."
    model, ckpt = load_model(path)
    normalize = bool(trained_preprocessing(ckpt).get('augment.normalize', True))
    calib = calibration_from_cache(data.caches['train'], calib_count, normalize)
    example = torch.from_numpy(calib[:1])
    f32 = export_model(model, 'onnx', tmp / 'fp32.onnx', example)
    f8 = export_model(model, 'onnx-int8', tmp / 'int8.onnx', example, calibration=calib)
    eager, int8 = prepare_for_inference(model), OnnxModel(f8)
    test = data.caches['test']
    d32, p32 = test_dice(eager, test, normalize, cfg.eval)
    d8, p8 = test_dice(int8, test, normalize, cfg.eval)
    drop = d32 - d8
    row = dict(name=str(path), params=sum(p.numel() for p in model.parameters()), mb32=f32.stat().st_size / 1e6,
               mb8=f8.stat().st_size / 1e6, dice32=float(d32.mean()), dice8=float(d8.mean()), drop=(float(drop.mean()), *bootstrap_ci(drop)),
               worst=float(drop.max()), agree=masks_dice(binary_masks(p8, cfg.eval.threshold) > 0, binary_masks(p32, cfg.eval.threshold) > 0),
               n=len(d32))
    compiled, fp32_ort = compile_for_inference(eager), OnnxModel(f32)
    for size in sizes:
        x = torch.nn.functional.interpolate(example, size=(size, size), mode='bilinear')  # a real training image
        fns = {'fp32 eager': lambda: infer_step(eager, x), 'fp32 compiled': lambda: infer_step(compiled, x),
               'fp32 ONNX Runtime': lambda: infer_step(fp32_ort, x)}
        if int8_instructions(): fns['INT8 ONNX Runtime'] = lambda: infer_step(int8, x)
        infer_step(compiled, x)  # compiles for this size
        t = alternate_blocks(list(fns.values()), rounds)
        row[f'latency_{size}'] = {k: spread(t[:, j]) for j, k in enumerate(fns)}
        row[f'speedup_{size}'] = {k: spread(t[:, 0] / t[:, j]) for j, k in enumerate(fns)}
    return row


def print_rows(rows, sizes):
    "One markdown table per checkpoint: the fp32 and INT8 models side by side."
    for r in rows:
        d = r['drop']
        print(f"\n{r['name']}: {r['params'] / 1e6:.2f} M parameters; test Dice fp32 {r['dice32']:.4f}, INT8 {r['dice8']:.4f}: drop "
              f"{100 * d[0]:+.2f} points (95% CI {100 * d[1]:+.2f} to {100 * d[2]:+.2f}; worst image {100 * r['worst']:+.1f}) on {r['n']} "
              f"images; masks agree (Dice) {r['agree']:.4f}")
        head = ['model', 'file MB', 'test Dice'] + [f'latency ms at {s} (median, IQR)' for s in sizes] + [f'speed x eager at {s}' for s in sizes]
        print('| ' + ' | '.join(head) + ' |\n|' + '---|' * len(head))
        for k in r[f'latency_{sizes[0]}']:
            mb = r['mb8'] if k.startswith('INT8') else r['mb32']
            dice = r['dice8'] if k.startswith('INT8') else r['dice32']
            cells = [k, f'{mb:.1f}', f'{dice:.4f}'] + [fmt_spread(r[f'latency_{s}'][k], 1e3) for s in sizes] + \
                    [fmt_spread(r[f'speedup_{s}'][k], digits=2, unit='x') for s in sizes]
            print('| ' + ' | '.join(cells) + ' |')
        if not int8_instructions(): print('INT8 latency skipped: this CPU has no int8 dot-product instructions (x86 needs AVX2 at least)')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True, help='the config the checkpoints were trained with (its data and splits)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE', help='config override (repeatable)')
    p.add_argument('--weights', nargs='+', required=True, type=Path, help='student checkpoints')
    p.add_argument('--calib_count', type=int, default=64, help='training images that calibrate the INT8 model')
    p.add_argument('--rounds', type=int, default=10, help='alternation rounds of the latency measurement')
    p.add_argument('--sizes', type=int, nargs='+', default=None, help='latency input sizes (default: the working size and 256)')
    a = p.parse_args(argv)
    cfg = resolve_paths(load_config(a.config, a.overrides))
    print(f'CPU: {cpu_description()}; int8 instructions: {int8_instructions() or "none"}; torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads', flush=True)
    data = get_data(cfg)
    sizes = tuple(a.sizes or dict.fromkeys([cfg.data.image_size, 256]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_checkpoint(w, data, cfg, a.calib_count, a.rounds, sizes, Path(tmp)) for w in a.weights]
    print_rows(rows, sizes)


if __name__ == '__main__': main()
