"""Following a run: TensorBoard event files read back with TensorBoard's own reader (one point per epoch, after a
resume too), the refusal without the extra, lean run folders, and TensorBoard itself in a real browser."""
import csv
import os
import signal
import subprocess
import sys

import pytest

from skinkd.config import load_config

from conftest import ARTIFACTS, browser_page, free_port, stop_server, tiny_sets, wait_http

ENV = {**os.environ, 'SKINKD_PROGRESS': '0', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
BOARD = 'output.tensorboard=true'


def run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)
    assert p.returncode == 0, f'{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}'
    return p


def read_board(folder):
    """TensorBoard's own reader on a run's tb/ folder, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(folder), size_guidance={'images': 0, 'scalars': 0}).Reload()


def history(run_dir) -> list[dict]:
    with open(run_dir / 'metrics.csv', newline='') as f: return list(csv.DictReader(f))


def sigterm_after_first_epoch(cmd: list[str]) -> int:
    """Run `cmd`, send SIGTERM once its first epoch is logged, and return its exit status (it saves and stops)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in p.stdout:
        if ' epoch 1/3: loss ' in line:
            p.send_signal(signal.SIGTERM)
            break
    p.stdout.read()
    return p.wait(timeout=300)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A teacher and a distilled student written with TensorBoard on; the student stopped by SIGTERM and resumed."""
    d = tmp_path_factory.mktemp('board')
    args = lambda *extra: tiny_sets(d / 'data', d / 'cache', BOARD, *extra)
    run(['skinkd_train_teacher', *args(), '--out', str(d / 'teacher')])
    student = ['skinkd_distill', '--mode', 'distill', *args('train.epochs=3', 'data.synthetic_n=60'),
               '--teacher_weights', str(d / 'teacher' / 'checkpoints' / 'best.pt'), '--out', str(d / 'distill')]
    stopped = sigterm_after_first_epoch(student)
    resumed = run([*student, '--set', 'train.resume=true'])
    return {'dir': d, 'stopped': stopped, 'resumed': resumed}


def test_every_scalar_has_one_point_per_epoch_after_a_resume_and_matches_the_history(runs):
    d = runs['dir']
    assert runs['stopped'] == 128 + signal.SIGTERM  # stopped in epoch 2 and saved, as a preemption would
    board, rows = read_board(d / 'distill' / 'tb'), history(d / 'distill')
    tags = set(board.Tags()['scalars'])
    assert {'train/loss', 'train/seg', 'train/hint_aspp', 'train/hint_decoder', 'train/logit_logits', 'val/dice',
            'val/jaccard', 'val/thresholded_jaccard', 'lr', 'time/step_seconds'} <= tags
    for tag in tags:
        assert [e.step for e in board.Scalars(tag)] == [1, 2, 3], tag  # no duplicate from the stopped session
    assert [round(e.value, 5) for e in board.Scalars('val/dice')] == [round(float(r['val_dice']), 5) for r in rows]
    logit_weight = next(t.weight for t in load_config(d / 'distill' / 'config.yaml').distill.terms if t.kind == 'logit')
    assert logit_weight == 4.0  # configs/demo.yaml's: each term is logged times its weight, as it adds to the loss
    assert [round(e.value, 5) for e in board.Scalars('train/logit_logits')] == \
        [round(logit_weight * float(r['train_logit_logits']), 5) for r in rows]
    assert [e.step for e in board.Images('val/outlines')] == [1, 2, 3]
    image = board.Images('val/outlines')[0]
    assert (image.width, image.height) == (4 * 48, 2 * 48)  # 8 validation images, 4 per row


def test_the_teacher_writes_its_own_curves_beside_the_students(runs):
    board = read_board(runs['dir'] / 'teacher' / 'tb')
    assert [e.step for e in board.Scalars('val/dice')] == [1, 2]
    assert not [t for t in board.Tags()['scalars'] if t.startswith('train/hint')]  # no distillation terms


def test_without_tensorboard_the_key_is_refused_in_one_line_before_anything_is_built(tmp_path):
    blocked = ("import sys; sys.modules['tensorboard'] = None; from skinkd.cli import distill_main; "
               "sys.argv[0] = 'skinkd_distill'; distill_main()")
    cmd = [sys.executable, '-c', blocked, '--mode', 'raw', *tiny_sets(tmp_path / 'data', tmp_path / 'cache', BOARD),
           '--out', str(tmp_path / 'run')]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].endswith("output.tensorboard is true but TensorBoard is not installed: "
                             "pip install 'skinkd[tensorboard]' (or set output.tensorboard: false)")
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists() and not (tmp_path / 'data').exists()


def test_keep_last_false_keeps_best_only_but_never_in_a_stopped_run(tmp_path):
    args = tiny_sets(tmp_path / 'data', tmp_path / 'cache', 'output.keep_last=false', 'train.epochs=3',
                     'data.synthetic_n=60')
    run(['skinkd_distill', '--mode', 'raw', *args, '--out', str(tmp_path / 'done')])
    assert sorted(p.name for p in (tmp_path / 'done' / 'checkpoints').iterdir()) == ['best.pt']
    cmd = ['skinkd_distill', '--mode', 'raw', *args, '--out', str(tmp_path / 'stopped')]
    assert sigterm_after_first_epoch(cmd) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / 'stopped' / 'checkpoints').iterdir()) == ['best.pt', 'last.pt']
    run([*cmd, '--set', 'train.resume=true'])  # the resume it was kept for; finished, it goes
    assert sorted(p.name for p in (tmp_path / 'stopped' / 'checkpoints').iterdir()) == ['best.pt']


@pytest.mark.timeout(170)
def test_tensorboard_shows_the_runs_in_a_real_browser(runs, tmp_path):
    port, log = free_port(), tmp_path / 'tensorboard.log'
    cmd = [sys.executable, '-m', 'tensorboard.main', '--logdir', str(runs['dir']), '--host', '127.0.0.1',
           '--port', str(port)]
    with open(log, 'wb') as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f'http://127.0.0.1:{port}'
        wait_http(f'{base}/data/runs', proc, log, what='TensorBoard')
        with browser_page(1400, 900) as (page, errors):
            page.goto(f'{base}/?darkMode=false#timeseries', wait_until='domcontentloaded')
            tags = page.get_by_role('combobox', name='Filter tags (regex)')
            tags.fill('val/(dice|outlines)')
            page.keyboard.press('Escape')
            for card in ('/dice', '/outlines'): page.get_by_text(card, exact=True).first.wait_for(timeout=30_000)
            for name in ('teacher/tb', 'distill/tb'): page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            page.locator('button[aria-label="Close side pane"]').click()  # the settings pane
            page.wait_for_timeout(1500)  # the charts draw after their cards appear
            page.screenshot(path=str(ARTIFACTS / 'tensorboard.png'))
        assert not errors, '\n'.join(errors)
    finally:
        stop_server(proc)
