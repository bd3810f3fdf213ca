"""Plugin distributions installed as pip installs them, for the CLI and server that tests run.

A distribution here is its modules and a ``.dist-info`` folder whose ``entry_points.txt`` names
its plugins (group ``cmbcluster``), in a folder of its own that only the subprocesses given
:func:`with_site`'s environment see: the rest of the suite is unaffected.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path


def install_plugin(
    site: Path,
    distribution: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    *,
    version: str = "0.0.1",
) -> None:
    """Write ``modules`` (module name: source) and ``distribution``'s metadata with ``entry_points``
    (plugin name: module) into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    points = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cmbcluster]\n{points}")


def with_site(env: Mapping[str, str], site: Path) -> dict[str, str]:
    """``env`` with ``site`` first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}
