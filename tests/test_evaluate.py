"""Tests of the evaluation chapter: prediction, scoring at the original resolution, the comparison
report, the predictions file for the viewer, and the skinkd_evaluate command."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from skinkd.schema import ModelConfig
from skinkd.synthetic import make_synthetic
from skinkd.data import discover
from skinkd.cache import build_cache
from skinkd.cache import IMAGENET_MEAN, IMAGENET_STD
from skinkd.infer import predict
from skinkd.cli import evaluate_main
from skinkd.compare import paired_comparison, wilcoxon_p
from skinkd.evaluate import EvaluationError, evaluate_checkpoint, evaluate_checkpoints, score_model
from skinkd.models import DeepLabV3Plus
from skinkd.checkpoints import save_checkpoint
from skinkd.overlays import load_predictions
from skinkd.viewer import MaskViewer

from conftest import with_trained_like_batchnorm

SIZE = 32
MEAN, STD = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A small synthetic ISIC set, its cached test split and three tiny checkpoints (teacher, raw, distilled)."
    tmp = tmp_path_factory.mktemp('eval')
    root = make_synthetic(tmp / 'data', n=12, size=40, seed=0)
    cache = build_cache([s for s in discover(root) if s.split == 'test'], tmp / 'cache', size=SIZE)
    torch.manual_seed(0)
    ckpts = [save_checkpoint(tmp / f'{mode}.pt', DeepLabV3Plus(bb), ModelConfig(backbone=bb), role, extra={'mode': mode})
             for mode, role, bb in (('teacher', 'teacher', 'resnet34'), ('raw', 'student', 'resnet18'), ('distill', 'student', 'resnet18'))]
    return dict(tmp=tmp, root=root, cache=cache, ckpts=ckpts)


class Threshold(torch.nn.Module):
    "A fixed 'model': lesion where the image is darker than its mean (normalised input)."
    def forward(self, x):
        g = x.mean(1, keepdim=True)
        return (g.mean((2, 3), keepdim=True) - g) * 20


def test_predict_and_tta_shapes(setup):
    cache = setup['cache']
    p = predict(Threshold(), cache, [0, 1], batch_size=1)
    assert p.shape == (2, 1, SIZE, SIZE) and 0 <= p.min() and p.max() <= 1
    assert torch.allclose(predict(Threshold(), cache, [0, 1], tta=True), p, atol=1e-6)  # flip-symmetric model


def trained_like_checkpoint(path, cache):
    "A student checkpoint with trained-like BatchNorm statistics and a confident head that splits `cache` into lesion and skin."
    torch.manual_seed(1)
    model = with_trained_like_batchnorm(DeepLabV3Plus('resnet18'))
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    x = (torch.from_numpy(np.array(cache.images)).permute(0, 3, 1, 2) / 255 - MEAN) / STD
    with torch.no_grad(): model.classifier.bias -= model.eval()(x).median()
    return save_checkpoint(path, model, ModelConfig(), 'student')


def test_compiled_evaluation_matches_eager(setup, tmp_path):
    "eval.compile (Inductor, frozen weights) predicts what the eager model predicts, the last short batch included."
    cache = build_cache(discover(setup['root']), tmp_path / 'cache', size=SIZE)  # every split: 12 images
    path = trained_like_checkpoint(tmp_path / 'student.pt', cache)
    assert len(cache) % 5 != 0  # a short last batch: a second input shape, compiled separately
    eager, compiled = (evaluate_checkpoint(path, cache, range(len(cache)), batch_size=5, latency_runs=1, compile=c)
                       for c in (False, True))
    assert 0.2 < eager.masks.mean() < 0.8  # a real mix of lesion and skin, not a constant mask
    assert (compiled.masks != eager.masks).mean() < 1e-3  # float rounding may flip a pixel sitting on the threshold
    np.testing.assert_allclose(compiled.per_image['dice'], eager.per_image['dice'], atol=1e-2)


def test_scoring_uses_the_original_resolution(setup):
    cache = setup['cache']
    idx = list(range(len(cache)))
    # a perfect working-size prediction: the cached masks themselves as probabilities
    probs = torch.from_numpy(np.asarray(cache.masks, np.float32))[:, None]
    work = score_model(probs, cache, idx, original_resolution=False)
    assert np.allclose(work['dice'], 1.0)
    orig = score_model(probs, cache, idx, original_resolution=True)
    # restored to the original (non-square, larger) size, resampling costs a little: close to but below 1
    assert all(tuple(cache.orig_hw[i]) != (SIZE, SIZE) for i in idx)
    assert 0.8 < orig['dice'].min() and orig['dice'].mean() < 1.0


def test_paired_statistics():
    rng = np.random.default_rng(1)
    raw = rng.uniform(0.5, 0.9, 30)
    res = paired_comparison({'dice': raw + 0.02}, {'dice': raw})['dice']
    assert res['mean_diff'] == pytest.approx(0.02) and res['ci_low'] == pytest.approx(0.02) and res['n_better'] == 30
    assert res['p_wilcoxon'] < 1e-5
    assert wilcoxon_p(np.zeros(5)) == 1.0 and np.isnan(wilcoxon_p(np.array([])))


@pytest.fixture(scope='module')
def evaluation(setup):
    "The three checkpoints evaluated once into tmp/report."
    return evaluate_checkpoints(setup['ckpts'], setup['cache'], setup['tmp'] / 'report', latency_runs=1, gallery_k=2)


def test_report_files_and_numbers(setup, evaluation):
    out, ev = setup['tmp'] / 'report', evaluation
    assert sorted(p.name for p in out.iterdir()) == ['boxplots.png', 'metrics.json', 'per_image.csv', 'predictions.npz',
                                                     'report.md', 'worst_cases.png']
    report = (out / 'report.md').read_text()
    for text in ('| teacher | resnet34 |', '| raw | resnet18 |', '| distilled | resnet18 |', 'raw / teacher',
                 'distilled / teacher', 'Wilcoxon p', '![worst cases](worst_cases.png)'):
        assert text in report, text
    m = json.loads((out / 'metrics.json').read_text())
    raw = ev.result('raw')
    assert m['models']['raw']['dice'] == pytest.approx(raw.per_image['dice'].mean())
    assert m['models']['teacher']['params'] > m['models']['raw']['params'] == m['models']['distilled']['params']
    d = ev.result('distilled').per_image['dice'] - raw.per_image['dice']
    assert m['paired_distilled_vs_raw']['dice']['mean_diff'] == pytest.approx(d.mean())
    rows = (out / 'per_image.csv').read_text().splitlines()
    assert rows[0].startswith('id,teacher/dice,') and len(rows) == 1 + len(setup['cache'])


def test_predictions_file_feeds_the_viewer(setup, evaluation):
    out, ev = setup['tmp'] / 'report', evaluation
    p = load_predictions(out)
    assert p['ids'] == list(setup['cache'].ids) and set(p['preds']) == {'teacher', 'raw', 'distilled'}
    assert np.array_equal(p['preds']['raw'], ev.result('raw').masks) and np.array_equal(p['truth'], np.asarray(setup['cache'].masks))
    v = MaskViewer.from_run(out)
    v.sort_by.value = 'distilled/dice'
    assert v.current == int(np.argmin(ev.result('distilled').per_image['dice']))


def test_no_checkpoints_is_a_user_error(setup):
    with pytest.raises(EvaluationError, match='no checkpoints'):
        evaluate_checkpoints([], setup['cache'], setup['tmp'] / 'none')


def test_cli(setup, capsys):
    tmp = setup['tmp']
    out = tmp / 'cli'
    evaluate_main(['--weights', *map(str, setup['ckpts'][1:]), '--data', str(setup['root']), '--out', str(out), '--latency-runs', '1',
          '--set', f'data.cache_dir={tmp}/cli_cache', '--set', f'data.image_size={SIZE}', '--set', 'eval.tta=true'])
    assert '| distilled | resnet18 |' in capsys.readouterr().out
    assert 'flip TTA on' in (out / 'report.md').read_text() and (out / 'config.yaml').is_file()


def test_cli_errors_are_one_line(setup):
    r = subprocess.run([sys.executable, '-c', 'from skinkd.cli import evaluate_main; evaluate_main()', '--weights', 'missing.pt'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'checkpoint missing.pt not found' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('shift, teacher_val, effect, first', [
    (+0.015, 0.90, 'helped', 'distillation helped: +1.'),
    (0.0, 0.90, 'no effect', 'no detectable effect of distillation:'),
    (-0.015, 0.90, 'hurt', 'distillation hurt: -1.'),
    (0.0, 0.84, 'no effect', 'the teacher is not better than the raw student on validation (Dice 0.840 vs 0.860)'),
])
def test_verdict_on_constructed_per_image_differences(shift, teacher_val, effect, first):
    from skinkd.compare import dice_verdict
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.6, 0.9, (3, 60))
    distilled = raw + shift + rng.normal(0, 0.01, (3, 60))
    v = dice_verdict(distilled - raw, teacher_val=teacher_val, raw_val=0.86)
    assert v.effect == effect and v.lines()[0].startswith(first)
    assert v.lines()[-1].endswith('(95% CI ' + f'{100 * v.ci[0]:+.1f} to {100 * v.ci[1]:+.1f}; 3 seeds, 180 paired images)')
    assert (v.ci[0] > 0) == (effect == 'helped') and (v.ci[1] < 0) == (effect == 'hurt')


def test_verdict_bootstrap_keeps_the_seeds_of_an_image_together():
    "Three identical seeds carry the information of one: the interval must not shrink as if they were independent."
    from skinkd.compare import dice_verdict
    d = np.random.default_rng(4).normal(0.005, 0.03, 80)
    one, three = dice_verdict(d), dice_verdict(np.stack([d, d, d]))
    assert three.ci == pytest.approx(one.ci) and three.n_seeds == 3 and three.n_images == 80


def test_report_opens_with_the_verdict(setup, evaluation):
    report = (setup['tmp'] / 'report' / 'report.md').read_text().splitlines()
    assert report[0] == '# Evaluation report' and report[2] == f'**{evaluation.verdict.line()}**'
    m = json.loads((setup['tmp'] / 'report' / 'metrics.json').read_text())
    assert m['verdict']['lines'] == evaluation.verdict.lines() and m['verdict']['n_seeds'] == 1


def _checkpoint_at(path, size):
    "An untrained student checkpoint that records a working size of `size` px, as best.pt files do."
    torch.manual_seed(0)
    pre = dict(image_size=size, mirror_pad=True, mask_resize='nearest', normalize=True)
    return save_checkpoint(path, DeepLabV3Plus('resnet18'), ModelConfig(), 'student', preprocessing=pre)


def test_evaluation_scores_at_the_checkpoints_own_size(setup, tmp_path):
    "A 48-px checkpoint evaluated without a config scores at 48 px; a config that asks for 32 px is honoured with one warning."
    ck = _checkpoint_at(tmp_path / 'm48.pt', 48)
    run = lambda *extra: subprocess.run(['skinkd_evaluate', '--weights', str(ck), '--data', str(setup['root']), '--latency-runs', '1',
                                         '--set', f'data.cache_dir={tmp_path}/cache', *extra], capture_output=True, text=True, timeout=600)
    r = run('--out', str(tmp_path / 'own'))
    assert r.returncode == 0, r.stderr
    assert 'working size 48 px' in (tmp_path / 'own' / 'report.md').read_text() and 'warning' not in r.stderr
    r = run('--out', str(tmp_path / 'asked'), '--set', 'data.image_size=32')
    assert r.returncode == 0, r.stderr
    assert 'working size 32 px' in (tmp_path / 'asked' / 'report.md').read_text()
    warnings = [l for l in r.stderr.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'trained with data.image_size=48' in warnings[0] and 'data.image_size=32' in warnings[0]


def test_checkpoints_trained_at_different_sizes_are_refused_together(setup, tmp_path):
    a, b = _checkpoint_at(tmp_path / 'a.pt', 48), _checkpoint_at(tmp_path / 'b.pt', 64)
    r = subprocess.run(['skinkd_evaluate', '--weights', str(a), str(b), '--data', str(setup['root']), '--out', str(tmp_path / 'o')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'evaluate them in separate runs' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'o').exists()


def test_split_all_scores_every_pair_of_a_folder_without_a_split(tmp_path):
    "A generic images/ + masks/ folder (no official split): --split all scores all of it, with no split file."
    from PIL import Image
    from skinkd.synthetic import synth_image
    for d in ('images', 'masks'): (tmp_path / 'ext' / d).mkdir(parents=True)
    for i in range(7):
        im, m = synth_image(np.random.default_rng(i), 40, 48)
        Image.fromarray(im).save(tmp_path / 'ext' / 'images' / f'case{i}.png')
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / 'ext' / 'masks' / f'case{i}_mask.png')
    ck = _checkpoint_at(tmp_path / 'm.pt', 32)
    r = subprocess.run(['skinkd_evaluate', '--weights', str(ck), '--data', str(tmp_path / 'ext'), '--split', 'all', '--latency-runs', '1',
                        '--set', f'data.cache_dir={tmp_path}/cache', '--out', str(tmp_path / 'rep')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'rep' / 'metrics.json').read_text())
    assert m['models']['m']['n_images'] == 7
    rows = (tmp_path / 'rep' / 'per_image.csv').read_text().splitlines()[1:]
    assert sorted(r.split(',')[0] for r in rows) == [f'case{i}' for i in range(7)]
