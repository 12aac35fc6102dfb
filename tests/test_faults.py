"""Faults of the operating system and damaged files, through the real commands: a real full disk (a small tmpfs),
a real read-only file system, a cache damaged on disk, lesion-free images. Each case: exit status 1, one line naming
the path and the fix, and nothing half-written left behind. Mounting needs root; without it the tests skip."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinkd.config import SMOKE_OVERRIDES

from conftest import REPO

ENV = {**os.environ, 'SKINKD_PROGRESS': '0', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def run(cmd, check=False):
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if check and p.returncode: raise AssertionError(f'{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
    return p


def one_line_error(p, path, fix: str) -> str:
    "Assert that `p` failed with exactly one stderr line naming `path` and `fix`; return it."
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and len(lines) == 1, (p.returncode, p.stderr[-3000:])
    assert str(path) in lines[0] and fix in lines[0] and '.tmp' not in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> list[str]:
    """Everything under `folder` but the released build locks (empty `.NAME.lock` files, which stay by design)."""
    released = lambda p: p.name.startswith('.') and p.name.endswith('.lock') and p.stat().st_size == 0
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if not released(p))


@pytest.fixture
def mount(tmp_path):
    "mount(name, size, read_only): a real tmpfs under tmp_path; unmounted after the test."
    mounted = []
    def make(name: str, size: str = '64k', read_only: bool = False) -> Path:
        mnt = tmp_path / name; mnt.mkdir()
        opts = f'size={size}' + (',ro' if read_only else '')
        if not shutil.which('mount') or subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(mnt)], capture_output=True).returncode:
            pytest.skip('mounting a tmpfs needs root (a real full or read-only disk cannot be made here)')
        mounted.append(mnt); return mnt
    yield make
    for m in mounted: subprocess.run(['umount', str(m)], check=True)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "Tiny synthetic data, its cache and a trained teacher checkpoint, made once by the real commands."
    d = tmp_path_factory.mktemp('faults')
    run(['skinkd_synth', '--out', str(d / 'syn'), '--n', '24', '--size', '48', '--seed', '1'], check=True)
    sets = [*SMOKE_OVERRIDES, f'data.root={d / "syn"}', 'data.synthetic_n=24', 'data.image_size=48', 'data.num_workers=0',
            'train.epochs=1', 'teacher.backbone=resnet18']
    args = ['--config', str(REPO / 'configs' / 'demo.yaml'), *[a for s in sets for a in ('--set', s)]]
    run(['skinkd_train_teacher', *args, '--set', f'data.cache_dir={d / "cache"}', '--backbone', 'resnet18', '--out', str(d / 'teacher')], check=True)
    return d, args, d / 'teacher' / 'checkpoints' / 'best.pt'


FULL = 'no space left on the device: free space there'
READ_ONLY = 'the file system is read-only: choose a folder on a writable disk'


def test_checkpoints_on_a_full_disk(setup, mount):
    d, args, _ = setup
    fs = mount('fs', '600k')  # room for the config, not for a checkpoint
    p = run(['skinkd_distill', '--mode', 'raw', *args, '--set', f'data.cache_dir={d / "cache"}', '--out', str(fs / 'run')])
    one_line_error(p, fs / 'run' / 'checkpoints', FULL)
    ck = fs / 'run' / 'checkpoints'
    assert not ck.exists() or not list(ck.iterdir())  # no checkpoint, whole or half, and no temporary file


def test_a_run_folder_on_a_read_only_disk(setup, mount):
    d, args, _ = setup
    fs = mount('fs', read_only=True)
    p = run(['skinkd_distill', '--mode', 'raw', *args, '--set', f'data.cache_dir={d / "cache"}', '--out', str(fs / 'run')])
    one_line_error(p, fs / 'run', READ_ONLY)


def test_a_cache_on_a_full_disk_fails_before_decoding_and_leaves_nothing(setup, mount, tmp_path):
    "Was: SIGBUS (exit 135), no message, and a temporary folder that kept the disk full."
    d, args, _ = setup
    fs = mount('fs', '64k')
    p = run(['skinkd_distill', '--mode', 'raw', *args, '--set', f'data.cache_dir={fs}', '--out', str(tmp_path / 'run')])
    line = one_line_error(p, fs, FULL)
    assert 'MiB are free' in line and 'data.cache_dir' in line
    assert files_under(fs) == ['checks.json']  # the checks' memo only: no cache folder, whole or temporary


def test_a_cache_on_a_read_only_disk(setup, mount, tmp_path):
    d, args, _ = setup
    fs = mount('fs', read_only=True)
    p = run(['skinkd_distill', '--mode', 'raw', *args, '--set', f'data.cache_dir={fs}', '--out', str(tmp_path / 'run')])
    one_line_error(p, fs, READ_ONLY)


def test_an_evaluation_report_is_complete_or_absent(setup, mount):
    "Was: a report folder with 4 of its 7 files and a 36-line traceback."
    d, args, teacher = setup
    fs = mount('fs', '40k')  # the CSV and JSON fit, the plots do not
    p = run(['skinkd_evaluate', *args, '--set', f'data.cache_dir={d / "cache"}', '--weights', str(teacher), '--out', str(fs / 'report')])
    one_line_error(p, fs / 'report', FULL)
    assert files_under(fs) == []


@pytest.mark.parametrize('fmt', ['onnx', 'onnx-int8'])
@pytest.mark.parametrize('fault', ['full', 'read_only'])
def test_export_onto_a_faulty_disk(setup, mount, fault, fmt):
    "Was: a C++ abort (exit 134) on a full disk, a traceback on a read-only one. INT8 works in a temporary folder there."
    d, _, teacher = setup
    fs = mount('fs', '64k', read_only=fault == 'read_only')
    calib = ['--calib', str(d / 'syn'), '--calib_count', '4'] if fmt == 'onnx-int8' else []
    p = run(['skinkd_export', '--format', fmt, '--weights', str(teacher), '--out', str(fs / 'model.onnx'), *calib])
    one_line_error(p, fs / 'model.onnx' if fault == 'full' else fs, FULL if fault == 'full' else READ_ONLY)
    assert files_under(fs) == []


@pytest.mark.parametrize('fault', ['full', 'read_only'])
def test_synthesis_onto_a_faulty_disk(mount, fault):
    fs = mount('fs', '64k', read_only=fault == 'read_only')
    p = run(['skinkd_synth', '--out', str(fs / 'syn'), '--n', '24', '--size', '48'])
    one_line_error(p, fs / 'syn', FULL if fault == 'full' else READ_ONLY)
    assert files_under(fs) == []  # no temporary folder keeps the disk full


def _damage(cache: Path, case: str):
    "Damage every split's cache in `cache` the way `case` says."
    for k in (k for k in cache.iterdir() if k.is_dir()):
        if case == 'truncated_images':
            f = k / 'images.npy'; f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        elif case == 'empty_meta':
            (k / 'meta.json').write_text('')
        elif case == 'truncated_masks' and (k / 'orig_masks.bin').is_file():
            f = k / 'orig_masks.bin'; f.write_bytes(f.read_bytes()[:-50])
        elif case == 'changed_masks' and (k / 'masks.npy').is_file():
            a = np.load(k / 'masks.npy', mmap_mode='r+'); a[0] = 1 - a[0]; a.flush(); del a


@pytest.mark.parametrize('case', ['truncated_images', 'empty_meta', 'truncated_masks', 'changed_masks'])
def test_a_damaged_cache_is_named_and_rebuilt_and_the_scores_are_those_of_an_intact_one(setup, tmp_path, case):
    "Was: a traceback (truncated arrays, empty meta.json) or, with a truncated orig_masks.bin, silently different test metrics."
    d, args, teacher = setup
    def test_dice(cache: Path) -> float:
        out = tmp_path / f'report-{cache.name}'
        p = run(['skinkd_evaluate', *args, '--set', f'data.cache_dir={cache}', '--weights', str(teacher), '--out', str(out)], check=True)
        models = json.loads((out / 'metrics.json').read_text())['models']
        return p, {m: {k: v for k, v in r.items() if 'latency' not in k} for m, r in models.items()}  # scores, not timings
    intact = tmp_path / 'intact'; shutil.copytree(d / 'cache', intact)
    _, expected = test_dice(intact)
    damaged = tmp_path / 'damaged'; shutil.copytree(d / 'cache', damaged); _damage(damaged, case)
    p, got = test_dice(damaged)
    said = [l for l in p.stderr.splitlines() if ' is damaged (' in l]
    assert said and all(l.endswith('; rebuilding it') for l in said), p.stderr
    assert got == expected


def test_an_unreadable_checks_memo_is_said_and_redone(setup, tmp_path):
    "Was: a traceback on every later run that used the cache folder."
    d, args, teacher = setup
    cache = tmp_path / 'cache'; shutil.copytree(d / 'cache', cache); (cache / 'checks.json').write_text('')
    p = run(['skinkd_evaluate', *args, '--set', f'data.cache_dir={cache}', '--weights', str(teacher), '--out', str(tmp_path / 'r')], check=True)
    assert 'checks.json is unreadable (damaged); checking the files again' in p.stderr
    assert len(json.loads((cache / 'checks.json').read_text())) == 24


def test_lesion_free_images_are_accepted_counted_and_scored(setup, tmp_path):
    "Was: an empty mask made the pair unusable. Now: usable, counted by check_data and in the evaluation report."
    d, args, teacher = setup
    syn = tmp_path / 'syn'; shutil.copytree(d / 'syn', syn)
    for m in sorted(syn.glob('ISIC2018_Task1_Test_GroundTruth/*.png'))[:2]: Image.new('L', Image.open(m).size, 0).save(m)
    p = run(['skinkd_check_data', '--data', str(syn)], check=True)
    assert 'lesion-free images (empty masks, usable): 2' in p.stdout and 'OK: all 24 pairs usable' in p.stdout
    out = tmp_path / 'report'
    run(['skinkd_evaluate', *args, '--set', f'data.root={syn}', '--set', f'data.cache_dir={tmp_path / "cache"}',
         '--weights', str(teacher), '--out', str(out)], check=True)
    assert ', 2 of them lesion-free)' in (out / 'report.md').read_text()


def test_a_folder_build_killed_mid_way_leaves_a_temporary_folder_that_the_next_run_removes(tmp_path):
    "kill -9 during synthesis leaves `.syn.tmp-<host>-<pid>-*`; the next run sees its writer is dead, removes it and builds."
    import signal, socket, time
    out = tmp_path / 'syn'
    p = subprocess.Popen(['skinkd_synth', '--out', str(out), '--n', '3000', '--size', '128'], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob('.syn.tmp-*/*/*')) and time.time() < deadline: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    left = list(tmp_path.glob('.syn.tmp-*'))
    assert [t.name.startswith(f'.syn.tmp-{socket.gethostname()}-{p.pid}-') for t in left] == [True]
    run(['skinkd_synth', '--out', str(out), '--n', '8', '--size', '32'], check=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ['.syn.lock', 'syn']  # the build's lock stays, released
    assert (tmp_path / '.syn.lock').read_text() == ''
