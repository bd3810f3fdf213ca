"""A wheel of cmbcluster-core built from the checkout carries the web UI and the Helm chart: one pip
install, whole product (`cmbcluster serve`, and `cmbcluster deploy` without a checkout)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def test_the_core_wheel_includes_the_built_ui(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(ROOT / "cmbcluster-core")],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("cmbcluster_core-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    ui = "cmbcluster/webui_static"
    assert {"cmbcluster/webui.py", f"{ui}/index.html", f"{ui}/index.html.gz", f"{ui}/storage/files/index.html"} <= names
    assert any(name.startswith("cmbcluster/webui_static/_next/static/") and name.endswith(".js.gz") for name in names)
    chart = "cmbcluster/chart"
    expected = ("Chart.yaml", "values.yaml", "values.schema.json", "files/rbac.json", "templates/rbac.yaml")
    assert {f"{chart}/{name}" for name in expected} <= names
