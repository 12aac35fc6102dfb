"""Many runs on one machine: four runs started at once on one empty cache folder, a build stopped and killed with
SIGKILL while another run waits for it, a full checksum on demand, and a file system without locks."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skinkd.data import discover
from skinkd.cache import build_cache, verify_caches

from conftest import tiny_sets as sets

ENV = {**os.environ, 'SKINKD_PROGRESS': '0', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
SOAK_SECONDS = 300  # the bound on the four runs together (about 15 s on 2 cores)
def run(cmd: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=SOAK_SECONDS)
    assert p.returncode == 0, f'{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}'
    return p


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> dict[str, Path]:
    """A teacher (for the distillation) and a student (for the evaluation), trained on their own data and cache."""
    d = tmp_path_factory.mktemp('trained')
    setup = sets(d / 'data', d / 'cache')
    run(['skinkd_train_teacher', *setup, '--out', str(d / 'teacher')])
    run(['skinkd_distill', '--mode', 'raw', *setup, '--out', str(d / 'student')])
    return {'teacher': d / 'teacher' / 'checkpoints' / 'best.pt', 'student': d / 'student' / 'checkpoints' / 'best.pt'}


def jobs(trained: dict, root: Path, cache: Path, out: Path) -> dict[str, list[str]]:
    """Two raw students (two seeds), one distillation from cached soft labels and one evaluation."""
    return {
        'raw seed 0': ['skinkd_distill', '--mode', 'raw', *sets(root, cache, 'train.seed=0'), '--out', str(out / 'raw0')],
        'raw seed 1': ['skinkd_distill', '--mode', 'raw', *sets(root, cache, 'train.seed=1'), '--out', str(out / 'raw1')],
        'distill': ['skinkd_distill', '--mode', 'distill', *sets(root, cache, 'distill.soft_labels=cached'),
                    '--teacher_weights', str(trained['teacher']), '--out', str(out / 'distill')],
        'evaluate': ['skinkd_evaluate', *sets(root, cache), '--weights', str(trained['student']),
                     '--out', str(out / 'evaluate')]}


def results(name: str, out: Path) -> dict:
    """What a job produced that must not depend on who else ran: metrics (latency aside) and trained weights."""
    if name == 'evaluate':
        models = json.loads((out / 'evaluate' / 'metrics.json').read_text())['models']
        return {m: {k: v for k, v in s.items() if 'latency' not in k} for m, s in models.items()}
    folder = out / {'raw seed 0': 'raw0', 'raw seed 1': 'raw1', 'distill': 'distill'}[name]
    best = torch.load(folder / 'checkpoints' / 'best.pt', weights_only=True)
    history = [row.split(',') for row in (folder / 'metrics.csv').read_text().splitlines()]
    val = [[r[i] for i, h in enumerate(history[0]) if h.startswith('val_')] for r in history[1:]]
    return {'val': val, 'weights': {k: v.clone() for k, v in best['model'].items()}}


def same(a: dict, b: dict) -> bool:
    if 'weights' not in a: return a == b
    return a['val'] == b['val'] and all(torch.equal(a['weights'][k], b['weights'][k]) for k in a['weights'])


@pytest.mark.slow
def test_four_runs_started_at_once_on_one_empty_cache_build_each_folder_once_and_match_their_runs_alone(trained, tmp_path):
    alone = {}
    for name, cmd in jobs(trained, tmp_path / 'x', tmp_path / 'x', tmp_path / 'x').items():
        own = tmp_path / 'alone' / name.replace(' ', '-')
        run([c.replace(str(tmp_path / 'x'), str(own)) for c in cmd])
        alone[name] = results(name, own)
    shared, out = tmp_path / 'shared', tmp_path / 'together'
    t0 = time.monotonic()
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for name, cmd in jobs(trained, shared / 'data', shared / 'cache', out).items()}
    said = {name: p.communicate(timeout=SOAK_SECONDS) for name, p in procs.items()}
    print(f'four runs together: {time.monotonic() - t0:.0f} s')
    for name, p in procs.items():
        assert p.returncode == 0, f'{name} failed ({p.returncode}):\n{said[name][1]}'
    built = [line.rsplit(': ', 1)[1] for _, err in said.values() for line in err.splitlines()
             if line.startswith(('building ', 'generating '))]
    made = sorted(str(p) for p in (shared / 'cache').iterdir() if not p.name.startswith('.') and p.is_dir())
    assert sorted(built) == sorted([*made, str(shared / 'data')])  # every folder built, and each by one run only
    assert not [p for p in shared.rglob('.*.tmp-*')]  # no unfinished build left behind
    assert verify_caches(shared / 'cache')[1] == 0
    for name in procs:
        assert same(results(name, out), alone[name]), f'{name}: another result together than alone'


def _wait_for(predicate, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not (found := predicate()):
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.005)
    return found


@pytest.mark.slow
def test_a_build_killed_while_another_run_waits_is_taken_over_and_finished(tmp_path):
    root, cache = tmp_path / 'data', tmp_path / 'cache'
    run(['skinkd_synth', '--out', str(root), '--n', '60', '--size', '96', '--seed', '0'])
    cmd = ['skinkd_distill', '--mode', 'raw', *sets(root, cache, 'data.synthetic_n=60', 'data.image_size=96',
                                                    'train.epochs=1')]
    first = subprocess.Popen([*cmd, '--out', str(tmp_path / 'first')], env=ENV, stderr=subprocess.DEVNULL)
    unfinished = _wait_for(lambda: list(cache.glob('.*.tmp-*')), 'the first build')
    first.send_signal(signal.SIGSTOP)  # frozen mid-build, holding the lock
    second = subprocess.Popen([*cmd, '--out', str(tmp_path / 'second')], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    waiting = second.stderr.readline()
    assert waiting.startswith('waiting for the cache of ') and f': process {first.pid} on ' in waiting
    first.kill()
    first.wait()
    out, err = second.communicate(timeout=SOAK_SECONDS)
    assert second.returncode == 0, err
    took_over = [line for line in err.splitlines() if line.startswith('taking over the lock of ')]
    assert len(took_over) == 1 and f'from process {first.pid} on ' in took_over[0]
    assert not unfinished[0].exists() and not list(cache.glob('.*.tmp-*'))  # the dead build is gone
    assert verify_caches(cache)[1] == 0
    assert json.loads(out.strip().splitlines()[-1])['epochs'] == 1


def test_without_file_locks_the_build_says_so_in_one_line_and_goes_on(tmp_path, monkeypatch, capsys):
    from skinkd.synthetic import make_synthetic
    make_synthetic(tmp_path / 'data', 8, 32, seed=2)
    capsys.readouterr()
    def no_locks(f, op): raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(fcntl, 'flock', no_locks)  # as on a network mount without a lock daemon
    cache = build_cache(discover(tmp_path / 'data'), tmp_path / 'cache', size=32)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f'{tmp_path / "cache"} has no file locks; building the cache of 8 images at 32 px (data.cache_dir) '
                      'without one (runs sharing it may build it twice)')
    assert len(err) == 2 and err[1].startswith('building the cache of 8 images')
    assert len(cache) == 8 and verify_caches(tmp_path / 'cache')[1] == 0


def test_verify_cache_reads_every_byte_names_the_damage_and_repairs_it(tmp_path):
    run(['skinkd_synth', '--out', str(tmp_path / 'data'), '--n', '40', '--size', '128', '--seed', '3'])
    cache = build_cache(discover(tmp_path / 'data'), tmp_path / 'cache', size=128)  # 2 MB of images: sampled at open
    images = np.load(cache.path / 'images.npy', mmap_mode='r+')
    images[20, 60, 60, 1] ^= 0x10  # one bit, in the middle of the file, between the sampled blocks
    images.flush()
    del images
    check = ['skinkd_check_data', '--verify-cache', str(tmp_path / 'cache')]
    p = subprocess.run(check, capture_output=True, text=True, env=ENV)
    assert p.returncode == 1, p.stdout + p.stderr
    damaged = [line for line in p.stdout.splitlines() if line.startswith('damaged')]
    assert damaged == [f'damaged  {cache.path} (images): images.npy changed since it was built (full checksum)']
    assert 'MB/s' in p.stdout.splitlines()[-1] and '1 damaged (rebuild them: --repair)' in p.stdout
    p = subprocess.run([*check, '--repair'], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and damaged[0] + '; rebuilt' in p.stdout.splitlines(), p.stdout + p.stderr
    p = subprocess.run(check, capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and p.stdout.splitlines()[-1].endswith(': 0 damaged'), p.stdout
    fresh = build_cache(discover(tmp_path / 'data'), tmp_path / 'cache', size=128)
    assert fresh.path == cache.path and int(fresh.images[20, 60, 60, 1]) == int(np.asarray(cache.images)[20, 60, 60, 1]) ^ 0x10


def test_verify_cache_refuses_a_missing_folder_in_one_line(tmp_path):
    p = subprocess.run(['skinkd_check_data', '--verify-cache', str(tmp_path / 'nowhere')], capture_output=True,
                       text=True, env=ENV)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].endswith(
        f'cache folder {tmp_path / "nowhere"} not found; pass a data.cache_dir (or one cache in it)')
    assert len(p.stderr.strip().splitlines()) == 1
