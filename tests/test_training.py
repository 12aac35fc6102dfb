"""Training end to end: the CLIs of every mode, the frozen teacher, bad input, exact resume after a real
kill, a real torchrun launch, and the smoke pipeline through papermill."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skinkd.config import SMOKE_OVERRIDES, load_config, resolve_paths
from skinkd.checkpoints import load_checkpoint

from conftest import REPO

ENV = {**os.environ, 'SKINKD_PROGRESS': '0', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def data_args(tmp_path_factory):
    """--set overrides for a tiny synthetic dataset (generated once) and its cache."""
    d = tmp_path_factory.mktemp('data')
    sets = [*SMOKE_OVERRIDES, f'data.root={d / "synthetic"}', f'data.cache_dir={d / "cache"}', 'data.synthetic_n=24',
            'data.image_size=48', 'teacher.backbone=resnet18', 'train.epochs=2']
    args = [a for s in sets for a in ('--set', s)]
    run(['skinkd_synth', '--out', str(d / 'synthetic'), '--n', '24', '--size', '48', '--seed', '1'])
    return ['--config', str(REPO / 'configs' / 'demo.yaml'), *args]


def run(cmd, check=True, **kw):
    """Run a command with the test environment; fail with its output when `check` and it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f'{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
    return p


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def teacher(data_args, tmp_path_factory):
    """A teacher trained by the CLI, for the distillation tests."""
    out = tmp_path_factory.mktemp('teacher')
    p = run(['skinkd_train_teacher', *data_args, '--backbone', 'resnet34', '--out', str(out)])
    return out, last_json(p.stdout)


def test_teacher_cli_writes_a_complete_run_folder(teacher):
    out, summary = teacher
    assert summary['epochs'] == 2 and 0 <= summary['best_val_dice'] <= 1
    ck = load_checkpoint(out / 'checkpoints' / 'best.pt')
    assert ck['role'] == 'teacher' and ck['model_config']['backbone'] == 'resnet34' and ck['extra']['mode'] == 'teacher'
    rows = (out / 'metrics.csv').read_text().strip().splitlines()
    assert rows[0].startswith('epoch,') and 'val_dice' in rows[0] and len(rows) == 3
    assert (out / 'training_curves.png').stat().st_size > 1000
    best, last = ((out / 'checkpoints' / f).stat().st_size for f in ('best.pt', 'last.pt'))
    assert best < last / 2  # AdamW's two moments live only in last.pt
    cfg = load_config(out / 'config.yaml')
    assert cfg.teacher.backbone == 'resnet34' and cfg.output.run_dir == str(out)


def test_distill_raw_and_test_modes(data_args, teacher, tmp_path):
    teacher_dir, _ = teacher
    tw = teacher_dir / 'checkpoints' / 'best.pt'
    before = tw.read_bytes()
    p = run([sys.executable, '-m', 'skinkd.distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw),
             '--out', str(tmp_path / 'distill')])
    assert last_json(p.stdout)['mode'] == 'distill'
    ck = load_checkpoint(tmp_path / 'distill' / 'checkpoints' / 'last.pt')
    assert ck['role'] == 'student' and ck['extra']['mode'] == 'distill'
    header = (tmp_path / 'distill' / 'metrics.csv').read_text().splitlines()[0]
    assert 'train_hint_aspp' in header and 'train_logit_logits' in header and 'train_seg' in header
    assert tw.read_bytes() == before  # the teacher's checkpoint is never touched

    run(['skinkd_distill', '--mode', 'raw', *data_args, '--out', str(tmp_path / 'raw')])
    raw = load_checkpoint(tmp_path / 'raw' / 'checkpoints' / 'last.pt')
    assert raw['extra']['mode'] == 'raw' and 'train_hint_aspp' not in (tmp_path / 'raw' / 'metrics.csv').read_text()

    p = run(['skinkd_distill', '--mode', 'test', *data_args, '--out', str(tmp_path / 'distill')])
    summary = last_json(p.stdout)
    record = json.loads((tmp_path / 'distill' / 'metrics.json').read_text())
    assert set(record) == {'models', 'paired_distilled_vs_raw', 'verdict'}  # the layout skinkd_evaluate writes
    (metrics,) = record['models'].values()
    for key in ('dice', 'jaccard', 'thresholded_jaccard', 'sensitivity', 'specificity', 'accuracy', 'hd95', 'hd95_misses',
                'failure_rate', 'n_images'):
        assert key in metrics and key in summary
    per_image = (tmp_path / 'distill' / 'per_image.csv').read_text().strip().splitlines()
    assert len(per_image) == metrics['n_images'] + 1 and metrics['n_images'] > 0
    assert load_config(tmp_path / 'distill' / 'test_config.yaml').output.run_dir == str(tmp_path / 'distill')
    assert load_config(tmp_path / 'distill' / 'config.yaml').train.epochs == 2  # the training record is kept
    # the teacher that taught and the student that was tested are weights-only best.pt files
    assert 'optimizer' not in torch.load(tw, weights_only=True)
    assert 'optimizer' not in torch.load(tmp_path / 'distill' / 'checkpoints' / 'best.pt', weights_only=True)


def test_teacher_stays_frozen_during_distillation(data_args, teacher, tmp_path):
    from skinkd.distill import train_student
    from skinkd.learner import to_device
    teacher_dir, _ = teacher
    overrides = [a for a in data_args[2:] if a != '--set']
    cfg = resolve_paths(load_config(REPO / 'configs' / 'demo.yaml', overrides, {'output.run_dir': str(tmp_path / 'run')}))
    learner = train_student(cfg, 'distill', teacher_dir / 'checkpoints' / 'best.pt')
    t = learner.task.teacher
    snapshot = {k: v.clone() for k, v in t.state_dict().items()}
    assert not t.training and all(not p.requires_grad and p.grad is None for p in t.parameters())
    learner.cfg.train.epochs = 3; learner.fit()   # one more epoch, watching the teacher
    assert all(torch.equal(snapshot[k], v) for k, v in t.state_dict().items())
    batch = to_device(next(iter(learner.loaders['train'])), learner.device)
    loss, parts = learner.task.loss(learner.model, batch)
    loss.backward()
    assert {'seg', 'hint_aspp', 'hint_decoder', 'logit_logits'} <= set(parts)
    assert all(p.grad is not None for p in learner.model.parameters())          # gradients reach the student...
    assert all(p.grad is not None for p in learner.task.kd.parameters())        # ...and the adapters...
    assert all(p.grad is None for p in t.parameters())                          # ...never the teacher


@pytest.mark.parametrize('args, message', [
    (['--mode', 'distill'], 'needs --teacher_weights PATH'),
    (['--mode', 'distill', '--teacher_weights', 'STUDENT'], 'is a student checkpoint, not a teacher'),
    (['--mode', 'distill', '--teacher_weights', 'MISSING'], 'MISSING'),
    (['--mode', 'test', '--student_weights', 'MISSING'], 'no checkpoint at'),
    (['--mode', 'raw', '--set', 'train.epoch=1'], "did you mean 'epochs'?"),
])
def test_bad_cli_input_fails_before_training_with_one_line(data_args, tmp_path, teacher, args, message):
    student = tmp_path / 'student.pt'
    if 'STUDENT' in args:
        from skinkd.models import DeepLabV3Plus
        from skinkd.checkpoints import save_checkpoint
        from skinkd.schema import ModelConfig
        save_checkpoint(student, DeepLabV3Plus('resnet18'), ModelConfig(), 'student')
    args = [str(student) if a == 'STUDENT' else str(tmp_path / 'missing.pt') if a == 'MISSING' else a for a in args]
    p = run(['skinkd_distill', *args, *data_args, '--out', str(tmp_path / 'run')], check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert message.replace('MISSING', str(tmp_path / 'missing.pt')) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_distilled_student_refuses_another_recipe_than_its_baseline(data_args, teacher, tmp_path):
    teacher_dir, _ = teacher   # its run folder's config.yaml has exactly the students' recipe of data_args
    tw = str(teacher_dir / 'checkpoints' / 'best.pt')
    p = run(['skinkd_distill', '--mode', 'distill', *data_args, '--set', 'train.lr=0.002', '--teacher_weights', tw,
             '--baseline', str(teacher_dir), '--out', str(tmp_path / 'run')], check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert 'the raw and distilled students must train under one recipe' in p.stderr and 'train.lr (0.002 vs 0.001)' in p.stderr
    assert not (tmp_path / 'run').exists()


def test_unknown_flag_is_refused():
    p = run(['skinkd_distill', '--mode', 'raw', '--epochs', '3'], check=False)
    assert p.returncode == 2 and 'unrecognized arguments: --epochs 3' in p.stderr
    p = run(['skinkd_train_teacher', '--backbone', 'vgg16'], check=False)
    assert p.returncode == 2 and "invalid choice: 'vgg16'" in p.stderr


def weights(path):
    return load_checkpoint(path)['model']


def _kill_in_epoch_2_and_resume(base: list[str], tmp_path: Path):
    "Train `base` straight and, in another folder, kill it with SIGKILL inside epoch 2 and resume: the weights must agree."
    run([*base, '--out', str(tmp_path / 'straight')])
    proc = subprocess.Popen([*base, '--out', str(tmp_path / 'killed')], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / 'killed' / 'checkpoints' / 'last.pt'
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)                       # well inside epoch 2 (an epoch takes seconds)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert load_checkpoint(last)['epoch'] == 1          # the previous checkpoint is intact and loadable
    run([*base, '--out', str(tmp_path / 'killed'), '--set', 'train.resume=true'])
    a, b = weights(tmp_path / 'straight' / 'checkpoints' / 'last.pt'), weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hist = (tmp_path / 'killed' / 'metrics.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in hist[1:]] == ['1', '2', '3']


def test_resume_after_kill_matches_uninterrupted_run(data_args, tmp_path):
    _kill_in_epoch_2_and_resume(['skinkd_distill', '--mode', 'raw', *data_args, '--set', 'train.deterministic=true',
                                 '--set', 'train.epochs=3', '--set', 'data.num_workers=1', '--set', 'train.batch_size=2'], tmp_path)


def test_resume_after_kill_is_exact_with_unlabeled_images(data_args, teacher, tmp_path):
    "Distillation with half the masks: both loaders (real workers) resume where the killed run would have been."
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    _kill_in_epoch_2_and_resume(['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw),
                                 '--set', 'train.deterministic=true', '--set', 'train.epochs=3', '--set', 'data.num_workers=1',
                                 '--set', 'train.batch_size=2', '--set', 'data.labeled_fraction=0.5'], tmp_path)
    a, b = (tmp_path / d / 'labels.csv' for d in ('straight', 'killed'))
    assert a.read_text() == b.read_text() and ',0\n' in a.read_text()   # the same deterministic choice of masks


def test_torchrun_two_cpu_processes(data_args, tmp_path):
    out = tmp_path / 'ddp'
    p = run(['torchrun', '--standalone', '--nproc_per_node=2', '-m', 'skinkd.distill', '--mode', 'raw', *data_args,
             '--set', 'data.num_workers=0', '--set', 'train.sync_bn=true', '--out', str(out)], timeout=600)
    assert 'SyncBatchNorm needs GPUs' in p.stderr                       # sync_bn is refused on CPU, with a warning
    assert p.stdout.count('"mode": "raw"') == 1                         # rank 0 alone reports...
    assert p.stdout.count('raw epoch 2/2') == 1                         # ...and logs
    ck = load_checkpoint(out / 'checkpoints' / 'last.pt')
    assert ck['epoch'] == 2 and ck['extra']['mode'] == 'raw' and ck['extra']['world_size'] == 2
    assert not any(k.startswith('module.') for k in ck['model'])       # saved unwrapped from DDP
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 2 and all(math.isfinite(float(r['train_loss'])) for r in rows)   # every epoch trained
    assert 0 < float(rows[-1]['val_dice']) <= 1
    val_root = Path(next(a.split('=', 1)[1] for a in reversed(data_args) if a.startswith('data.root=')))
    n_val = len(list((val_root / 'ISIC2018_Task1-2_Validation_Input').glob('*.jpg')))
    assert float(rows[-1]['val_n_images']) == n_val        # shards are disjoint: every image scored once


def test_smoke_pipeline_through_papermill(tmp_path):
    out = tmp_path / 'pipe'
    p = run(['skinkd_pipeline', '--config', str(REPO / 'configs' / 'demo.yaml'), '--out', str(out), '--smoke'],
            cwd=tmp_path, timeout=1200)
    console = p.stdout + p.stderr
    for alarm in ('error', 'Traceback', 'KeyboardInterrupt', 'without encryption', 'Executing Cell', '0.0000 ± 0.0000'):
        assert alarm.lower() not in console.lower(), f'{alarm!r} in the console of a successful run:\n{console}'
    assert 'hint_decoder' not in console.split('== 08_distill-distill')[0]  # raw mode shows no KD terms
    assert 'teacher epoch 2/2' in console and 'raw epoch 2/2' in console  # the cells' own lines are echoed live
    assert f"== 07_train_teacher (stage 2 of 5): nbs/07_train_teacher.ipynb -> {out / 'teacher'}" in console  # where each stage runs
    assert next(l for l in console.splitlines() if l.startswith('teacher epoch 1/2')).endswith(' s)') and 'ETA' in console
    assert p.stdout.splitlines()[-1] == (f"viewer: skinkd_view {out / 'report'} (or nbs/10_viewer.ipynb in JupyterLab, "
                                         f"run_dir = '{out / 'report'}')") and 'finished in ' in p.stdout
    summary = json.loads((out / 'summary.json').read_text())
    assert {'teacher_val_dice', 'raw_val_dice', 'distill_val_dice', 'wall_seconds'} <= set(summary)
    names = sorted(x.name for x in (out / 'notebooks').iterdir())
    assert names == ['02_explore.ipynb', '07_train_teacher.ipynb', '08_distill-distill.ipynb', '08_distill-raw.ipynb', '09a_evaluate.ipynb']
    assert load_config(out / 'distill' / 'config.yaml').train.epochs == 2
    assert (out / 'report' / 'report.md').is_file()
    image_size = load_config(out / 'config.yaml').data.image_size
    for run_dir in ('teacher', 'raw', 'distill'):  # best.pt: weights and metadata; last.pt (resuming) is not kept
        assert sorted(f.name for f in (out / run_dir / 'checkpoints').iterdir()) == ['best.pt']
        best = load_checkpoint(out / run_dir / 'checkpoints' / 'best.pt')
        assert 'optimizer' not in best and best['preprocessing']['image_size'] == image_size
        assert best['extra']['mode'] == run_dir



def test_mobilenet_student_distils_from_a_resnet101_teacher(data_args, tmp_path):
    "The encoder seam end to end: a MobileNetV3-Large student learns from a ResNet-101 teacher through hint adapters."
    run(['skinkd_train_teacher', *data_args, '--backbone', 'resnet101', '--set', 'train.epochs=1', '--out', str(tmp_path / 't')])
    terms = '[{kind: hint, tap: layer3, weight: 1.0}, {kind: cwd, tap: layer2, weight: 1.0}, {kind: logit, tap: logits}]'
    run(['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tmp_path / 't' / 'checkpoints' / 'best.pt'),
         '--set', 'student.backbone=mobilenet_v3_large', '--set', f'distill.terms={terms}', '--out', str(tmp_path / 's')])
    ck = load_checkpoint(tmp_path / 's' / 'checkpoints' / 'last.pt')
    assert ck['model_config']['backbone'] == 'mobilenet_v3_large' and ck['extra']['mode'] == 'distill'
    adapters = {k: tuple(v.shape) for k, v in ck['extra']['extra_modules'].items() if k.endswith('adapter.0.weight')}
    assert adapters == {'terms.hint_layer3.adapter.0.weight': (1024, 112, 1, 1), 'terms.cwd_layer2.adapter.0.weight': (512, 40, 1, 1)}
    rows = list(csv.DictReader((tmp_path / 's' / 'metrics.csv').open()))
    assert rows and all(math.isfinite(float(rows[-1][f'train_{n}'])) and float(rows[-1][f'train_{n}']) > 0
                        for n in ('hint_layer3', 'cwd_layer2', 'logit_logits'))


# --- images without masks -----------------------------------------------------------------------------------------

def test_masks_fraction_split_is_deterministic_disjoint_and_shared(data_args, teacher, tmp_path):
    "The teacher, the raw and the distilled student record the same masked/unmasked choice; only distill uses the rest."
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    frac = ['--set', 'data.labeled_fraction=0.4', '--set', 'train.epochs=1']
    run(['skinkd_train_teacher', *data_args, *frac, '--out', str(tmp_path / 't')])
    run(['skinkd_distill', '--mode', 'raw', *data_args, *frac, '--out', str(tmp_path / 'r')])
    run(['skinkd_distill', '--mode', 'distill', *data_args, *frac, '--teacher_weights', str(tw), '--out', str(tmp_path / 'd')])
    tables = [list(csv.DictReader((tmp_path / d / 'labels.csv').open())) for d in 'trd']
    assert tables[0] == tables[1] == tables[2]
    masked = [r['id'] for r in tables[0] if r['masked'] == '1']
    unmasked = [r['id'] for r in tables[0] if r['masked'] == '0']
    assert not set(masked) & set(unmasked) and len(masked) == round(0.4 * (len(masked) + len(unmasked)))
    root = Path(next(a.split('=', 1)[1] for a in reversed(data_args) if a.startswith('data.root=')))
    assert sorted(masked + unmasked) == sorted(p.stem for p in (root / 'ISIC2018_Task1-2_Training_Input').glob('*.jpg'))


def test_a_term_that_needs_masks_is_refused_for_unlabeled_images(data_args, teacher, tmp_path):
    tw = teacher[0] / 'checkpoints' / 'best.pt'
    p = run(['skinkd_distill', '--mode', 'distill', *data_args, '--teacher_weights', str(tw), '--set', 'data.labeled_fraction=0.5',
             '--set', 'distill.terms=[{kind: logit, tap: logits, boundary_weight: 2.0}]', '--out', str(tmp_path / 'd')], check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "distill.terms[0] (logit on logits) reads the masks" in p.stderr and 'boundary_weight: 0' in p.stderr
    assert not (tmp_path / 'd' / 'checkpoints').exists()


def test_mixed_batches_hold_the_ratio_over_an_epoch_with_workers(tmp_path):
    "Real DataLoader workers: every batch has its share of unlabelled images, each image is drawn about equally often."
    from collections import Counter
    from skinkd.config import load_config
    from skinkd.synthetic import make_synthetic
    from skinkd.loaders import MixedLoader, get_data
    make_synthetic(tmp_path / 'syn', 60, 48, seed=2)   # 42 training images: 21 masked, 21 without
    cfg = resolve_paths(load_config(params={'data.root': str(tmp_path / 'syn'), 'data.cache_dir': str(tmp_path / 'cache'),
                                            'data.image_size': 48, 'data.num_workers': 2, 'train.batch_size': 4,
                                            'data.labeled_fraction': 0.5, 'distill.unlabeled_ratio': 1.5}))
    data = get_data(cfg, unlabeled=True)
    loader = data.loaders['train']
    assert isinstance(loader, MixedLoader)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(data.samples['train']) // 4
    assert all(len(b['image']) == 4 and len(b['unlabeled']) == 6 and 'mask' in b for b in batches)
    drawn = Counter(int(i) for b in batches for i in b['unlabeled_index'])
    assert sum(drawn.values()) == 6 * len(batches) and set(drawn) == set(range(len(data.unlabeled)))
    assert max(drawn.values()) - min(drawn.values()) <= 1          # whole permutations in turn
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))['unlabeled'], batches[0]['unlabeled'])  # workers draw the same augmentations again


def test_training_commands_use_configs_config_yaml_of_the_working_folder(tmp_path, data_args):
    "As the original scripts did: no --config means ./configs/config.yaml when it exists (said in one line), else the defaults."
    import yaml
    sets = dict(s.split('=', 1) for s in data_args[3::2])
    conf = {}
    for key, value in sets.items():
        *parents, last = key.split('.')
        node = conf
        for k in parents: node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    conf['train']['epochs'] = 1
    (tmp_path / 'configs').mkdir(); (tmp_path / 'configs' / 'config.yaml').write_text(yaml.safe_dump(conf))
    p = run(['skinkd_train_teacher', '--backbone', 'resnet', '--out', 'teacher'], cwd=tmp_path)
    assert p.stdout.splitlines()[0] == 'config: configs/config.yaml (found in the working folder; --config chooses another)'
    assert load_config(tmp_path / 'teacher' / 'config.yaml').train.epochs == 1 and last_json(p.stdout)['epochs'] == 1
    empty = tmp_path / 'empty'; empty.mkdir()
    p = run(['skinkd_distill', '--mode', 'raw', '--out', 'raw'], check=False, cwd=empty)
    assert p.stdout.splitlines()[0].startswith('config: the built-in defaults (no --config')
    assert p.returncode == 1 and 'data folder' in p.stderr and 'Traceback' not in p.stderr  # the defaults' data/synthetic is not there


def test_a_resumed_run_always_ends_with_a_best_checkpoint(data_args, tmp_path):
    "What a kill -9 while best.pt is written leaves (no best.pt, its temporary file): the resumed run rewrites best.pt and cleans up."
    out = tmp_path / 'run'
    args = ['skinkd_distill', '--mode', 'raw', *data_args, '--set', 'data.num_workers=0', '--out', str(out)]
    run([*args, '--set', 'train.epochs=2'])
    ck = out / 'checkpoints'
    recorded = load_checkpoint(ck / 'best.pt')['metrics']['dice']
    (ck / 'best.pt').unlink(); (ck / '.best.pt.k1ll3d.tmp').write_bytes(b'half a checkpoint')
    p = run([*args, '--set', 'train.epochs=3', '--set', 'train.resume=true', '--set', 'train.lr=1e-9'])  # epoch 3 cannot beat the record
    assert 'was missing or not the recorded best; rewritten from epoch 2' in p.stdout + p.stderr
    assert (ck / 'best.pt').is_file() and not list(ck.glob('.*.tmp'))
    best = load_checkpoint(ck / 'best.pt')
    assert best['epoch'] in (2, 3) and best['metrics']['dice'] <= recorded + 1e-9
    p = run(['skinkd_distill', '--mode', 'test', *data_args, '--out', str(out)])  # and --mode test finds it
    assert p.returncode == 0


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_training_in_one_line_and_the_run_resumes(data_args, tmp_path, sig):
    "A real signal to a real training process: exit 128+signal, one line saying how to continue, no traceback; resume works."
    out = tmp_path / 'run'
    args = ['skinkd_distill', '--mode', 'raw', *data_args, '--set', 'data.num_workers=0', '--out', str(out)]
    p = subprocess.Popen([*args, '--set', 'train.epochs=40'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell (CI) ignores SIGINT for its children
    for line in p.stdout:
        if line.startswith('raw epoch 1/40'): break
    time.sleep(0.5); p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, (p.returncode, stderr)
    assert 'Traceback' not in stderr and f'stopped by {signal.Signals(sig).name}' in stderr and '--set train.resume=true' in stderr
    assert len([l for l in stderr.splitlines() if l.strip()]) == 1
    done = load_checkpoint(out / 'checkpoints' / 'last.pt')['epoch']
    assert done >= 1
    run([*args, '--set', f'train.epochs={done + 1}', '--set', 'train.resume=true'])
    assert load_checkpoint(out / 'checkpoints' / 'last.pt')['epoch'] == done + 1


def test_the_pipeline_never_touches_a_folder_it_refuses(tmp_path):
    "An existing folder with the user's own config.yaml: refused in one line, the file byte for byte as it was."
    out = tmp_path / 'mine'; out.mkdir(); (out / 'config.yaml').write_text('# my notes\n')
    p = run(['skinkd_pipeline', '--config', str(REPO / 'configs' / 'demo.yaml'), '--out', str(out), '--smoke'], check=False, cwd=tmp_path)
    assert p.returncode == 1 and 'is not empty' in p.stderr and 'Traceback' not in p.stderr
    assert (out / 'config.yaml').read_text() == '# my notes\n' and sorted(out.iterdir()) == [out / 'config.yaml']


def test_sigterm_to_the_whole_job_saves_mid_epoch_and_the_resumed_run_is_exact(data_args, tmp_path):
    """A scheduler's SIGTERM to every process of the job (main and DataLoader worker) inside epoch 2: saved after the step,
    resumed at the next batch, and the same weights and logs as an uninterrupted run."""
    base = ['skinkd_distill', '--mode', 'raw', *data_args, '--set', 'train.deterministic=true', '--set', 'train.epochs=3',
            '--set', 'data.num_workers=1', '--set', 'train.batch_size=2', '--set', 'data.image_size=96']
    run([*base, '--out', str(tmp_path / 'straight')])
    out = tmp_path / 'stopped'
    p = subprocess.Popen([*base, '--out', str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)  # its own process group, as a batch job's
    for line in p.stdout:
        if line.startswith('raw epoch 1/3'): break
    time.sleep(0.3); os.killpg(p.pid, signal.SIGTERM)  # the worker too, as schedulers do
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and 'stopped by SIGTERM; saved at batch ' in lines[0] and ' of epoch 2 in ' in lines[0], stderr
    ck = load_checkpoint(out / 'checkpoints' / 'last.pt')
    assert ck['epoch'] == 1 and ck['extra']['position']['batch'] > 0
    resumed = run([*base, '--out', str(out), '--set', 'train.resume=true'])
    assert f"at batch {ck['extra']['position']['batch']} of epoch 2" in resumed.stdout + resumed.stderr
    a, b = weights(tmp_path / 'straight' / 'checkpoints' / 'last.pt'), weights(out / 'checkpoints' / 'last.pt')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [r.split(',')[:2] for r in (d / 'metrics.csv').read_text().splitlines()]  # epoch, train loss
    assert rows(out) == rows(tmp_path / 'straight')


def test_a_run_logged_to_a_file_writes_plain_lines(data_args, tmp_path):
    "Output to a file, not a terminal: a plain line per tenth of an epoch and per epoch, no redrawn bars."
    log = tmp_path / 'run.log'
    env = {k: v for k, v in ENV.items() if k != 'SKINKD_PROGRESS'}   # progress on, as a user's nohup run has it
    with open(log, 'w') as f:
        p = subprocess.run(['skinkd_distill', '--mode', 'raw', *data_args, '--set', 'train.batch_size=2',
                            '--out', str(tmp_path / 'r')], stdout=f, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    assert p.returncode == 0 and '\r' not in text and '\x1b' not in text, text
    lines = text.splitlines()
    first = next(i for i, s in enumerate(lines) if s.startswith('precision: '))
    assert all(s.startswith(('generating ', 'building ')) for s in lines[:first]), lines[:first]  # one line per build
    lines = lines[first:]
    progress = [re.fullmatch(r'raw epoch (\d)/2: batch (\d+)/(\d+) \(\d+%\), [\d.]+ batches/s, epoch ETA .+', s)
                for s in lines]
    batches = int(next(m for m in progress if m)[3])
    epochs = [s for s in lines if re.fullmatch(r'raw epoch \d/2: loss .* val dice .*', s)]
    assert sum(m is not None for m in progress) == 2 * (batches - 1) and len(epochs) == 2
    assert len(lines) == 1 + 2 * (batches - 1) + 2 + 1 and lines[0].startswith('precision: ')  # and the JSON summary
