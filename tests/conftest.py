from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmbcluster.testing.process import clean_environ


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
