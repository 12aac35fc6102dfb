"""Shared pytest fixtures and paths for skinkd's tests."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data() -> Path:
    """The real dermoscopy samples beside the checkout; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data not found at {SHARED_DATA} (only present on development and CI machines)')
    return SHARED_DATA
