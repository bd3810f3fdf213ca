"""`cmbcluster config check`, settings from the environment and .env, start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbcluster.config import load_core_settings, resolve
from cmbcluster.db.engine import filesystem_type
from cmbcluster.errors import ConfigurationError
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.process import clean_environ
from cmbcluster.testing.process import run_cli as cmbcluster


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")}


def test_default_configuration_is_the_embedded_local_provider(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "storage=local, compute=local, infra=local, auth=local" in result.stdout


def test_aws_without_its_fields_lists_every_problem(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env={**env, "CLOUD_PROVIDER": "aws"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "AWS_REGION is required but not set" in result.stderr
    assert "AWS_ACCOUNT_ID is required but not set" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_invalid_values_are_reported_with_their_variable_names(env: dict[str, str], tmp_path: Path) -> None:
    bad = {**env, "CLOUD_PROVIDER": "aws", "AWS_REGION": "eu-west-1", "AWS_ACCOUNT_ID": "12ab", "CMBCLUSTER_PORT": "0"}
    result = cmbcluster("config", "check", env=bad, cwd=tmp_path)
    assert result.returncode == 1
    assert "CMBCLUSTER_PORT" in result.stderr
    # the core problem does not hide the provider's: all are listed together once core parses
    bad.pop("CMBCLUSTER_PORT")
    result = cmbcluster("config", "check", env=bad, cwd=tmp_path)
    assert "AWS_ACCOUNT_ID '12ab' is not an AWS account id" in result.stderr


def test_original_variable_names_and_dotenv_are_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "CLOUD_PROVIDER=aws\nAWS_REGION=eu-west-2\nAWS_ACCOUNT_ID=123456789012\nADMIN_EMAILS=a@x.org, b@y.org\n"
        "S3_USER_BUCKET_PREFIX=cosmo-users\nCMBCLUSTER_COMPUTE_BACKEND=local\n"
        "CMBCLUSTER_AUTH_PROVIDERS=local\nCMBCLUSTER_INFRA_PROVIDER=local\n"
    )
    core = load_core_settings(data_dir=tmp_path / "data")
    assert core.cloud_provider == "aws"
    assert core.admin_emails == ["a@x.org", "b@y.org"]
    config = resolve(core)
    assert config.storage.name == "aws"
    (aws_settings,) = config.provider_settings.values()
    assert aws_settings.model_dump()["aws_region"] == "eu-west-2"
    assert aws_settings.model_dump()["s3_user_bucket_prefix"] == "cosmo-users"


def test_unknown_provider_names_the_package_to_install(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env={**env, "CLOUD_PROVIDER": "azure"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "pip install cmbcluster-azure" in result.stderr


def test_dev_login_refuses_to_serve_beyond_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"refuses to serve on 0\.0\.0\.0"):
        resolve(CoreSettings(data_dir=tmp_path, host="0.0.0.0"))
    assert resolve(CoreSettings(data_dir=tmp_path, host="0.0.0.0", dev_login_allow_remote=True))
    assert resolve(CoreSettings(data_dir=tmp_path, host="::1"))


def test_serve_refuses_an_invalid_configuration_without_traceback(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("serve", "--host", "0.0.0.0", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "refuses to serve on 0.0.0.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_weak_secret_keys_are_refused(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_SECRET_KEY": "changeme"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "CMBCLUSTER_SECRET_KEY" in result.stderr and "32" in result.stderr


def test_sqlite_on_a_fuse_mount_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cmbcluster.db.engine.filesystem_type", lambda path: "fuse.gcsfuse")
    with pytest.raises(ConfigurationError, match=r"fuse\.gcsfuse file system"):
        resolve(CoreSettings(data_dir=tmp_path))
    # PostgreSQL by URL is fine wherever the data directory is
    assert resolve(CoreSettings(data_dir=tmp_path, database_url="postgresql://db.internal/cmbcluster"))


def test_filesystem_type_reads_the_mount_table(tmp_path: Path) -> None:
    fstype = filesystem_type(tmp_path)
    assert fstype is not None and fstype != ""


def test_a_kubernetes_deployment_without_a_secret_key_is_warned(tmp_path: Path) -> None:
    """The generated key would sit on the database's own volume: fine on a workstation only."""
    cluster = CoreSettings(data_dir=tmp_path / "data", compute_backend="kubernetes")
    assert any("CMBCLUSTER_SECRET_KEY is not set" in w for w in resolve(cluster).warnings)
    keyed = cluster.model_copy(update={"secret_key": "k" * 40})
    assert not any("CMBCLUSTER_SECRET_KEY" in w for w in resolve(keyed).warnings)
    workstation = CoreSettings(data_dir=tmp_path / "data")
    assert not any("CMBCLUSTER_SECRET_KEY" in w for w in resolve(workstation).warnings)


# -- what breaks later, caught before anything starts ---------------------------------------------------
HOST_ROUTING = {"CMBCLUSTER_COMPUTE_BACKEND": "kubernetes", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "envs.example.org"}


def test_host_routing_derives_the_cookie_domain_environments_need(env: dict[str, str], tmp_path: Path) -> None:
    ok = cmbcluster("config", "check", env={**env, **HOST_ROUTING, "CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org"},
                    cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "CMBCLUSTER_COOKIE_DOMAIN is not set: using example.org" in ok.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "needs CMBCLUSTER_PUBLIC_URL"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://cmb.other.net"}, "share no parent domain"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://10.0.0.5"}, "not IP addresses"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org", "CMBCLUSTER_COOKIE_DOMAIN": "cmb.example.org"},
         "must be a parent of both"),
        ({"CMBCLUSTER_PUBLIC_URL": "cmb.example.org"}, "CMBCLUSTER_PUBLIC_URL must be an absolute http(s) URL"),
    ],
)  # fmt: skip
def test_a_configuration_that_would_loop_at_sign_in_is_refused(
    env: dict[str, str], tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    result = cmbcluster("config", "check", env={**env, **HOST_ROUTING, **extra}, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_misspelt_variables_and_an_unset_cloud_are_reported(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_ENVIRONMENT_DOMAIN": "envs.example.org"},
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "CMBCLUSTER_ENVIRONMENT_DOMAIN is not a setting" in result.stderr
    assert "did you mean CMBCLUSTER_ENVIRONMENTS_DOMAIN?" in result.stderr
    assert "CLOUD_PROVIDER is not set: serving the embedded default (local) although cloud plugins are installed" in (
        result.stderr
    )
    chosen = cmbcluster("config", "check", env={**env, "CLOUD_PROVIDER": "local"}, cwd=tmp_path)
    assert "CLOUD_PROVIDER is not set" not in chosen.stderr
