"""The front of distilled students: test Dice against CPU latency and parameters, from `skinkd_experiment` folders.

Each `--runs NAME=FOLDER` is one experiment (3 seeds x raw and distilled, the same teacher and data for all), made with
    skinkd_experiment --config configs/isic2018_cpu.yaml --teacher_weights T --set student.backbone=... --out FOLDER
For every student the script reads the per-image test Dice of its seeds (`per_image.csv`), and reports
  - the distilled and raw students' Dice (mean over seeds) with a 95% bootstrap CI over test images (seeds of an image
    kept together), and distilled - raw;
  - distilled Dice against the first student's (the default), paired on the same images, with its CI;
  - the distilled students' best validation Dice (mean over seeds): the number to choose a student by;
  - parameters, MACs and batch-1 CPU latency (compiled and eager: `benchmarks/models.py`'s student measurement, median
    and IQR over alternated rounds) at the students' working size and at 256 px.
It prints a markdown table and draws the front (`--plot`): Dice against compiled latency and against parameters.

Usage: python benchmarks/front.py --runs "ResNet-18=runs/r18" "ResNet-18 separable=runs/r18sep" ... [--plot front.png]
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from skinkd.export import cpu_description
from skinkd.compare import bootstrap_ci


def per_image_dice(run: Path, variant: str) -> tuple[list[str], np.ndarray]:
    "(image ids, (seeds, images) test Dice of `variant` ('raw', 'distill'; 'teacher': one row)) from per_image.csv."
    try:
        with open(run / 'per_image.csv') as f: rows = list(csv.DictReader(f))
    except OSError as e: sys.exit(f'cannot read {run}/per_image.csv ({e.strerror}); is {run} a finished skinkd_experiment folder?')
    cols = sorted(k for k in (rows[0] if rows else {})
                  if k == f'{variant}/dice' or (k.endswith(f'/{variant}/dice') and k.startswith('seed')))
    if not cols: sys.exit(f'{run}/per_image.csv has no {variant} rows; is {run} a finished skinkd_experiment folder?')
    return [r['id'] for r in rows], np.array([[float(r[c]) for r in rows] for c in cols])


def student_arch(run: Path) -> tuple[str, bool, int]:
    "(encoder, separable, working size) of the students of an experiment folder, from its config.yaml."
    cfg = yaml.safe_load(open(run / 'config.yaml'))
    return cfg['student']['backbone'], bool(cfg['student'].get('aspp_separable', False)), int(cfg['data']['image_size'])


def mean_ci(d: np.ndarray) -> tuple[float, float, float]:
    "Mean and 95% bootstrap CI over images of a (seeds, images) array."
    return (float(d.mean()), *bootstrap_ci(d))


def front_rows(runs: dict[str, Path]) -> list[dict]:
    "One row per student: its architecture and the Dice statistics of its experiment folder."
    rows, base = [], None
    for name, run in runs.items():
        (ids, distilled), (_, raw) = per_image_dice(run, 'distill'), per_image_dice(run, 'raw')
        base = (ids, distilled) if base is None else base
        if ids != base[0]: sys.exit(f'{run} was tested on other images than {rows[0]["run"]}: not the same test split')
        backbone, separable, size = student_arch(run)
        models = json.load(open(run / 'experiment.json'))['models']
        val = [m['best_val_dice'] for k, m in models.items() if k.endswith('/distill')]
        rows.append(dict(name=name, run=str(run), teacher=models['teacher']['dice'], val=float(np.mean(val)), backbone=backbone, separable=separable, size=size, seeds=distilled.shape[0],
                         distilled=mean_ci(distilled), raw=mean_ci(raw), gain=mean_ci(distilled - raw),
                         vs_default=mean_ci(distilled.mean(0) - base[1].mean(0))))
    return rows


def add_speed(rows: list[dict], rounds: int, sizes: tuple[int, ...]):
    "Parameters, MACs and latency of every student architecture, measured alternated in one process per size."
    from models import bench_students, label  # benchmarks/models.py
    for size in sizes:
        measured = {r['model']: r for r in bench_students(rounds, size)}
        for row in rows:
            m = measured[label(row['backbone'], row['separable'])]
            row.update(params=m['params'], **{f'macs_{size}': m['macs'], f'compiled_{size}': m['infer'][0], f'eager_{size}': m['infer'][1]})


def pts(x): return f'{100 * x:+.1f}'


def markdown(rows: list[dict], sizes) -> str:
    "The front as a markdown table."
    head = (['student', 'params M'] + [f'GMACs at {s}' for s in sizes] + [f'compiled ms at {s}' for s in sizes] +
            ['distilled val Dice', 'distilled test Dice (95% CI)', 'raw test Dice', 'distilled - raw', f"vs {rows[0]['name']}"])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        d, g, v = r['distilled'], r['gain'], r['vs_default']
        cells = ([r['name'], f"{r['params'] / 1e6:.2f}"] + [f"{r[f'macs_{s}'] / 1e9:.2f}" for s in sizes] +
                 [f"{1e3 * r[f'compiled_{s}'][0]:.1f} ({1e3 * r[f'compiled_{s}'][1]:.1f}-{1e3 * r[f'compiled_{s}'][2]:.1f})" for s in sizes] +
                 [f"{r['val']:.4f}", f'{d[0]:.4f} ({d[1]:.4f}-{d[2]:.4f})', f"{r['raw'][0]:.4f}", f'{pts(g[0])} ({pts(g[1])} to {pts(g[2])})',
                  '–' if r is rows[0] else f'{pts(v[0])} ({pts(v[1])} to {pts(v[2])})'])
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(rows: list[dict], size: int, path: Path, title: str):
    "Two panels: distilled (filled) and raw (open) test Dice with 95% CIs against compiled latency and against parameters."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, xlabel in ((axes[0], f'compiled_{size}', f'CPU latency, batch 1 at {size} px, compiled (ms)'),
                            (axes[1], 'params', 'parameters (millions)')):
        for i, r in enumerate(rows):
            x = 1e3 * r[key][0] if key != 'params' else r['params'] / 1e6
            colour = f'C{i}'
            for variant, face in (('distilled', colour), ('raw', 'none')):
                m, lo, hi = r[variant]
                ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt='o', color=colour, mfc=face, ms=8, capsize=3,
                            label=f"{r['name']} ({variant})")
            ax.annotate(r['name'], (x, r['distilled'][0]), textcoords='offset points', xytext=(6, 6), fontsize=8)
        for t in sorted({r['teacher'] for r in rows}):
            ax.axhline(t, color='grey', ls='--', lw=1); ax.annotate(f'teacher {t:.3f}', (0.01, t), xycoords=('axes fraction', 'data'),
                                                                    textcoords='offset points', xytext=(0, 3), fontsize=8, color='grey')
        ax.set_xlabel(xlabel); ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test Dice (mean of {rows[0]['seeds']} seeds, 95% CI)")
    axes[1].legend(fontsize=7, loc='lower right')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(); path.parent.mkdir(parents=True, exist_ok=True); fig.savefig(path, dpi=110)
    print(f'wrote {path}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', nargs='+', required=True, metavar='NAME=FOLDER', help='finished skinkd_experiment folders, the default student first')
    p.add_argument('--rounds', type=int, default=15, help='alternation rounds of the latency measurement')
    p.add_argument('--sizes', type=int, nargs='+', default=None, help='latency input sizes (default: the working size and 256)')
    p.add_argument('--plot', type=Path, default=None, help='write the front figure here (PNG)')
    a = p.parse_args(argv)
    bad = [r for r in a.runs if '=' not in r]
    if bad: p.error(f'--runs {bad[0]!r}: write NAME=FOLDER, e.g. "ResNet-18=runs/isic2018"')
    runs = dict(r.split('=', 1) for r in a.runs)
    rows = front_rows({k: Path(v) for k, v in runs.items()})
    sizes = tuple(a.sizes or dict.fromkeys([rows[0]['size'], 256]))
    print(f'CPU: {cpu_description()}', flush=True)
    add_speed(rows, a.rounds, sizes)
    print(markdown(rows, sizes))
    if a.plot: plot(rows, sizes[0], a.plot, f'Students distilled from one teacher: test Dice ({rows[0]["seeds"]} seeds) against CPU cost; '
                                                f'latency on {cpu_description().split(";")[0]}')


if __name__ == '__main__': main()
