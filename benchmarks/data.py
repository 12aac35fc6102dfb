"""Data benchmarks: synthetic generation rate (one core) and a cache epoch versus decoding the JPEGs.

Usage: python benchmarks/data.py [--n 300] [--size 256] [--real ../shared/data/isic2018-512] [--real-n 300]
Numbers are rates and ratios measured in one run (machines are noisy); both sides read warm files.
"""
import os
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ.setdefault(_v, '1')  # one core

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skinkd.core import scratch_dir
from skinkd.synthetic import make_synthetic, _draw_synth
from skinkd.data import discover, load_pair
from skinkd.cache import build_cache, prepare_pair


def timed(fn, repeat=3):
    """Best wall time of `repeat` calls of `fn`."""
    best = float('inf')
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best


def synthetic_rates(n, size, work):
    """Images per second on one CPU (pinned): drawing only, and drawing + writing JPEG/PNG files (make_synthetic)."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        draw = timed(lambda: [_draw_synth(i, size, 0) for i in range(n)], 2)
        t0 = time.perf_counter(); make_synthetic(work / 'synthetic', n, size, seed=0); write = time.perf_counter() - t0
    finally: os.sched_setaffinity(0, cpus)
    return n / draw, n / write


def epoch_ratio(samples, size, cache_dir):
    """Seconds per epoch: memory-mapped cache read versus decode, and versus decode + pad + resize."""
    cache = build_cache(samples, cache_dir, size=size)
    def read_cache():
        for i in range(len(cache)): np.array(cache.images[i]); np.array(cache.masks[i])
    def decode():
        for s in samples: load_pair(s)
    def decode_prepare():
        for s in samples: prepare_pair(*load_pair(s), size)
    return timed(read_cache), timed(decode), timed(decode_prepare, 1)


def report(name, n, t_cache, t_decode, t_prep):
    print(f'{name}: {n} images; cache epoch {t_cache * 1e3:.1f} ms ({n / t_cache:.0f} img/s); '
          f'decode {t_decode:.2f} s ({n / t_decode:.0f} img/s) -> {t_decode / t_cache:.0f}x; '
          f'decode+pad+resize {t_prep:.2f} s -> {t_prep / t_cache:.0f}x')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=300); p.add_argument('--size', type=int, default=256)
    p.add_argument('--real', default=str(Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'isic2018-512'))
    p.add_argument('--real-n', type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    work = scratch_dir('skinkd_bench_')  # deleted when the benchmark exits
    draw, write = synthetic_rates(a.n, a.size, work)
    print(f'synthetic, {a.size} px, pinned to one CPU: {draw:.0f} images/s drawn, {write:.0f} images/s drawn and written (JPEG + PNG)')
    report(f'synthetic {a.size} px', a.n, *epoch_ratio(discover(work / 'synthetic'), a.size, work / 'cache'))
    if Path(a.real).is_dir():
        real = discover(a.real)[:a.real_n]
        report(f'{Path(a.real).name} (cache at {a.size} px)', len(real), *epoch_ratio(real, a.size, work / 'cache'))
    else: print(f'{a.real} not found: real-data comparison skipped')


if __name__ == '__main__': main()
