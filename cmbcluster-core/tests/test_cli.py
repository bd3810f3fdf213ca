"""The command line as an operator uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cmbcluster.testing.api import LOCAL
from cmbcluster.testing.process import ServeProcess as Server
from cmbcluster.testing.process import clean_environ
from cmbcluster.testing.process import run_cli as cmbcluster


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")}


def test_plugins_json_lists_local_gcp_and_aws_with_hooks(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("plugins", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert {"local", "aws", "gcp"} <= set(plugins)
    for name in ("local", "aws", "gcp"):
        assert plugins[name]["loaded"] and plugins[name]["error"] is None
        assert "cmbcluster_storage_backends" in plugins[name]["hooks"]
        assert set(plugins[name]) >= {"name", "distribution", "version", "hooks", "error"}


def test_plugins_table_for_humans(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("plugins", env={**env, "COLUMNS": "200"}, cwd=tmp_path)
    assert result.returncode == 0
    assert "cmbcluster-aws" in result.stdout and "loaded" in result.stdout


BROKEN_PLUGIN = """
from cmbcluster import StorageBackendRegistration, hookimpl


@hookimpl
def cmbcluster_storage_backends():
    yield StorageBackendRegistration(name="Bad Name", factory=lambda ctx: None)
"""


@pytest.fixture
def broken_plugin(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A third party's plugin, installed as a distribution, whose registration hook fails."""
    site = tmp_path / "site"
    info = site / "cmbcluster_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "cmbcluster_broken.py").write_text(BROKEN_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmbcluster-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cmbcluster]\nbroken = cmbcluster_broken\n")
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_a_broken_plugin_is_shown_failed_and_the_rest_keeps_working(
    broken_plugin: dict[str, str], tmp_path: Path
) -> None:
    listed = cmbcluster("plugins", "--json", env=broken_plugin, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert not plugins["broken"]["loaded"] and "invalid storage backend name 'Bad Name'" in plugins["broken"]["error"]
    assert plugins["aws"]["loaded"] and plugins["local"]["loaded"]

    check = cmbcluster("config", "check", env=broken_plugin, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "plugin broken (cmbcluster-broken 0.1) not loaded: cmbcluster_storage_backends raised" in check.stderr
    assert "Traceback" not in check.stderr and "configuration OK" in check.stdout

    strict = cmbcluster("config", "check", env={**broken_plugin, "CMBCLUSTER_PLUGINS_STRICT": "1"}, cwd=tmp_path)
    assert strict.returncode == 1 and "strict mode" in strict.stderr and "Traceback" not in strict.stderr


def test_db_upgrade_and_current(env: dict[str, str], tmp_path: Path) -> None:
    before = cmbcluster("db", "current", env=env, cwd=tmp_path)  # only reads: creates no database
    assert before.returncode == 1 and "does not exist (`cmbcluster db upgrade`" in before.stderr, before.stderr
    upgraded = cmbcluster("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    after = cmbcluster("db", "current", env=env, cwd=tmp_path)
    assert "up to date" in after.stdout


def test_version(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("version", env=env, cwd=tmp_path)
    assert result.stdout.startswith("cmbcluster-core ")
    assert "cmbcluster-aws" in result.stdout


def test_unknown_command_and_bad_option_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    for args in (["frobnicate"], ["serve", "--port", "notaport"], ["serve", "--port", "70000"]):
        result = cmbcluster(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr


def test_serve_starts_on_the_embedded_default_and_says_where(env: dict[str, str], tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    server = Server({**env, "CMBCLUSTER_DATA_DIR": str(data_dir)}, tmp_path)
    try:
        assert server.wait_ready("/healthz").status_code == 200
        ready = server.wait_ready("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["storage:local"] == "ok"
    finally:
        server.stop()
    assert data_dir.is_dir() and (data_dir / "cmbcluster.db").exists()
    first_lines = [json.loads(line) for line in server.output().splitlines()[:4] if line.startswith("{")]
    messages = " ".join(line["message"] for line in first_lines)
    assert f"serving on http://127.0.0.1:{server.port}" in messages
    assert "storage=local compute=local auth=local infra=local" in messages


def test_users_token_prints_a_working_token_once_and_creates_the_user_on_the_embedded_default(
    env: dict[str, str], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from cmbcluster.app import create_app
    from cmbcluster.settings import CoreSettings
    from cmbcluster.testing.api import dev_sign_in

    made = cmbcluster("users", "token", "Ada@Example.org", "--name", "laptop", "--expires-in-days", "30",
                      env=env, cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("cmbt_") and made.stdout == token + "\n"  # alone on stdout: TOKEN=$(...)
    assert "'laptop' for ada@example.org, admin (user created); it expires in 30 days" in made.stderr
    again = cmbcluster("users", "token", "ada@example.org", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "(user created)" not in again.stderr and "never expires" in again.stderr
    assert again.stdout.strip() != token
    with TestClient(create_app(CoreSettings(data_dir=tmp_path / "data")), base_url=LOCAL) as client:
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["email"] == "ada@example.org" and me.json()["role"] == "admin"
        tokens = client.get("/api/v1/settings/tokens", headers={"Authorization": f"Bearer {token}"}).json()
        assert sorted(t["name"] for t in tokens) == ["cli", "laptop"]
        signed_in = dev_sign_in(client, "ada@example.org")  # the development sign-in finds the same person
        assert client.get("/api/v1/auth/me", headers=signed_in).json()["id"] == me.json()["id"]


def test_users_token_refuses_bad_input_and_unknown_users_where_people_sign_in_elsewhere(
    env: dict[str, str], tmp_path: Path
) -> None:
    bad = cmbcluster("users", "token", "not-an-address", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "is not an e-mail address" in bad.stderr and bad.stdout == ""
    never = cmbcluster("users", "token", "ada@example.org", "--expires-in-days", "0", env=env, cwd=tmp_path)
    assert never.returncode == 2 and "expires-in-days" in never.stderr
    oidc_only = {
        **env, "CMBCLUSTER_AUTH_PROVIDERS": "oidc", "CMBCLUSTER_OIDC_ISSUER": "https://id.example.org",
        "CMBCLUSTER_OIDC_CLIENT_ID": "cmbcluster", "CMBCLUSTER_OIDC_CLIENT_SECRET": "s",
    }  # fmt: skip
    unknown = cmbcluster("users", "token", "ada@example.org", env=oidc_only, cwd=tmp_path)
    assert unknown.returncode == 1 and "ask them to sign in once" in unknown.stderr and unknown.stdout == ""
