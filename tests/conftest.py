"""Shared pytest fixtures and paths for skinkd's tests."""
from pathlib import Path

import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


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
