"""`cmbcluster config check`, settings from the environment and .env, start-up refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings

from cmbcluster import (
    AuthProviderRegistration,
    InfraProviderRegistration,
    ProviderContext,
    StorageBackendRegistration,
    hookimpl,
)
from cmbcluster.config import EXAMPLE_HEADER, example_env, load_core_settings, resolve
from cmbcluster.db.engine import filesystem_type
from cmbcluster.errors import ConfigurationError, PluginError
from cmbcluster.interfaces import AuthProvider, InfraProvider, PriceTable
from cmbcluster.plugins import PluginManager
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.process import clean_environ, free_port
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
#: A cluster nobody serves: the Kubernetes backend is built from it (config check builds every provider,
#: as serve does) and config check makes no call to it.
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u, namespace: cmbcluster}}]
current-context: c
"""


@pytest.fixture(autouse=True)
def _kubeconfig(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    env["KUBECONFIG"] = str(tmp_path / "kubeconfig")


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({}, "environments: proxy routing, served by the control plane at /environments/<id>/ of the public URL "
             "(the default without an environments domain)"),
        (HOST_ROUTING | {"CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org"},
         "environments: ingress routing, each on a host of its own: env-<id>.envs.example.org (the default with an "
         "environments domain)"),
        ({"CMBCLUSTER_ROUTING": "ingress"},
         "environments: ingress routing, through the ingress controller at /environments/<id>/ of the public URL\n"),
    ],
)  # fmt: skip
def test_config_check_says_how_users_reach_environments_on_kubernetes(
    env: dict[str, str], tmp_path: Path, extra: dict[str, str], said: str
) -> None:
    """Which routing serves environments, and whether it was chosen or is the default (which depends on
    whether an environments domain is set): an operator reads it before deploying."""
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_COMPUTE_BACKEND": "kubernetes", **extra},
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert said in result.stdout, result.stdout


def test_a_setting_only_an_unused_provider_reads_is_reported(env: dict[str, str], tmp_path: Path) -> None:
    """CMBCLUSTER_ROUTING on the embedded default changes nothing (its environments are always served by
    the control plane): said, as a misspelt name is, rather than silently ignored."""
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_ROUTING": "ingress"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("CMBCLUSTER_ROUTING is set but nothing in use reads it: it is a setting of the compute backend "
            "'kubernetes', not selected here") in " ".join(result.stderr.split()), result.stderr  # fmt: skip
    used = cmbcluster("config", "check", env={**env, "CMBCLUSTER_ROUTING": "ingress",
                                              "CMBCLUSTER_COMPUTE_BACKEND": "kubernetes"}, cwd=tmp_path)  # fmt: skip
    assert used.returncode == 0 and "nothing in use reads it" not in used.stderr, used.stderr


def test_host_routing_needs_no_shared_domain_and_an_old_cookie_domain_is_reported(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Environments on hosts of their own sign in through the control plane's enter path: the
    session cookie no longer spans both hosts, so they need no common parent domain."""
    ok = cmbcluster("config", "check", env={**env, **HOST_ROUTING, "CMBCLUSTER_PUBLIC_URL": "https://cmb.other.net"},
                    cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "COOKIE_DOMAIN" not in ok.stderr and "host routing" not in ok.stderr
    old = cmbcluster("config", "check", env={**env, **HOST_ROUTING, "CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org",
                                             "CMBCLUSTER_COOKIE_DOMAIN": "example.org"}, cwd=tmp_path)  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert "CMBCLUSTER_COOKIE_DOMAIN=example.org is no longer used" in old.stderr
    plain = cmbcluster("config", "check", env={**env, **HOST_ROUTING, "CMBCLUSTER_PUBLIC_URL": "http://cmb.example.org"},
                       cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0 and "host routing with an http CMBCLUSTER_PUBLIC_URL" in plain.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "needs CMBCLUSTER_PUBLIC_URL"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://10.0.0.5", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "10.0.0.6"},
         "not an IP address (10.0.0.6)"),
        # what an operator copies from a browser or a DNS console (a docs-only trial): they served at
        # env-<id>.https://envs.example.org and env-<id>.*.envs.example.org
        ({"CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "https://envs.example.org"},
         "CMBCLUSTER_ENVIRONMENTS_DOMAIN=https://envs.example.org is not a domain name"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "*.envs.example.org"},
         "is not a domain name"),
        ({"CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "envs.example.org:84"},
         "is not a domain name"),
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
    # a plugin chosen for one concern alone is a choice too (found by a plugin author's trial)
    one = cmbcluster("config", "check", env={**env, "CMBCLUSTER_AUTH_PROVIDERS": "oidc",
                                             "CMBCLUSTER_OIDC_ISSUER": "https://id.example.org",
                                             "CMBCLUSTER_OIDC_CLIENT_ID": "c"},
                     cwd=tmp_path)  # fmt: skip
    assert "CLOUD_PROVIDER is not set" not in one.stderr, one.stderr


# -- issue 17: each error once, requirements per concern, the factories' checks, --connect --------------
def test_one_settings_model_for_every_concern_reports_each_error_once(env: dict[str, str], tmp_path: Path) -> None:
    result = cmbcluster("config", "check", env={**env, "CLOUD_PROVIDER": "aws"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("AWS_REGION is required but not set") == 1
    assert result.stderr.count("AWS_ACCOUNT_ID is required but not set") == 1


AWS = {"CLOUD_PROVIDER": "aws", "AWS_REGION": "eu-west-1", "AWS_ACCOUNT_ID": "123456789012"}


class TenantSettings(BaseSettings):
    """One settings model for every concern of a cloud; the sign-in's issuer is needed by sign-in only."""

    tenant_region: str = Field(validation_alias="TENANT_REGION")
    tenant_issuer: str | None = Field(default=None, validation_alias="TENANT_ISSUER")


class TenantCloud:
    @hookimpl
    def cmbcluster_auth_providers(self) -> Iterator[AuthProviderRegistration]:
        yield AuthProviderRegistration(
            name="tenant", factory=_local_auth, settings_model=TenantSettings, requires=("tenant_issuer",)
        )

    @hookimpl
    def cmbcluster_infra_providers(self) -> Iterator[InfraProviderRegistration]:
        yield InfraProviderRegistration(name="tenant", factory=_local_infra, settings_model=TenantSettings)


def _local_auth(ctx: ProviderContext) -> AuthProvider:
    return PluginManager(entry_points_enabled=False).auth_provider("local").factory(ctx)


def _local_infra(ctx: ProviderContext) -> InfraProvider:
    return PluginManager(entry_points_enabled=False).infra_provider("local").factory(ctx)


def test_a_variable_required_by_one_concern_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The issuer is needed to sign in, not to plan the infrastructure (which runs before it exists)."""
    monkeypatch.setenv("TENANT_REGION", "north")
    manager = PluginManager(entry_points_enabled=False)
    manager.register(TenantCloud(), name="tenant")
    core = CoreSettings(
        data_dir=tmp_path / "data", infra_provider="tenant", auth_providers=["tenant", "tenant"]
    )  # the provider twice: still one problem
    with pytest.raises(ConfigurationError) as exc_info:
        resolve(core, manager)
    assert exc_info.value.problems == [
        "TENANT_ISSUER is required by the auth provider 'tenant' but not set (TenantSettings)"
    ]
    assert resolve(core, manager, concerns=("infra",)).infra.name == "tenant"
    monkeypatch.setenv("TENANT_ISSUER", "https://login.example.org/north")
    assert [a.name for a in resolve(core, manager).auth] == ["tenant", "tenant"]


def test_every_missing_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The storage's variable and the sign-in's in one run, not the sign-in's once the storage's is fixed."""
    monkeypatch.delenv("TENANT_REGION", raising=False)
    manager = PluginManager(entry_points_enabled=False)
    manager.register(TenantCloud(), name="tenant")
    core = CoreSettings(data_dir=tmp_path / "data", infra_provider="tenant", auth_providers=["tenant"])
    with pytest.raises(ConfigurationError) as exc_info:
        resolve(core, manager)
    assert exc_info.value.problems == [
        "TENANT_REGION is required but not set (TenantSettings)",
        "TENANT_ISSUER is required by the auth provider 'tenant' but not set (TenantSettings)",
    ]
    monkeypatch.setenv("TENANT_ISSUER", "https://login.example.org/north")  # set: named no more
    with pytest.raises(ConfigurationError) as exc_info:
        resolve(core, manager)
    assert exc_info.value.problems == ["TENANT_REGION is required but not set (TenantSettings)"]


class PricedOnly:
    """A plugin pricing a provider it registers no infra provider for (a storage-only plugin, say)."""

    @hookimpl
    def cmbcluster_price_table(self, config: object) -> PriceTable:
        return PriceTable(provider="tenant", cluster_hour=0.1)


def test_a_price_table_no_infra_provider_can_use_is_warned(tmp_path: Path) -> None:
    manager = PluginManager(entry_points_enabled=False)
    manager.register(PricedOnly(), name="priced")
    config = resolve(CoreSettings(data_dir=tmp_path / "data"), manager)
    assert (
        "plugin 'priced' prices provider 'tenant', but no infra provider is registered under that name: "
        "its prices are not used (usage is priced by the infra provider's name, now 'local')"
    ) in config.warnings
    # with the infra provider it prices, no warning
    manager = PluginManager(entry_points_enabled=False)
    manager.register(PricedOnly(), name="priced")
    manager.register(TenantCloud(), name="tenant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TENANT_REGION", "north")
        config = resolve(CoreSettings(data_dir=tmp_path / "data"), manager)
    assert not [w for w in config.warnings if "prices provider" in w]


def test_a_registration_can_require_only_fields_of_its_settings_model() -> None:
    from cmbcluster import AuthProviderRegistration
    from cmbcluster.oidc.plugin import OidcSettings

    with pytest.raises(ValueError, match="requires oidc_tenant, not fields of OidcSettings"):
        AuthProviderRegistration(
            name="x",
            factory=lambda ctx: None,  # type: ignore[arg-type,return-value]  # never built
            settings_model=OidcSettings,
            requires=("oidc_tenant",),
        )


def test_config_check_runs_the_factories_serve_runs(env: dict[str, str], tmp_path: Path) -> None:
    """The Kubernetes backend refuses without a kubeconfig when it is built: config check says so (a warning,
    since it may run on another machine than the server; an error with --connect, which checks as the server)."""
    aws = {
        **env, **AWS, "COGNITO_USER_POOL_ID": "eu-west-1_pool", "COGNITO_CLIENT_ID": "client",
        "KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path),
    }  # fmt: skip
    here = cmbcluster("config", "check", env=aws, cwd=tmp_path)
    assert here.returncode == 0, here.stderr
    assert "warning: serve would refuse on this machine: compute backend 'kubernetes' could not be created" in (
        here.stderr
    )
    as_server = cmbcluster("config", "check", "--connect", env=aws, cwd=tmp_path)
    assert as_server.returncode == 1 and "Traceback" not in as_server.stderr
    assert "compute backend 'kubernetes' could not be created" in as_server.stderr
    assert "configuration OK" not in as_server.stdout


def test_config_check_refuses_a_price_table_serve_would_refuse(env: dict[str, str], tmp_path: Path) -> None:
    """Found by an operator's trial: `config check` said "configuration OK" for CMBCLUSTER_PRICES that
    `serve` then refused at start."""
    for prices, said in [("notjson", "Invalid JSON"), ('{"bogus": 1}', "bogus: Extra inputs are not permitted"),
                         ('{"vcpu_hour": -1}', "vcpu_hour: Input should be greater than or equal to 0")]:  # fmt: skip
        checked = cmbcluster("config", "check", env={**env, "CMBCLUSTER_PRICES": prices}, cwd=tmp_path)
        assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr
        assert "CMBCLUSTER_PRICES is not a valid price table" in checked.stderr and said in checked.stderr
    good = cmbcluster("config", "check", env={**env, "CMBCLUSTER_PRICES": '{"vcpu_hour": 0.03}'}, cwd=tmp_path)
    assert good.returncode == 0, good.stderr


def test_config_check_reaches_services_only_with_connect(env: dict[str, str], tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    oidc = {
        **env, "CMBCLUSTER_AUTH_PROVIDERS": "oidc,local", "CMBCLUSTER_OIDC_ISSUER": f"http://127.0.0.1:{closed}",
        "CMBCLUSTER_OIDC_CLIENT_ID": "client",
    }  # fmt: skip
    offline = cmbcluster("config", "check", env=oidc, cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert "answer" not in offline.stdout + offline.stderr  # no network call without --connect

    connected = cmbcluster("config", "check", "--connect", env=oidc, cwd=tmp_path)
    assert connected.returncode == 1 and "Traceback" not in connected.stderr
    assert "storage local: answered" in connected.stdout and "auth local: answered" in connected.stdout
    discovery = f"http://127.0.0.1:{closed}/.well-known/openid-configuration"
    assert f"auth oidc: did not answer: cannot fetch the identity provider's discovery document from {discovery}" in (
        connected.stderr
    )
    assert "the configuration is valid, but auth oidc did not answer" in connected.stderr


# -- the plugin manager's conflicts, an operator's cookie domain, .env's comments ---------------------------
def test_two_plugins_registering_one_name_are_a_configuration_error(tmp_path: Path) -> None:
    manager = PluginManager(entry_points_enabled=False)
    manager.register(TenantCloud(), name="tenant-a", distribution="cmbcluster-tenant-a", version="1.0")
    with pytest.raises(PluginError):
        manager.register(TenantCloud(), name="tenant-b", distribution="cmbcluster-tenant-b", version="1.0")
    with pytest.raises(ConfigurationError) as exc_info:  # config check on the same manager: a problem, no traceback
        resolve(CoreSettings(data_dir=tmp_path / "data"), manager)
    assert exc_info.value.problems == [
        "auth provider 'tenant' is registered twice: by plugin 'tenant-a' (cmbcluster-tenant-a 1.0) and by plugin "
        "'tenant-b' (cmbcluster-tenant-b 1.0); uninstall one of them or block it with CMBCLUSTER_PLUGINS_BLOCK"
    ]


def test_an_old_cookie_domain_changes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CMBCLUSTER_ENVIRONMENTS_DOMAIN", "envs.example.org")
    core = CoreSettings(
        data_dir=tmp_path / "data", compute_backend="kubernetes", public_url="https://cmb.example.org",
        cookie_domain=".Example.org", secret_key=SecretStr("k" * 40),
    )  # fmt: skip
    config = resolve(core, PluginManager(entry_points_enabled=False))
    assert [w for w in config.warnings if "COOKIE_DOMAIN" in w] == [
        "CMBCLUSTER_COOKIE_DOMAIN=.Example.org is no longer used: the session cookie stays on the control plane's "
        "host, and an environment on a host of its own gets a cookie of that host; remove it"
    ]
    unset = resolve(core.model_copy(update={"cookie_domain": None}), PluginManager(entry_points_enabled=False))
    assert unset.core.cookie_domain is None and not [w for w in unset.warnings if "COOKIE_DOMAIN" in w]


def test_proxy_routing_with_an_environments_domain_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The control plane's proxy serves paths; a domain for host routing would be silently unused."""
    monkeypatch.setenv("CMBCLUSTER_ROUTING", "proxy")
    monkeypatch.setenv("CMBCLUSTER_ENVIRONMENTS_DOMAIN", "envs.example.org")
    core = CoreSettings(
        data_dir=tmp_path / "data", compute_backend="kubernetes", public_url="https://cmb.example.org",
        secret_key=SecretStr("k" * 40),
    )  # fmt: skip
    with pytest.raises(ConfigurationError) as exc_info:
        resolve(core, PluginManager(entry_points_enabled=False))
    assert any("unset CMBCLUSTER_ENVIRONMENTS_DOMAIN" in problem for problem in exc_info.value.problems)
    monkeypatch.setenv("CMBCLUSTER_ENVIRONMENTS_DOMAIN", "")
    assert resolve(core, PluginManager(entry_points_enabled=False)).compute.name == "kubernetes"


@pytest.mark.parametrize(
    ("variables", "routing"),
    [
        ({}, "proxy"),  # path routing: the proxy, which drops cookies an application sets for the control plane
        ({"CMBCLUSTER_ENVIRONMENTS_DOMAIN": "envs.example.org"}, "ingress"),  # host routing: the ingress's alone
        ({"BASE_DOMAIN": "envs.example.org"}, "ingress"),  # the original deployment's name keeps working
        ({"CMBCLUSTER_ROUTING": "ingress"}, "ingress"),  # ingress path routing, when asked for
    ],
)
def test_kubernetes_routing_defaults_to_the_proxy_unless_host_routing_needs_the_ingress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], routing: str
) -> None:
    from cmbcluster.kubernetes.plugin import KubernetesSettings

    monkeypatch.chdir(tmp_path)  # no .env file
    for name in ("CMBCLUSTER_ROUTING", "CMBCLUSTER_ENVIRONMENTS_DOMAIN", "BASE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert KubernetesSettings().routing == routing


def test_the_kubernetes_backend_without_its_client_says_what_to_install(env: dict[str, str], tmp_path: Path) -> None:
    """An operator's laptop without the extra (found by an outsider): the answer was the bare
    'ModuleNotFoundError: No module named kubernetes'."""
    missing = tmp_path / "missing" / "kubernetes"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'kubernetes'\")\n")
    laptop = {**env, "CMBCLUSTER_COMPUTE_BACKEND": "kubernetes", "PYTHONPATH": str(missing.parent)}
    result = cmbcluster("config", "check", env=laptop, cwd=tmp_path)
    assert "pip install 'cmbcluster-core[kubernetes]'" in result.stderr, result.stderr


def test_an_invalid_setting_is_one_error_line_naming_its_settings_model_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Every CLI error starts ``error:``; a settings model's own check names the model once, after the problem."""
    proxy = {**env, "CMBCLUSTER_COMPUTE_BACKEND": "kubernetes", "CMBCLUSTER_ROUTING": "proxy",
             "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "envs.example.org"}  # fmt: skip
    result = cmbcluster("config", "check", env=proxy, cwd=tmp_path)
    assert result.returncode == 1
    first, problem = result.stderr.splitlines()[:2]
    assert first == "error: invalid configuration:"
    assert problem.startswith("  - CMBCLUSTER_ROUTING=proxy serves environments at ") and problem.endswith(
        " (KubernetesSettings)"
    )
    assert result.stderr.count("KubernetesSettings") == 1
    # a field's problem: the variable first, the model once
    port = cmbcluster("config", "check", env={**env, "CMBCLUSTER_PORT": "0"}, cwd=tmp_path)
    assert port.stderr.splitlines()[:2] == [
        "error: invalid configuration:",
        "  - CMBCLUSTER_PORT Input should be greater than or equal to 1 (CoreSettings)",
    ]
    # a refusal of another command, the same prefix
    finish = cmbcluster("migrate", "finish", env=env, cwd=tmp_path)
    assert finish.returncode == 2 and finish.stderr.startswith("error: nothing done: ")


class NotedSettings(BaseSettings):
    tenant_region: str = "north"

    def config_notes(self) -> list[str]:
        return [f"buckets in {self.tenant_region}, with the machine's own credentials"]


class NotedCloud:
    @hookimpl
    def cmbcluster_infra_providers(self) -> Iterator[InfraProviderRegistration]:
        yield InfraProviderRegistration(name="noted", factory=_local_infra, settings_model=NotedSettings)


def test_config_check_shows_what_the_active_settings_say_of_themselves(tmp_path: Path) -> None:
    manager = PluginManager(entry_points_enabled=False)
    manager.register(NotedCloud(), name="noted")
    core = CoreSettings(data_dir=tmp_path / "data")
    assert resolve(core, manager).notes() == []  # the embedded default has nothing to say
    noted = resolve(core.model_copy(update={"infra_provider": "noted"}), manager)
    assert noted.notes() == ["buckets in north, with the machine's own credentials"]


def test_only_the_set_lines_of_dotenv_are_checked_for_misspellings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "# CMBCLUSTER_OLD_SETTING=1\n\nnot a variable\nexport CMBCLUSTER_PORTT=8001\nCMBCLUSTER_LOG_LEVEL=debug\n"
    )
    warnings = resolve(CoreSettings(data_dir=tmp_path / "data"), PluginManager(entry_points_enabled=False)).warnings
    unknown = [w for w in warnings if "is not a setting" in w]
    assert unknown == [
        "CMBCLUSTER_PORTT is not a setting of CMBCluster or of an installed plugin (did you mean CMBCLUSTER_PORT?)"
    ]


# -- cmbcluster config example: the commented .env of every registered settings model -------------------
class ExampleSettings(BaseSettings):
    """Every kind of field a plugin's model has, as `config example` writes it."""

    example_region: str = Field(
        validation_alias=AliasChoices("EXAMPLE_REGION", "EXAMPLE_LOCATION"), description="Where the buckets live."
    )
    example_issuer: str | None = Field(default=None, validation_alias="EXAMPLE_ISSUER", description="Sign-in issuer")
    example_verbose: bool = Field(default=False, validation_alias="EXAMPLE_VERBOSE")
    example_zones: list[str] = Field(default_factory=lambda: ["a", "b"], validation_alias="EXAMPLE_ZONES")
    example_tags: tuple[str, ...] = Field(default=("x", "y"), validation_alias="EXAMPLE_TAGS")
    example_scratch: Path = Field(default_factory=lambda: Path.cwd() / "scratch", validation_alias="EXAMPLE_SCRATCH")
    example_retries: int = Field(default=3, validation_alias="EXAMPLE_RETRIES")


class ExampleCloud:
    @hookimpl
    def cmbcluster_storage_backends(self) -> Iterator[StorageBackendRegistration]:
        yield StorageBackendRegistration(name="example", factory=_unused, settings_model=ExampleSettings)

    @hookimpl
    def cmbcluster_auth_providers(self) -> Iterator[AuthProviderRegistration]:
        yield AuthProviderRegistration(
            name="example-login", factory=_unused, settings_model=ExampleSettings, requires=("example_issuer",)
        )


def _unused(ctx: ProviderContext) -> Any:
    raise AssertionError("config example builds no provider")


def _example(cloud: str | None = None) -> str:
    manager = PluginManager(entry_points_enabled=False)
    manager.register(ExampleCloud(), name="examplecloud")
    return example_env(manager, cloud)


def test_config_example_writes_each_variable_with_its_description_default_and_needers() -> None:
    text = _example()
    assert text.startswith(EXAMPLE_HEADER)
    section = text[text.index("# ===== ExampleSettings") :].split("\n# =====")[0]  # up to the next model's
    assert section == (
        "# ===== ExampleSettings (used by the storage backend 'example', auth provider 'example-login') =====\n"
        "\n"
        "# Where the buckets live. Required. Also read as EXAMPLE_LOCATION.\n"
        "# EXAMPLE_REGION=\n"
        "\n"
        "# Sign-in issuer. Required by the auth provider 'example-login'.\n"
        "# EXAMPLE_ISSUER=\n"
        "\n"
        "# EXAMPLE_VERBOSE=false\n"
        "\n"
        "# EXAMPLE_ZONES=a,b\n"
        "\n"
        "# EXAMPLE_TAGS=x,y\n"
        "\n"
        "# EXAMPLE_SCRATCH=\n"  # computed where it runs: nothing to copy
        "\n"
        "# EXAMPLE_RETRIES=3\n"
    )
    # core's section and the built-in plugins' models come first; copied as it is, the file sets nothing
    assert "# ===== CoreSettings (core: every deployment) =====" in text and "# CMBCLUSTER_PORT=8000\n" in text
    assert all(not line or line.startswith("#") for line in text.splitlines())


def test_config_example_for_one_cloud_and_for_one_that_is_not_installed() -> None:
    by_plugin = _example("examplecloud")  # every provider of the plugin
    assert "# ===== ExampleSettings (used by the storage backend 'example', auth provider 'example-login')" in by_plugin
    assert "CoreSettings" in by_plugin and "KubernetesSettings" not in by_plugin and "OidcSettings" not in by_plugin
    by_provider = _example("example-login")  # that provider only
    assert "# ===== ExampleSettings (used by the auth provider 'example-login') =====" in by_provider
    with pytest.raises(ConfigurationError) as exc_info:
        _example("azure")
    assert exc_info.value.problems == [
        "no installed plugin or provider is called 'azure' (installed plugins: examplecloud, kubernetes, local, oidc)"
    ]


@pytest.mark.parametrize(
    ("trusted", "problem"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has bits set past its prefix: did you mean 10.0.0.0/8?"),
        ("10.0.0.0/8, ingress-nginx", "'ingress-nginx' is not an IP address or network (host names are not resolved)"),
        ("10.0.0/8", "'10.0.0/8' is not an IP address or network"),
        ("*, 10.0.0.1", "* (any proxy) stands alone"),
    ],
)
def test_a_trusted_proxy_no_client_address_could_match_is_refused(
    env: dict[str, str], tmp_path: Path, trusted: str, problem: str
) -> None:
    """uvicorn would keep such an entry as a literal that never matches and believe no proxy at all:
    behind the ingress, every user would share its address and so one sign-in limit."""
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_FORWARDED_ALLOW_IPS": trusted}, cwd=tmp_path)
    assert result.returncode == 1
    assert "CMBCLUSTER_FORWARDED_ALLOW_IPS" in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr


def test_trusted_proxies_are_addresses_networks_any_or_none(tmp_path: Path) -> None:
    def trusted(value: str) -> str:
        return CoreSettings(_env_file=None, data_dir=tmp_path, forwarded_allow_ips=value).forwarded_allow_ips  # type: ignore[call-arg]

    assert trusted(" 10.0.0.0/8 , 192.168.1.7,fd00::/8 ") == "10.0.0.0/8,192.168.1.7,fd00::/8"
    assert trusted("*") == "*"
    assert trusted("") == ""  # served directly: believe no proxy


def test_a_request_deadline_no_client_could_meet_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    """Under a second, a phone on a slow network could not send its headers: every request a 408."""
    result = cmbcluster("config", "check", env={**env, "CMBCLUSTER_REQUEST_TIMEOUT_SECONDS": "0.0001"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "CMBCLUSTER_REQUEST_TIMEOUT_SECONDS Input should be greater than or equal to 1" in result.stderr


def test_config_example_is_printed_while_the_configuration_it_would_mend_is_invalid(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = cmbcluster("config", "example", env={**env, "CMBCLUSTER_PORT": "not a port"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# CMBCLUSTER_PORT=8000\n" in result.stdout and "# ===== KubernetesSettings" in result.stdout
    assert result.stderr.startswith("note: the configuration is invalid (`cmbcluster config check` says why)")


def test_a_command_line_options_own_variable_is_not_taken_for_a_misspelt_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`cmbcluster infra --state-dir` reads CMBCLUSTER_INFRA_STATE_DIR: `config check` called it
    unknown ("did you mean CMBCLUSTER_DATA_DIR?") to the operator who followed the docs."""
    import typer

    from cmbcluster.cli import app

    def envvars(command: Any) -> Iterator[str]:  # typer's own click command
        for param in command.params:
            yield from [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
        for sub in getattr(command, "commands", {}).values():
            yield from envvars(sub)

    options = {name for name in envvars(typer.main.get_command(app)) if name.startswith("CMBCLUSTER_")}
    assert "CMBCLUSTER_INFRA_STATE_DIR" in options
    result = cmbcluster("config", "check", env={**env, **dict.fromkeys(options, str(tmp_path))}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "is not a setting" not in result.stderr
