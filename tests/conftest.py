"""Shared pytest fixtures and paths for skinkd's tests, and the helpers of the real-browser tests."""
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
ARTIFACTS = REPO / 'test-artifacts'  # screenshots the browser tests take (the README's come from here)
CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


@pytest.fixture
def shared_data() -> Path:
    """The real dermoscopy samples beside the checkout; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data not found at {SHARED_DATA} (only present on development and CI machines)')
    return SHARED_DATA


def with_trained_like_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with non-trivial BatchNorm statistics and affine weights, as after training (in place)."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5); mod.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.fixture
def full_disk(tmp_path):
    """A real, tiny file system (a 16 KiB tmpfs) that fills up on the first sizeable write; skips without mount rights."""
    import shutil, subprocess
    mnt = tmp_path / 'tiny-fs'; mnt.mkdir()
    if not shutil.which('mount') or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16k', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('mounting a tmpfs needs root (a real full disk cannot be made here)')
    yield mnt
    subprocess.run(['umount', str(mnt)], check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60, what: str = 'JupyterLab'):
    "Wait until `url` answers 200, failing early with the server log if the server dies."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f'{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f'{what} did not answer within {timeout} s:\n{log.read_text()[-3000:]}')


def stop_server(proc: subprocess.Popen):
    """Stop a server started with start_new_session=True (and its kernels, in its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
    try: os.killpg(proc.pid, signal.SIGKILL)   # kernels left in the group, if any
    except ProcessLookupError: pass


@contextmanager
def browser_page(width: int, height: int, timeout_ms: int = 30_000):
    """A page of headless Debian Chromium and the list its page errors go to (skips without Chromium or Playwright)."""
    if not CHROMIUM.exists():
        pytest.skip('Debian chromium not found at /usr/bin/chromium (install it with: apt-get install -y chromium)')
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install playwright)')
    ARTIFACTS.mkdir(exist_ok=True)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={'width': width, 'height': height})
            page.set_default_timeout(timeout_ms)
            page.on('pageerror', lambda e: errors.append(f'page error: {e}'))
            yield page, errors
        finally:
            browser.close()


# ---------------------------------------------------------------- tiny synthetic runs from the command line

TINY = ['data.synthetic_n=24', 'data.image_size=48', 'data.num_workers=0', 'teacher.backbone=resnet18',
        'teacher.pretrained=null', 'student.pretrained=null', 'train.epochs=2', 'train.teacher={}', 'train.batch_size=4',
        'train.warmup_epochs=0', 'train.deterministic=true', 'eval.batch_size=8']


def tiny_sets(root: Path, cache: Path, *extra: str) -> list[str]:
    """--config and --set arguments for a tiny synthetic run with its data in `root` and its caches in `cache`."""
    pairs = [*TINY, f'data.root={root}', f'data.cache_dir={cache}', *extra]
    return ['--config', str(REPO / 'configs' / 'demo.yaml'), *[a for s in pairs for a in ('--set', s)]]
