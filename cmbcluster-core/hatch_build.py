"""Hatch build hook: a wheel (and sdist) of cmbcluster-core carries the built web UI (cmbcluster/webui_static)
and the Helm chart (cmbcluster/chart), so that `pip install cmbcluster-core` then `cmbcluster deploy` works.

When the UI is not built yet and this is a checkout (../frontend exists), the hook builds it with
``frontend/build_ui.py`` (Node.js 20 and npm needed). Editable installs skip this: they serve
whatever ``./run nox -s frontend`` (or ``./run serve``) last built in place.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HERE = Path(__file__).resolve().parent
UI_DIR = HERE / "src" / "cmbcluster" / "webui_static"
BUILD_SCRIPT = HERE.parent / "frontend" / "build_ui.py"
CHART_SOURCE = HERE.parent / "helm" / "cmbcluster"
CHART_DIR = HERE / "src" / "cmbcluster" / "chart"


class WebUIBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name not in ("wheel", "sdist") or version == "editable":
            return
        if BUILD_SCRIPT.exists():
            subprocess.run([sys.executable, str(BUILD_SCRIPT), "--if-stale"], check=True)
        if (CHART_SOURCE / "Chart.yaml").exists():  # a checkout: the chart as it is now
            shutil.rmtree(CHART_DIR, ignore_errors=True)
            shutil.copytree(CHART_SOURCE, CHART_DIR)
        if not (UI_DIR / "index.html").exists():
            raise RuntimeError(
                "the web UI is not built and cannot be built here (no frontend/ beside cmbcluster-core): "
                "build the wheel from a checkout of the repository"
            )
