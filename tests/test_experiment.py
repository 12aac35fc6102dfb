"""The experiment runner end to end: the chapter through papermill on the smoke preset (with the ablation),
the skinkd_experiment command reusing that teacher, and its refusal of a folder holding another experiment."""
import json
import os
import subprocess

import papermill as pm
import pytest

from skinkd.config import load_config
from skinkd.synthetic import make_synthetic

from conftest import REPO

ENV = {**os.environ, 'SKINKD_PROGRESS': '0', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def chapter(tmp_path_factory):
    "nbs/12_experiment.ipynb executed by papermill: smoke preset, seeds 0 and 1, with the ablation."
    tmp = tmp_path_factory.mktemp('experiment')
    out = tmp / 'exp'
    params = dict(config_path=str(REPO / 'configs' / 'demo.yaml'), seeds=[0, 1], run_dir=str(out), ablation=True,
                  preset='smoke', project_root=str(tmp))
    assert set(params) <= set(pm.inspect_notebook(str(REPO / 'nbs' / '12_experiment.ipynb')))
    pm.execute_notebook(str(REPO / 'nbs' / '12_experiment.ipynb'), str(tmp / 'executed.ipynb'), parameters=params,
                        cwd=str(REPO / 'nbs'), kernel_name='python3', progress_bar=False)
    return out, tmp


def test_chapter_writes_the_experiment_record(chapter):
    out, _ = chapter
    record = json.loads((out / 'experiment.json').read_text())
    runs = [f'seed{s}/{v}' for s in (0, 1) for v in ('raw', 'distill', 'logit_only', 'hints_only')]
    assert sorted(record['models']) == sorted(['teacher', *runs])
    assert record['seeds'] == [0, 1] and set(record['pooled']) == {'distill', 'logit_only', 'hints_only'}
    v = record['verdict']
    assert v['effect'] in ('helped', 'no effect', 'hurt') and v['n_seeds'] == 2 and v['n_images'] == record['n_test_images'] > 0
    assert v['lines'][-1].endswith(f"2 seeds, {2 * record['n_test_images']} paired images)") and v['ci'][0] <= v['mean'] <= v['ci'][1]
    for name, m in record['models'].items():
        assert 0 <= m['dice'] <= 1 and m['epochs'] == 2 and m['train_seconds'] > 0, name
        assert (out / name / 'done.json').is_file() and (out / name / 'checkpoints' / 'best.pt').is_file()
    assert load_config(out / 'seed1' / 'raw' / 'config.yaml').train.seed == 1
    assert [t.kind for t in load_config(out / 'seed0' / 'logit_only' / 'config.yaml').distill.terms] == ['logit']
    report = (out / 'experiment.md').read_text().splitlines()
    assert report[0] == f"**{v['lines'][0]}**" and '# Experiment: does distillation pay?' in report
    assert (out / 'experiment.png').stat().st_size > 10_000
    assert len((out / 'per_image.csv').read_text().splitlines()) == record['n_test_images'] + 1


def test_cli_reuses_a_teacher_and_refuses_another_experiment_in_the_same_folder(chapter):
    out, tmp = chapter
    teacher = out / 'teacher' / 'checkpoints' / 'best.pt'
    make_synthetic(tmp / 'external', 6, 40, seed=9)   # another folder, never trained on, at another size
    cmd = ['skinkd_experiment', '--config', str(REPO / 'configs' / 'demo.yaml'), '--smoke', '--seeds', '3',
           '--teacher_weights', str(teacher), '--out', str(tmp / 'cli')]
    p = subprocess.run([*cmd, '--external', str(tmp / 'external')], capture_output=True, text=True, env=ENV, cwd=tmp)
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp / 'cli' / 'experiment.json').read_text())
    assert sorted(record['models']) == ['seed3/distill', 'seed3/raw', 'teacher'] and not (tmp / 'cli' / 'teacher').exists()
    assert record['models']['teacher']['checkpoint'] == str(teacher)
    assert record['verdict']['lines'][-1] in p.stdout and 'experiment.md' in p.stdout.splitlines()[-1]
    ext = record['external'][str(tmp / 'external')]
    assert ext['n_images'] == 6 and sorted(ext['dice']) == ['seed3/distill', 'seed3/raw', 'teacher']
    assert all(0 <= d <= 1 for d in ext['dice'].values()) and ext['verdict']['n_images'] == 6
    assert f"{tmp / 'external'}: {ext['verdict']['lines'][0]}" in p.stdout
    report = (tmp / 'cli' / 'experiment.md').read_text()
    assert f"## External folder `{tmp / 'external'}`" in report and 'All 6 image/mask pairs' in report
    bad = subprocess.run([*cmd, '--set', 'train.lr=0.5'], capture_output=True, text=True, env=ENV, cwd=tmp)
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert 'holds an experiment with another config (train.lr (0.001 vs 0.5))' in bad.stderr


def test_the_ham_recipe_runs_offline_on_a_synthetic_pool(tmp_path):
    "configs/isic2018_ham_cpu.yaml's path on synthetic data: a generated pool, cached soft labels, an external folder."
    make_synthetic(tmp_path / 'external', 5, 40, seed=4)
    cmd = ['skinkd_experiment', '--config', str(REPO / 'configs' / 'isic2018_ham_cpu.yaml'), '--smoke', '--seeds', '0',
           '--set', f'distill.unlabeled={tmp_path / "pool"}', '--set', 'distill.unlabeled_synthetic_n=12',
           '--set', f'data.cache_dir={tmp_path / "cache"}', '--external', str(tmp_path / 'external'),
           '--out', str(tmp_path / 'exp')]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / 'pool').glob('SYN_*.jpg'))) == 12 and not list((tmp_path / 'pool').glob('*.png'))
    assert 'logit_logits read them, and the teacher does not run while training' in p.stdout
    soft = [json.loads((f / 'meta.json').read_text()) for f in (tmp_path / 'cache').glob('soft-*')]
    assert sorted(len(m['ids']) for m in soft) == [12, 28] and all(m['tta'] for m in soft)   # pool and masked, flip TTA
    labels = (tmp_path / 'exp' / 'seed0' / 'distill' / 'labels.csv').read_text()
    assert labels.count(',0\n') == 12 and 'SYN_0000011,0' in labels   # the pool joined the distilled student's images
    record = json.loads((tmp_path / 'exp' / 'experiment.json').read_text())
    assert record['external'][str(tmp_path / 'external')]['n_images'] == 5
