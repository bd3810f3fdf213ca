"""The UI's typed API client is generated from the API itself; a stale one fails here (and in CI)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_the_checked_in_api_client_matches_the_apps_openapi_document() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "frontend" / "openapi_client.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
