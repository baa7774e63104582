from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cli() -> str:
    """The installed console command, as a user runs it."""
    path = shutil.which("agent-egress", path=str(ROOT / ".venv" / "bin")) or shutil.which(
        "agent-egress")
    assert path, "agent-egress is not installed; run scripts/test"
    return path
