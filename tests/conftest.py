"""Shared test fixtures: the repository root on sys.path and the real text in ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_data():
    """The folder of real public text; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about ten seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (select with -m cuda)")
