"""A third party's plugin with the mistakes a plugin author makes, installed as a distribution:
core refuses each one clearly, naming the plugin and the registration, before anything serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from installed import install_plugin, with_site

from cmbcluster.testing.process import clean_environ, free_port, run_cli

COMMON = """
from pathlib import Path

from cmbcluster.local import LocalStorage


def folders(ctx):
    return LocalStorage(ctx.data_dir / "buckets")
"""

MISTAKES = {
    # forgets `return`: the factory answers None
    "azforgot": """
        from cmbcluster import StorageBackendRegistration, hookimpl
        from cmbcluster.local import LocalStorage


        def _storage(ctx):
            LocalStorage(ctx.data_dir / "buckets")


        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(name="azforgot", factory=_storage)
    """,
    # a plain pydantic model as settings: it reads no environment variable
    "aznotsettings": """
        from pydantic import BaseModel

        from cmbcluster import AuthProviderRegistration, hookimpl


        class NotSettings(BaseModel):
            tenant: str = "common"


        @hookimpl
        def cmbcluster_auth_providers():
            yield AuthProviderRegistration(name="aznotsettings", factory=lambda ctx: None, settings_model=NotSettings)
    """,
    # asks for a settings model its registration does not declare: never read nor validated
    "azundeclared": """
        from pydantic_settings import BaseSettings

        from cmbcluster import StorageBackendRegistration, hookimpl
        from azcommon import folders


        class OptSettings(BaseSettings):
            account: str | None = None


        def _storage(ctx):
            ctx.require_settings(OptSettings)
            return folders(ctx)


        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(name="azundeclared", factory=_storage)
    """,
    # the SDK the factory imports is not a dependency of the distribution
    "azmissing": """
        from cmbcluster import StorageBackendRegistration, hookimpl


        def _storage(ctx):
            import azure_storage_blob_that_is_not_installed  # noqa: F401

            return None


        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(name="azmissing", factory=_storage)
    """,
    "azbadname": """
        from cmbcluster import StorageBackendRegistration, hookimpl
        from azcommon import folders


        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(name="Azure Blob", factory=folders)
    """,
    "azraises": """
        from cmbcluster import hookimpl


        @hookimpl
        def cmbcluster_storage_backends():
            raise RuntimeError("boom: the SDK is not configured")
    """,
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    install_plugin(target, "azbreak", {"azcommon": COMMON, **MISTAKES}, {name: name for name in MISTAKES})
    return target


@pytest.fixture
def env(site: Path, tmp_path: Path) -> dict[str, str]:
    return with_site(clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data")}), site)


def test_a_factory_that_forgets_return_is_refused_by_config_check_and_serve(
    env: dict[str, str], tmp_path: Path
) -> None:
    chosen = {**env, "CMBCLUSTER_STORAGE_BACKEND": "azforgot"}
    expected = (
        "storage backend 'azforgot' of plugin 'azforgot' (azbreak 0.0.1): its factory returned NoneType, not a "
        "cmbcluster.interfaces.StorageBackend (does it forget to `return`?)"
    )
    check = run_cli("config", "check", env=chosen, cwd=tmp_path)
    assert check.returncode == 1, check.stdout
    assert expected in check.stderr
    assert "Traceback" not in check.stderr and "configuration OK" not in check.stdout
    served = run_cli("serve", "--port", str(free_port()), env=chosen, cwd=tmp_path)  # never a 500 later
    assert served.returncode == 1 and expected in served.stderr and "Traceback" not in served.stderr


def test_a_settings_model_that_reads_no_variables_fails_its_plugin(env: dict[str, str], tmp_path: Path) -> None:
    listed = run_cli("plugins", "--json", env=env, cwd=tmp_path)
    plugin = {p["name"]: p for p in json.loads(listed.stdout)}["aznotsettings"]
    assert not plugin["loaded"]
    assert (
        "auth provider 'aznotsettings': settings_model NotSettings is not a pydantic_settings.BaseSettings subclass"
    ) in plugin["error"]
    check = run_cli("config", "check", env={**env, "CMBCLUSTER_AUTH_PROVIDERS": "aznotsettings"}, cwd=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "plugin 'aznotsettings' is installed but failed to load" in check.stderr


@pytest.mark.parametrize(
    ("backend", "problem"),
    [
        (
            "azundeclared",
            "its factory asks for the settings model OptSettings, which its registration does not declare",
        ),
        ("azmissing", "could not be created: ModuleNotFoundError: No module named 'azure_storage_blob_that_is_not"),
    ],
)
def test_a_plugins_own_mistake_in_a_factory_fails_config_check_wherever_it_runs(
    env: dict[str, str], tmp_path: Path, backend: str, problem: str
) -> None:
    """Not "serve would refuse on this machine": no machine would run it."""
    check = run_cli("config", "check", env={**env, "CMBCLUSTER_STORAGE_BACKEND": backend}, cwd=tmp_path)
    assert check.returncode == 1, check.stdout
    assert f"storage backend '{backend}' of plugin '{backend}' (azbreak 0.0.1)" in check.stderr
    assert problem in check.stderr
    assert "on this machine" not in check.stderr and "Traceback" not in check.stderr


def test_strict_mode_reports_every_failed_plugin_at_once(env: dict[str, str], tmp_path: Path) -> None:
    check = run_cli("config", "check", env={**env, "CMBCLUSTER_PLUGINS_STRICT": "1"}, cwd=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    for name in ("azbadname", "aznotsettings", "azraises"):
        assert f"plugin '{name}' from azbreak 0.0.1 failed to load" in check.stderr, name
    assert check.stderr.count("strict mode (CMBCLUSTER_PLUGINS_STRICT=1)") == 3


def test_two_plugins_registering_one_name_are_listed_beside_the_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    twin = """
        from cmbcluster import StorageBackendRegistration, hookimpl
        from cmbcluster.local import LocalStorage


        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(name="azure", factory=lambda ctx: LocalStorage(ctx.data_dir))
    """
    install_plugin(site, "cmbcluster-azure", {"azure_one": twin}, {"azure": "azure_one"})
    install_plugin(site, "azure-fork", {"azure_two": twin}, {"azurefork": "azure_two"}, version="2.0")
    env = with_site(clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "80"}), site)
    listed = run_cli("plugins", env=env, cwd=tmp_path)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr
    assert "storage backend 'azure' is registered twice" in listed.stderr
    rows = [line.split("│")[1].strip() for line in listed.stdout.splitlines() if line.startswith("│")]
    assert {"azure", "azurefork", "local"} <= set(rows)  # the table is printed too, with both
    # at 80 columns, hook names are whole (other columns wrap instead)
    assert "cmbcluster_storage_backends" in listed.stdout and "cmbcluster_compute_backends" in listed.stdout
