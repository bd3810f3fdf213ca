"""The core and the embedded default never import a cloud SDK, and core's modules import each other without a circle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from cmbcluster.testing.process import clean_environ

PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
import cmbcluster, cmbcluster.interfaces, cmbcluster.testing.storage
from cmbcluster.app import create_app
from cmbcluster.settings import CoreSettings
app = create_app(CoreSettings(data_dir=sys.argv[1]))
with TestClient(app) as client:
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/v1/auth/providers").status_code == 200
cloud = sorted(m for m in sys.modules if m.split(".")[0] in {"boto3", "botocore", "google", "s3transfer", "kubernetes"})
print(json.dumps({"cloud": cloud, "plugins": sorted(m for m in sys.modules if m.startswith("cmbcluster_"))}))
"""


def test_local_provider_imports_no_cloud_sdk(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "data")],
        env=clean_environ(), cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert modules["cloud"] == []
    # the cloud plugins were loaded (so this is a real check), just not their SDKs
    assert "cmbcluster_aws.plugin" in modules["plugins"] and "cmbcluster_gcp.plugin" in modules["plugins"]


# -- the import graph of core ------------------------------------------------------------------------
CORE = Path(__file__).resolve().parents[1] / "cmbcluster-core" / "src" / "cmbcluster"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, by every import statement in its source: at the top,
    under ``if TYPE_CHECKING``, and inside functions alike (each is a dependency a reader follows)."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join([*parent[: len(parent) - node.level + 1], *([base] if base else [])])
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or a name in base
        graph[module] = {found for t in targets if (found := owner(t)) is not None and found != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_core_has_no_import_cycle() -> None:
    graph = import_graph(CORE)
    assert {"cmbcluster.hookspecs", "cmbcluster.config", "cmbcluster.cli"} <= graph.keys()  # read the right tree
    assert cycles(graph) == []


def test_the_cycle_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")
    (package / "c.py").write_text("import pkg.a\nthing = 1\n")
    (package / "d.py").write_text("from pkg import a\n")
    graph = import_graph(package)
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    # the contract reads only itself and the value modules below it, never the machinery that loads it
    assert import_graph(CORE)["cmbcluster.hookspecs"] <= {"cmbcluster.interfaces", "cmbcluster.registrations"}


def test_the_contract_and_the_commands_read_no_machinery_above_them() -> None:
    """The two circles of issue 17 stay cut: the contract (hook specs, registrations, interfaces) reaches
    neither the plugin manager nor the configuration, and no command group reaches back to the CLI."""
    graph = import_graph(CORE)

    def reach(module: str) -> set[str]:
        seen: set[str] = set()
        todo = [module]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    for contract in ("cmbcluster.hookspecs", "cmbcluster.registrations", "cmbcluster.interfaces"):
        assert not reach(contract) & {"cmbcluster.plugins", "cmbcluster.config", "cmbcluster.cli"}, contract
    for command in (m for m in graph if m.startswith("cmbcluster.commands")):
        assert "cmbcluster.cli" not in reach(command), command
