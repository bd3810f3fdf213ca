"""What a plugin gets from the contract without writing it: each interface's optional methods and
their documented defaults, the value types' own checks, and the settings accessors every hook uses.

A third party implements only the abstract methods; core relies on these defaults to behave as
documented (a backend that cannot measure hides the figures, a provisioner without DNS refuses
`infra dns` with a clear message, a provider without refresh asks the user to sign in again).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from cmbcluster.config import resolve
from cmbcluster.errors import AuthenticationFailed, ConfigurationError, InvalidRequest, PluginError
from cmbcluster.interfaces import (
    AuthorizationRequest,
    AuthProvider,
    ComputeBackend,
    ComputePrice,
    DeploymentRecord,
    DnsRecord,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    MountRequest,
    PlannedStep,
    PodContext,
    PriceTable,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
    TokenSet,
    UserInfo,
    UserRef,
)
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import InfraProviderRegistration, ProviderContext, StorageBackendRegistration
from cmbcluster.settings import CoreSettings


class OnlyTheAbstractAuth(AuthProvider):
    def authorization_url(self, request: AuthorizationRequest) -> str:
        return f"https://login.example.org/?state={request.state}"

    def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        return TokenSet(id_token=code)

    def validate_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        if token != "good":
            raise AuthenticationFailed("bad token")
        return {"sub": "s1", "email": "ada@example.org"}

    def user_info(self, claims: dict[str, Any]) -> UserInfo:
        return UserInfo(provider="plain", subject=claims["sub"], email=claims["email"])


def test_an_auth_provider_without_refresh_refuses_it_and_verifies_api_tokens_itself() -> None:
    provider = OnlyTheAbstractAuth()
    # an API client's bearer token: validated and normalised by the provider's own two methods
    assert provider.exchange_token("good") == UserInfo(provider="plain", subject="s1", email="ada@example.org")
    with pytest.raises(AuthenticationFailed, match="bad token"):
        provider.exchange_token("forged")
    # no refresh: the session ends and the user signs in again (core catches AuthenticationFailed)
    with pytest.raises(AuthenticationFailed, match=r"^OnlyTheAbstractAuth cannot refresh tokens$"):
        provider.refresh("r1")
    provider.check_ready()  # nothing to reach: ready
    provider.close()


class OnlyTheAbstractCompute(ComputeBackend):
    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        raise AssertionError("not started here")

    def stop(self, environment_id: str) -> None:
        pass

    def status(self, environment_id: str) -> EnvironmentStatus:
        return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.MISSING)

    def list_managed(self) -> list[EnvironmentStatus]:
        return []

    def delete(self, environment_id: str) -> None:
        pass


def test_a_compute_backend_gets_the_documented_defaults() -> None:
    backend = OnlyTheAbstractCompute()
    assert backend.logs("e1") == ""  # the web UI shows no output rather than failing
    assert backend.resource_use(["e1"]) is None  # cannot measure: the web UI hides the figures
    assert backend.upstream("e1") is None  # served another way (an ingress), not by the proxy
    assert backend.check_command(["jupyter", "lab"]) is None  # cannot tell: every application is offered
    assert backend.stops_with_control_plane is False  # environments outlive the control plane
    backend.forget_user("u1")
    deleted: list[str] = []

    class RecordsDeletes(OnlyTheAbstractCompute):
        def delete(self, environment_id: str) -> None:
            deleted.append(environment_id)

    RecordsDeletes().remove_unrecorded("e1")  # an environment without a record: removed as a delete removes it
    assert deleted == ["e1"]
    backend.on_status_change(lambda environment_id: None)  # no notifications: core polls
    backend.check_ready()
    backend.close()


class OnlyTheAbstractProvisioner(Provisioner):
    provider = "tenant"

    @property
    def deployment(self) -> str:
        return "lab"

    def plan(self) -> list[PlannedStep]:
        return []

    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        pass

    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        pass

    def resource_exists(self, resource: ResourceRecord) -> bool:
        return False


def test_a_provisioner_without_dns_or_retained_resources_says_so(tmp_path: Path) -> None:
    provisioner = OnlyTheAbstractProvisioner()
    record = DeploymentRecord(tmp_path / "lab.json", provider="tenant", deployment="lab")
    first = ResourceRecord(step="network", kind="network", id="n1", name="lab-net")
    second = ResourceRecord(step="cluster", kind="cluster", id="c1", name="lab")
    assert provisioner.deletion_order([first, second]) == [second, first]  # the reverse of creation
    assert provisioner.retained(record) == []
    assert provisioner.required_tools(ProvisioningOptions()) == []
    assert provisioner.check_up(lambda note: None) == []
    assert provisioner.documents() == {}
    provisioner.preflight()
    provisioner.check_down(record, ProvisioningOptions())
    provisioner.close()
    # what it cannot do is refused with a message naming the provider, never a traceback
    with pytest.raises(InvalidRequest, match=r"^the tenant infra provider cannot delete bucket data \(b-1\)$"):
        provisioner.delete_retained(ResourceRecord(step="data", kind="bucket", id="b-1", name="data"), None)  # type: ignore[arg-type]
    dns = DnsRecord(name="cmb.example.org", type="A", values=("192.0.2.1",))
    with pytest.raises(InvalidRequest, match=r"^the tenant infra provider does not manage DNS records$"):
        provisioner.upsert_dns([dns])
    with pytest.raises(InvalidRequest, match=r"^the tenant infra provider does not manage DNS records$"):
        provisioner.delete_dns(dns)
    nameless = OnlyTheAbstractProvisioner()
    nameless.provider = ""
    with pytest.raises(InvalidRequest, match=r"^the configured infra provider does not manage DNS records$"):
        nameless.upsert_dns([dns], dry_run=True)


def test_a_price_table_says_where_its_prices_come_from() -> None:
    assert PriceTable(provider="tenant").disclaimer == (
        "no prices are configured for this deployment: usage only, no amounts"
    )
    operators = PriceTable(provider="tenant", cluster_hour=0.1)
    assert operators.disclaimer == "estimates from the operator's prices (CMBCLUSTER_PRICES), not a bill"
    listed = PriceTable(
        provider="tenant", compute=ComputePrice(vcpu_hour=0.04, gib_hour=0.005),
        sources=("https://tenant.example.org/pricing",), read_on=dt.date(2026, 11, 1),
    )  # fmt: skip
    assert listed.disclaimer == "estimates from tenant list prices read on 2026-11-01, not a bill"
    changed = PriceTable(
        provider="tenant", storage_gb_month={"standard": 0.02}, sources=("https://tenant.example.org/pricing",),
        overridden=("cluster_hour", "standard"),
    )  # fmt: skip
    assert changed.disclaimer == (
        "estimates from tenant list prices, with the operator's own prices for cluster_hour, standard, not a bill"
    )
    assert changed.describe()["estimate"] == changed.disclaimer


def _mount(**changes: Any) -> MountRequest:
    fields: dict[str, Any] = {
        "bucket": "b1", "mount_path": "/home/jovyan/data", "user": UserRef(id="u1"), "environment_id": "e1",
    }  # fmt: skip
    return MountRequest(**{**fields, **changes})


def test_a_mount_request_refuses_paths_that_escape_or_inject_mount_options() -> None:
    assert _mount(subpath="results/2026").subpath == "results/2026"
    for path in ("data", "/home/jovyan/../etc", "/home/./x"):
        with pytest.raises(InvalidRequest, match=r"must be absolute, without '\.' or '\.\.'"):
            _mount(mount_path=path)
    for subpath in ("a,allow_other", "uid=0", 'a"b', "a'b"):
        with pytest.raises(InvalidRequest, match="must not contain ',', '=' or quotes"):
            _mount(subpath=subpath)
    with pytest.raises(InvalidRequest):
        _mount(subpath="../other-user")  # an object key's own rules apply first


class TenantSettings(BaseSettings):
    tenant_region: str = "north"


class OtherSettings(BaseSettings):
    other_zone: str = "z"


def test_a_factory_reads_its_own_and_the_other_active_providers_settings(tmp_path: Path) -> None:
    core = CoreSettings(data_dir=tmp_path)
    tenant, other = TenantSettings(), OtherSettings()
    # a compute backend's context: no settings of its own, every active provider's for its pod decorators
    shared = ProviderContext(core=core, active_settings={OtherSettings: other})
    assert shared.settings(OtherSettings) is other and shared.settings(TenantSettings) is None
    # asking for a model nobody declared is the plugin's mistake, said as one (config check exits 1)
    with pytest.raises(PluginError, match="asks for the settings model TenantSettings, which its registration"):
        shared.require_settings(TenantSettings)
    # a provider's own settings are found beside the others'
    own = ProviderContext(core=core, provider_settings=tenant, active_settings={OtherSettings: other})
    assert own.require_settings(TenantSettings) is tenant and own.require_settings(OtherSettings) is other


def test_a_factory_names_the_deployment_by_its_public_host(tmp_path: Path) -> None:
    served = CoreSettings(data_dir=tmp_path, host="127.0.0.1")
    assert ProviderContext(core=served).public_host == "127.0.0.1"  # no public URL: the address it serves on
    public = served.model_copy(update={"public_url": "https://cmb.example.org:8443/base"})
    assert ProviderContext(core=public).public_host == "cmb.example.org"
    assert ProviderContext(core=public).data_dir == tmp_path


def _factory(ctx: ProviderContext) -> Any:
    raise AssertionError("never built")


def test_requires_given_as_one_string_is_refused_with_the_fix() -> None:
    """``requires="tenant_region"`` would be read as eleven one-letter fields: refused, saying why."""
    with pytest.raises(ValueError, match=r"^storage backend 'tenant': requires must be a tuple of field names"):
        StorageBackendRegistration(
            name="tenant", factory=_factory, settings_model=TenantSettings, requires="tenant_region",  # type: ignore[arg-type]
        )  # fmt: skip


def test_a_registration_refuses_factories_that_are_not_callable() -> None:
    with pytest.raises(ValueError, match=r"^storage backend 'tenant': factory must be a callable"):
        StorageBackendRegistration(name="tenant", factory="tenant.make")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^infra provider 'tenant': provisioner must be a callable"):
        InfraProviderRegistration(name="tenant", factory=_factory, provisioner="tenant.up")  # type: ignore[arg-type]
    without = InfraProviderRegistration(name="tenant", factory=_factory)
    with pytest.raises(PluginError, match=r"^infra provider 'tenant' has no provisioner$"):
        without.create_provisioner(None)  # type: ignore[arg-type]  # never read: refused first


def test_a_resolved_configuration_answers_which_providers_serve_it(tmp_path: Path) -> None:
    config = resolve(CoreSettings(data_dir=tmp_path / "data"), PluginManager(entry_points_enabled=False))
    assert config.serves("local") and config.serves("local", "storage") and not config.serves("tenant")
    assert config.serves("local", "auth", "infra") and not config.serves("tenant", "storage", "infra")
    assert config.settings(TenantSettings) is None  # no active provider uses it: a deploy hook returns at once
    with pytest.raises(ValueError, match=r"^unknown concern 'bucket': one of storage, compute, infra, auth$"):
        config.serves("local", "bucket")  # type: ignore[arg-type]


def test_a_pod_context_gives_the_active_providers_settings() -> None:
    tenant = TenantSettings()
    context = PodContext(
        user=UserRef(id="u1"), environment_id="e1", namespace="users", identity=None,
        storage_backend="tenant", infra_provider=None, active_settings={TenantSettings: tenant},
    )  # fmt: skip
    assert context.settings(TenantSettings) is tenant and context.settings(OtherSettings) is None
    assert context.require_settings(TenantSettings) is tenant
    with pytest.raises(ConfigurationError) as exc_info:  # a decorator that cannot work without them says so
        context.require_settings(OtherSettings)
    assert exc_info.value.problems == ["no active provider uses the settings model OtherSettings"]
