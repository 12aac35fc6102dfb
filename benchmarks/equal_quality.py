"""Does bf16 training give the same models as fp32? Two `skinkd_experiment` folders, compared image by image.

    skinkd_experiment --config configs/isic2018_cpu.yaml --set train.amp=none --out runs/fp32
    skinkd_experiment --config configs/isic2018_cpu.yaml --set train.amp=auto --out runs/bf16   # on a CPU with bf16
    python benchmarks/equal_quality.py --runs fp32=runs/fp32 bf16=runs/bf16

Both experiments must share the data, the split and the seeds; each trains its own teacher. For the teacher, the raw
and the distilled student, the script reads the per-image test Dice (`per_image.csv`; students: every seed), and
reports each precision's mean, the paired difference (second minus first, in Dice points) with its 95% bootstrap CI
(resampling test images, all seeds of an image together, as `skinkd_experiment` does), whether it meets the bar
(|difference| <= 0.3 points and a CI that includes 0), and each run's best validation Dice and training minutes.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from front import per_image_dice  # benchmarks/front.py
from skinkd.compare import bootstrap_ci

MODELS = {'teacher': 'teacher', 'raw': 'raw student', 'distill': 'distilled student'}
BAR = 0.3  # Dice points


def aligned_dice(ref: Path, new: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, images) test Dice of `model` in both experiment folders, images in one order."""
    ids, x = per_image_dice(ref, model)
    other, y = per_image_dice(new, model)
    if sorted(other) != sorted(ids): sys.exit(f'{ref} and {new} were scored on different test images')
    if x.shape != y.shape: sys.exit(f'{model}: {ref} has {len(x)} seeds, {new} has {len(y)}')
    where = {i: k for k, i in enumerate(other)}
    return x, y[:, [where[i] for i in ids]]


def training(run: Path, model: str) -> tuple[list[float], list[float]]:
    """(best validation Dice, training minutes) of each run of `model` in an experiment folder (done.json files)."""
    folders = [run / 'teacher'] if model == 'teacher' else sorted(run.glob(f'seed*/{model}'))
    done = [json.loads((f / 'done.json').read_text()) for f in folders if (f / 'done.json').is_file()]
    return [d['best_val_dice'] for d in done], [d['train_seconds'] / 60 for d in done]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', nargs=2, required=True, metavar='NAME=FOLDER', help='the reference run first (fp32)')
    a = p.parse_args()
    (ref_name, ref), (new_name, new) = [(s.split('=', 1)[0], Path(s.split('=', 1)[1])) for s in a.runs]
    print(f'| model | seeds | {ref_name} test Dice | {new_name} test Dice | {new_name} − {ref_name} (points, 95% CI) '
          f'| bar met | best val Dice {ref_name} / {new_name} | training min {ref_name} / {new_name} |')
    print('|---|---|---|---|---|---|---|---|')
    for model, title in MODELS.items():
        x, y = aligned_dice(ref, new, model)
        d = 100 * (y - x)
        lo, hi = bootstrap_ci(d)
        met = abs(d.mean()) <= BAR and lo <= 0 <= hi
        (vx, tx), (vy, ty) = training(ref, model), training(new, model)
        print(f'| {title} | {len(x)} | {x.mean():.4f} | {y.mean():.4f} | {d.mean():+.2f} ({lo:+.2f} to {hi:+.2f}) '
              f"| {'yes' if met else 'no'} | {np.mean(vx):.4f} / {np.mean(vy):.4f} | {sum(tx):.1f} / {sum(ty):.1f} |")


if __name__ == '__main__':
    main()
