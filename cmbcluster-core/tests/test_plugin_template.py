"""`cmbcluster plugin new`: the package it writes installs, is listed, configures, and passes every
contract suite as generated; it imports only CMBCluster's public modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

import cmbcluster
from cmbcluster.testing.process import clean_environ, run_cli

#: The modules cmbcluster/__init__.py documents as the plugin API (and cmbcluster.testing.* for tests).
PUBLIC = {"cmbcluster", "cmbcluster.interfaces", "cmbcluster.errors", "cmbcluster.oidc", "cmbcluster.naming",
          "cmbcluster.provisioning", "cmbcluster.local", "cmbcluster.testing"}  # fmt: skip
#: Every contract suite of cmbcluster.testing, as the generated tests name their subclasses.
SUITES = ("Storage", "Auth", "Infra", "Lifecycle", "Pods", "DeployValues", "Provisioner")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The package for a cloud named acme, written by the CLI and installed into a private folder."""
    root = tmp_path_factory.mktemp("plugin")
    result = run_cli("plugin", "new", "acme", "--dir", str(root / "cmbcluster-acme"), env=clean_environ(), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "wrote 15 files" in result.stdout and "pip install -e" in result.stdout
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
        "cmbcluster_decorate_pod", "cmbcluster_deploy_values",
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


def test_the_generated_tests_run_every_contract_suite_and_pass(generated: tuple[Path, Path], tmp_path: Path) -> None:
    package, site = generated
    report = tmp_path / "report.xml"
    # a developer's shell with settings of the plugin: its tests' conftest starts without them
    shell = env_with(site, tmp_path, ACME_DATA_DIR=str(tmp_path / "not-for-tests"), ACME_REGION="mars")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(package / "tests")],
        env=shell, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    outcomes: dict[str, list[str]] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        suite = case.attrib["classname"].rsplit(".", 1)[-1]
        outcomes.setdefault(suite, []).append(next((child.tag for child in case), "passed"))
    assert sorted(outcomes) == sorted(f"TestAcme{suite}" for suite in SUITES)
    for suite, results in outcomes.items():
        assert results and set(results) == {"passed"}, (suite, results)  # none failed, none skipped
    assert not (tmp_path / "not-for-tests").exists()


def test_the_generated_code_imports_only_public_modules(generated: tuple[Path, Path]) -> None:
    package, _ = generated
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cmbcluster":
                top = ".".join(node.module.split(".")[:2])
                assert node.module in PUBLIC or top == "cmbcluster.testing", f"{path.name}: {node.module}"
    doc = cmbcluster.__doc__ or ""
    assert all(f":mod:`{module}`" in doc for module in PUBLIC - {"cmbcluster"})  # each documented public


def test_bad_names_and_occupied_folders_are_refused(tmp_path: Path) -> None:
    bad = run_cli("plugin", "new", "Bad Name", env=clean_environ(), cwd=tmp_path)
    assert bad.returncode == 2 and "'Bad Name' is not a plugin name" in bad.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = run_cli("plugin", "new", "acme", "--dir", str(tmp_path / "taken"), env=clean_environ(), cwd=tmp_path)
    assert taken.returncode == 2 and "exists and is not empty" in taken.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
