"""`cmbcluster plugin new`: the package it writes installs, is listed, configures, and passes every
contract suite as generated; it imports only CMBCluster's public modules."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml

import cmbcluster
from cmbcluster.testing.process import clean_environ, run_cli

#: The modules cmbcluster/__init__.py documents as the plugin API (and cmbcluster.testing.* for tests).
PUBLIC = {"cmbcluster", "cmbcluster.interfaces", "cmbcluster.errors", "cmbcluster.oidc", "cmbcluster.naming",
          "cmbcluster.provisioning", "cmbcluster.local", "cmbcluster.testing"}  # fmt: skip
#: Every contract suite of cmbcluster.testing, as the generated tests name their subclasses.
SUITES = ("Storage", "Auth", "Infra", "Lifecycle", "Pods", "DeployValues", "Provisioner", "Prices")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The package for a cloud named acme, written by the CLI and installed into a private folder."""
    root = tmp_path_factory.mktemp("plugin")
    result = run_cli("plugin", "new", "acme", "--dir", str(root / "cmbcluster-acme"), env=clean_environ(), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "wrote 16 files" in result.stdout and "pip install -e" in result.stdout
    site = root / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(root / "cmbcluster-acme")],
        check=True, capture_output=True,
    )  # fmt: skip
    return root / "cmbcluster-acme", site


def env_with(site: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment, the generated package importable (before any PYTHONPATH already set)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return clean_environ({"PYTHONPATH": path, "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), **extra})


def test_the_generated_plugin_is_installed_and_listed(generated: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = generated
    result = run_cli("plugins", "--json", env=env_with(site, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    acme = {p["name"]: p for p in json.loads(result.stdout)}["acme"]
    assert acme["loaded"] and acme["distribution"] == "cmbcluster-acme"
    assert set(acme["hooks"]) >= {
        "cmbcluster_storage_backends", "cmbcluster_auth_providers", "cmbcluster_infra_providers",
        "cmbcluster_decorate_pod", "cmbcluster_deploy_values", "cmbcluster_price_table",
    }  # fmt: skip


def test_config_check_names_every_variable_the_generated_plugin_needs(
    generated: tuple[Path, Path], tmp_path: Path
) -> None:
    _, site = generated
    missing = run_cli("config", "check", env=env_with(site, tmp_path, CLOUD_PROVIDER="acme"), cwd=tmp_path)
    assert missing.returncode == 1
    assert "ACME_OIDC_ISSUER is required by the auth provider 'acme'" in missing.stderr
    assert "ACME_OIDC_CLIENT_ID is required by the auth provider 'acme'" in missing.stderr
    ready = env_with(site, tmp_path, CLOUD_PROVIDER="acme", ACME_OIDC_ISSUER="https://login.example.org",
                     ACME_OIDC_CLIENT_ID="cmbcluster", ACME_DATA_DIR=str(tmp_path / "acme"))  # fmt: skip
    checked = run_cli("config", "check", env=ready, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    planned = run_cli("infra", "plan", env=ready, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "network" in planned.stdout and "cluster" in planned.stdout


def test_clean_environ_leaves_out_every_variable_of_an_installed_plugin(
    generated: tuple[Path, Path], tmp_path: Path
) -> None:
    """A third party's tests start from a clean environment without listing its variables: they are
    read from its settings model, whatever their names (and, as pydantic-settings reads them, case)."""
    _, site = generated
    shell = env_with(site, tmp_path, ACME_REGION="mars", ACME_OIDC_ISSUER="https://stale.example.org",
                     acme_domain="stale.example.org", CLOUD_PROVIDER="acme", EDITOR="vi")  # fmt: skip
    probe = "import json, cmbcluster.testing.process as p; print(json.dumps(sorted(p.clean_environ())))"
    result = subprocess.run([sys.executable, "-c", probe], env=shell, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    kept = set(json.loads(result.stdout))
    assert not {"ACME_REGION", "ACME_OIDC_ISSUER", "acme_domain", "CLOUD_PROVIDER", "CMBCLUSTER_DATA_DIR"} & kept
    assert {"EDITOR", "PYTHONPATH"} <= kept  # the rest of the environment stays


def contract_suites() -> set[str]:
    import importlib
    import inspect
    import pkgutil

    import cmbcluster.testing

    modules = [
        importlib.import_module(f"cmbcluster.testing.{m.name}")
        for m in pkgutil.iter_modules(cmbcluster.testing.__path__)
    ]
    return {
        name
        for module in modules
        for name, _ in inspect.getmembers(module, inspect.isclass)
        if name.endswith("Contract")
    }


def run_generated_tests(
    generated: tuple[Path, Path], tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """pytest on the generated tests (``args``: a selection), and each suite's outcomes."""
    package, site = generated
    report = tmp_path / "report.xml"
    # a developer's shell with settings of the plugin: its tests' conftest starts without them
    shell = env_with(site, tmp_path, ACME_DATA_DIR=str(tmp_path / "not-for-tests"), ACME_REGION="mars", **env)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(package / "tests"), *args],
        env=shell, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    outcomes: dict[str, list[str]] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        suite = case.attrib["classname"].rsplit(".", 1)[-1]
        outcomes.setdefault(suite, []).append(next((child.tag for child in case), "passed"))
    return result, outcomes


def test_the_generated_tests_run_every_contract_suite_and_pass(generated: tuple[Path, Path], tmp_path: Path) -> None:
    result, outcomes = run_generated_tests(generated, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(outcomes) == sorted(f"TestAcme{suite}" for suite in SUITES)
    # every suite cmbcluster.testing ships for what the template generates (no compute backend)
    assert len(SUITES) == len(contract_suites() - {"ComputeBackendContract"})
    for suite, results in outcomes.items():
        assert results and set(results) == {"passed"}, (suite, results)  # none failed, none skipped
    assert not (tmp_path / "not-for-tests").exists()


def test_the_deploy_suite_finds_helm_by_cmbcluster_helm_and_fails_without_it(
    generated: tuple[Path, Path], tmp_path: Path
) -> None:
    """testing.md: helm on PATH or named by CMBCLUSTER_HELM, which the generated conftest keeps; without
    helm the chart cannot be rendered, and that is a failure saying where to get it, never a skip."""
    helm = shutil.which("helm")
    assert helm is not None, "these tests need helm on PATH (the nox sessions put it there)"
    without_helm = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "helm").exists()
    )  # fmt: skip
    named, outcomes = run_generated_tests(
        generated, tmp_path, "-k", "DeployValues", PATH=without_helm, CMBCLUSTER_HELM=helm
    )  # fmt: skip
    assert named.returncode == 0, named.stdout[-4000:]
    assert set(outcomes["TestAcmeDeployValues"]) == {"passed"}
    missing, outcomes = run_generated_tests(generated, tmp_path, "-k", "renders", PATH=without_helm)
    assert missing.returncode == 1 and outcomes["TestAcmeDeployValues"] == ["failure"]
    assert "Install Helm 3.8 or newer" in missing.stdout and "CMBCLUSTER_HELM=/path/to/helm" in missing.stdout
    assert "--helm" not in missing.stdout


def test_the_generated_code_imports_only_public_modules(generated: tuple[Path, Path]) -> None:
    package, _ = generated
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cmbcluster":
                top = ".".join(node.module.split(".")[:2])
                assert node.module in PUBLIC or top == "cmbcluster.testing", f"{path.name}: {node.module}"
    doc = cmbcluster.__doc__ or ""
    assert all(f":mod:`{module}`" in doc for module in PUBLIC - {"cmbcluster"})  # each documented public


def test_every_name_the_generated_code_imports_is_in_the_plugin_docs(generated: tuple[Path, Path]) -> None:
    """A plugin author grows the template from docs/plugins alone: each class, helper and type it
    takes from CMBCluster is explained there, named as the code names it."""
    package, _ = generated
    docs = "\n".join(path.read_text() for path in (Path(__file__).parents[2] / "docs" / "plugins").glob("*.md"))
    undocumented = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cmbcluster":
                undocumented |= {f"{node.module}.{a.name}" for a in node.names
                                 if not re.search(rf"\b{a.name}\b", docs)}  # fmt: skip
    assert not undocumented, f"not in docs/plugins: {sorted(undocumented)}"


def test_the_next_command_is_one_line_to_copy_however_long_its_path(tmp_path: Path) -> None:
    """Piped or captured (a CI log, `| tee`), rich cut lines at 80 columns, mid-path."""
    folder = tmp_path / ("a-rather-long-folder-name-" * 4) / "cmbcluster-acme"
    for columns in ({}, {"COLUMNS": "80"}):  # as a login shell or a CI runner may export it
        env = clean_environ(columns)
        result = run_cli("plugin", "new", "acme", "--dir", str(folder), env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"next: pip install -e '{folder}[test]' && (cd {folder} && pytest) && cmbcluster plugins" in (
            result.stdout.splitlines()
        )
        shutil.rmtree(folder)


def test_bad_names_and_occupied_folders_are_refused(tmp_path: Path) -> None:
    bad = run_cli("plugin", "new", "Bad Name", env=clean_environ(), cwd=tmp_path)
    assert bad.returncode == 2 and "'Bad Name' is not a plugin name" in bad.stderr
    for name, reason in (("local", "a provider built into cmbcluster-core"), ("oidc", "built into cmbcluster-core"),
                         ("aws", "CMBCluster's own plugin, cmbcluster-aws"), ("gcp", "cmbcluster-gcp")):  # fmt: skip
        taken = run_cli("plugin", "new", name, env=clean_environ(), cwd=tmp_path)
        assert taken.returncode == 2 and f"{name!r} cannot be a new plugin's name" in taken.stderr, name
        assert reason in taken.stderr and not (tmp_path / f"cmbcluster-{name}").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = run_cli("plugin", "new", "acme", "--dir", str(tmp_path / "taken"), env=clean_environ(), cwd=tmp_path)
    assert taken.returncode == 2 and "exists and is not empty" in taken.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_an_installed_plugins_name_is_refused(generated: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = generated
    again = run_cli(
        "plugin", "new", "acme", "--dir", str(tmp_path / "again"), env=env_with(site, tmp_path), cwd=tmp_path
    )
    assert again.returncode == 2
    assert "the installed plugin 'acme' (cmbcluster-acme 0.1.0) has it" in again.stderr
    assert not (tmp_path / "again").exists()


class FakeSession:
    """What the generated noxfile asks of nox: the commands it would run."""

    def __init__(self) -> None:
        self.installed: list[tuple[str, ...]] = []
        self.posargs: list[str] = []

    def install(self, *args: str) -> None:
        self.installed.append(args)

    def run(self, *args: str) -> None:
        pass


def load_noxfile(package: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    nox = types.ModuleType("nox")
    nox.session = lambda function: function  # type: ignore[attr-defined]
    nox.Session = FakeSession  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nox", nox)
    spec = importlib.util.spec_from_file_location("generated_noxfile", package / "noxfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_noxfile_installs_core_from_where_it_is(
    generated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cmbcluster-core is not on PyPI: `nox -s tests` installs it from CMBCLUSTER_CORE (a clone's folder,
    editable, or any pip requirement), by default from where the generating core was installed."""
    package, _ = generated
    here = Path(cmbcluster.__file__).resolve().parents[2]  # this checkout's cmbcluster-core, installed editable
    git = "cmbcluster-core @ git+https://example.org/c.git#subdirectory=cmbcluster-core"
    cases: list[tuple[str | None, tuple[str, ...]]] = [
        (None, ("-e", str(here))), (str(tmp_path), ("-e", str(tmp_path))), (git, (git,)),
    ]  # fmt: skip
    for source, expected in cases:
        if source is None:
            monkeypatch.delenv("CMBCLUSTER_CORE", raising=False)
        else:
            monkeypatch.setenv("CMBCLUSTER_CORE", source)
        session = FakeSession()
        load_noxfile(package, monkeypatch).tests(session)
        assert session.installed == [(*expected, "-e", ".[test]")], source


def test_the_generated_ci_gets_core_and_helm(generated: tuple[Path, Path]) -> None:
    package, _ = generated
    workflow = yaml.safe_load((package / ".github" / "workflows" / "tests.yml").read_text())
    job = workflow["jobs"]["tests"]
    steps = " ".join(str(step.get("run", step.get("uses", ""))) for step in job["steps"])
    assert "git clone" in steps and "https://github.com/cmbcluster/cmbcluster.git" in steps
    assert job["env"]["CMBCLUSTER_CORE"].endswith("/cmbcluster/cmbcluster-core")  # the clone's folder
    assert "azure/setup-helm" in steps and steps.rstrip().endswith("nox")
