"""Cached soft labels against the live teacher, on real images: what building the cache costs, and how far a cached
map moved with its augmented image is from the live teacher's map of that augmented image.

    python benchmarks/soft_labels.py --config configs/isic2018_cpu.yaml --teacher T.pt [--draws 256]
                                     [--figure F.png] [--set KEY=VALUE ...]

For the training split of `--config` at its working size, in the precision `train.amp` resolves to on this machine:
  1. the soft-label cache built with one teacher pass and with flip TTA (3 views): seconds and images per second
     (a folder that already exists is reused: point data.cache_dir at an empty folder to time a build);
  2. for `--draws` augmented training images (fixed seeds), with all augmentations, without colour jitter, and
     without the affine transform: the mean absolute difference of the probabilities, the share of pixels whose
     thresholded masks disagree, the Dice between the two masks, and each one's Dice against the augmented mask
     (`skinkd.distill.soft_label_agreement`).
"""
import argparse
import time
from dataclasses import replace

from skinkd.config import load_config, resolve_paths
from skinkd.loaders import build_transforms, get_data
from skinkd.checkpoints import load_model
from skinkd.device import default_device, with_precision
from skinkd.export import cpu_description
from skinkd.runs import save_figure
from skinkd.soft_labels import build_soft_labels, freeze
from skinkd.distill import cached_against_live, cached_live_figure, soft_label_agreement


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True)
    p.add_argument('--teacher', required=True, help='teacher checkpoint (best.pt)')
    p.add_argument('--draws', type=int, default=256, help='augmented training images compared')
    p.add_argument('--figure', help='write the first draws as a figure (PNG)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    a = p.parse_args()
    cfg = resolve_paths(load_config(a.config, overrides=['data.num_workers=0', *a.overrides]))
    cfg = with_precision(replace(cfg, distill=replace(cfg.distill, soft_labels='cached')), default_device())[0]
    print(cpu_description(), f'| precision {cfg.train.amp}')
    data = get_data(cfg)
    ds, teacher = data.datasets['train'], freeze(load_model(a.teacher)[0])
    draws = [(i * 7 % len(ds), 5000 + i) for i in range(a.draws)]
    print('| cache | augmentation | build s | images/s | mean abs diff | masks disagree | Dice cached-live '
          '| Dice cached-truth | Dice live-truth |')
    print('|---|---|---|---|---|---|---|---|---|')
    for tta in (False, True):
        c = replace(cfg, distill=replace(cfg.distill, cache_tta=tta))
        t = time.perf_counter()
        ds.soft = build_soft_labels([a.teacher], data.samples['train'], data.caches['train'], c)
        build = time.perf_counter() - t
        for name, aug in [('all', cfg.augment), ('no jitter', replace(cfg.augment, jitter_p=0.0)),
                          ('no affine', replace(cfg.augment, affine_p=0.0))]:
            ds.transform = build_transforms(aug, True, cfg.data.image_size)
            maps = cached_against_live(teacher, ds, draws, cfg.train.amp)
            g = soft_label_agreement(maps)
            print(f"| {'flip TTA' if tta else 'one pass'} | {name} | {build:.1f} | {len(ds) / build:.0f} | "
                  f"{g['mean_abs_diff']:.3f} | {100 * g['masks_disagree']:.1f}% | {g['dice_cached_live']:.3f} | "
                  f"{g['dice_cached_truth']:.3f} | {g['dice_live_truth']:.3f} |", flush=True)
            if a.figure and tta and name == 'all': save_figure(cached_live_figure(maps), a.figure)


if __name__ == '__main__':
    main()
