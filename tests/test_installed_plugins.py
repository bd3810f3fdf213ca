"""Plugins installed as real distributions: a broken one, and a third party's storage backend.

Each is built into a wheel and installed into a private target folder that only the
subprocesses of these tests see (PYTHONPATH), so the rest of the suite is unaffected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ, run_cli

PLUGINS = Path(__file__).parent / "plugins"


def install(plugin: str, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(PLUGINS / plugin)],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site-packages")
    install("broken", target)
    install("thirdparty", target)
    return target


@pytest.fixture
def env(site: Path, tmp_path: Path) -> dict[str, str]:
    return clean_environ({"PYTHONPATH": str(site), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")})


def test_broken_plugin_is_listed_with_its_error(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("plugins", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    broken = plugins["broken"]
    assert broken["distribution"] == "cmbcluster-broken" and broken["version"] == "0.0.1"
    assert not broken["loaded"]
    assert broken["error"] == "ModuleNotFoundError: No module named 'cmbcluster_dependency_that_is_not_installed'"
    assert plugins["local"]["loaded"] and plugins["aws"]["loaded"] and plugins["thirdparty"]["loaded"]


def test_serve_starts_despite_a_broken_plugin_and_shows_it(env: dict[str, str], tmp_path: Path) -> None:
    with ServeProcess(env, tmp_path) as server:
        assert server.wait_ready("/readyz").status_code == 200
        with httpx.Client(base_url=server.url) as client:
            admin = dev_sign_in(client, "ops@example.org")
            listed = client.get("/api/v1/plugins", headers=admin).json()["plugins"]
            assert "cmbcluster_plugins_failed 1.0" in client.get("/metrics", headers=admin).text
        plugins = {p["name"]: p for p in listed}
        assert "No module named" in plugins["broken"]["error"]
    assert "plugin broken (cmbcluster-broken 0.0.1) failed to load" in server.output()


def test_strict_mode_makes_the_broken_plugin_fatal(env: dict[str, str], tmp_path: Path) -> None:
    strict = {**env, "CMBCLUSTER_PLUGINS_STRICT": "1"}
    for command in (["serve"], ["config", "check"]):
        result = run_cli(*command, env=strict, cwd=tmp_path)
        assert result.returncode == 1, command
        assert "plugin 'broken' from cmbcluster-broken 0.0.1 failed to load" in result.stderr
        assert "strict mode" in result.stderr
        assert "Traceback" not in result.stderr


def test_blocking_the_broken_plugin_silences_it(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("plugins", "--json", env={**env, "CMBCLUSTER_PLUGINS_BLOCK": "broken"}, cwd=tmp_path)
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["broken"]["error"] == "blocked by CMBCLUSTER_PLUGINS_BLOCK"
    strict = run_cli(
        "config", "check", env={**env, "CMBCLUSTER_PLUGINS_BLOCK": "broken", "CMBCLUSTER_PLUGINS_STRICT": "1"},
        cwd=tmp_path,
    )  # fmt: skip
    assert strict.returncode == 0, strict.stderr


def test_third_party_storage_backend_is_used_when_selected(env: dict[str, str], tmp_path: Path) -> None:
    selected = {**env, "CMBCLUSTER_STORAGE_BACKEND": "thirdparty"}
    missing = run_cli("config", "check", env=selected, cwd=tmp_path)
    assert missing.returncode == 1
    assert "THIRDPARTY_ROOT is required but not set (ThirdPartySettings)" in missing.stderr

    root = tmp_path / "thirdparty-buckets"
    root.mkdir()
    with ServeProcess({**selected, "THIRDPARTY_ROOT": str(root)}, tmp_path) as server:
        ready = server.wait_ready("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["storage:thirdparty"] == "ok"
        with httpx.Client(base_url=server.url) as client:
            admin = dev_sign_in(client, "ops@example.org")
            assert client.get("/api/v1/plugins", headers=admin).json()["active"]["storage"] == "thirdparty"
    assert (root / "used-by-control-plane").exists()
    assert "storage=thirdparty" in server.output()
