"""`cmbcluster infra`, cloud-agnostic: core's provisioning engine, its record, and the CLI driving a
third party's provisioner registered through the same infra hook as AWS and GCP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cmbcluster import provisioning
from cmbcluster.commands.infra import dns_records
from cmbcluster.errors import ConfigurationError, Conflict, InvalidRequest, ProviderUnavailable
from cmbcluster.interfaces import (
    DNS_RECORD_KIND,
    DeploymentRecord,
    DnsRecord,
    PlannedStep,
    ProgressEvent,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
    Tool,
)
from cmbcluster.provisioning import ProvisioningRecord, StepRun
from cmbcluster.testing.process import clean_environ, run_cli

# A third party's cloud, as an installed distribution would ship it: an entry point in the
# `cmbcluster` group, an infra registration with a `provisioner` factory. Its "cloud" is a JSON
# file (TOYCLOUD_FILE); TOYCLOUD_FAIL_AT makes one step fail, as a cloud error would.
TOYCLOUD = """
from __future__ import annotations

import json
import os
from pathlib import Path

from cmbcluster import InfraProviderRegistration, hookimpl
from cmbcluster.errors import ProviderUnavailable
from cmbcluster.interfaces import DnsInfo, InfraProvider, PlannedStep, Provisioner, RegistryInfo, ResourceRecord

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


class ToyInfra(InfraProvider):
    def ensure_user_identity(self, user, *, namespace):
        return None

    def delete_user_identity(self, user, *, namespace):
        return None

    def registry(self):
        return RegistryInfo(host="registry.toy.example", repository_prefix="team/cmb")

    def dns(self):
        return DnsInfo(domain="toy.example", environments_domain="toy.example")


class ToyProvisioner(Provisioner):
    provider = "toycloud"

    def __init__(self):
        self.cloud = Path(os.environ["TOYCLOUD_FILE"])

    @property
    def deployment(self):
        return "toy"

    def _load(self):
        return json.loads(self.cloud.read_text()) if self.cloud.exists() else {}

    def plan(self):
        names = ("net", "db", "k8s")
        return [PlannedStep(name=n, description=f"toy {n}", creates=(f"toy/{n} toy-{n}",)) for n in names]

    def apply_step(self, step, ctx):
        if os.environ.get("TOYCLOUD_FAIL_AT") == step.name:
            raise ProviderUnavailable(f"the toy cloud refused {step.name}")
        cloud = self._load()
        record = ResourceRecord(step=step.name, kind=f"toy/{step.name}", id=f"toy-{step.name}", name=f"toy-{step.name}")
        if record.id in cloud:
            ctx.adopted(record)
        else:
            cloud[record.id] = step.name
            self.cloud.write_text(json.dumps(cloud))
            ctx.created(record)

    def delete_resource(self, resource, ctx):
        cloud = self._load()
        cloud.pop(resource.id, None)
        self.cloud.write_text(json.dumps(cloud))

    def resource_exists(self, resource):
        return resource.id in self._load()


@hookimpl
def cmbcluster_infra_providers():
    yield InfraProviderRegistration(
        name="toycloud", factory=lambda ctx: ToyInfra(), provisioner=lambda ctx: ToyProvisioner()
    )
"""


@pytest.fixture
def toycloud(tmp_path: Path) -> dict[str, str]:
    """The toy plugin installed as a distribution on PYTHONPATH; the environment that selects it."""
    site = tmp_path / "site"
    (site / "cmbcluster_toycloud-0.1.dist-info").mkdir(parents=True)
    (site / "cmbcluster_toycloud.py").write_text(TOYCLOUD)
    info = site / "cmbcluster_toycloud-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmbcluster-toycloud\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cmbcluster]\ntoycloud = cmbcluster_toycloud\n")
    return {
        **clean_environ(),
        "PYTHONPATH": str(site),
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
        "CMBCLUSTER_INFRA_PROVIDER": "toycloud",
        "TOYCLOUD_FILE": str(tmp_path / "cloud.json"),
    }


def cloud(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "cloud.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def test_a_third_party_provisioner_is_driven_through_the_same_hook(toycloud: dict[str, str], tmp_path: Path) -> None:
    plan = run_cli("infra", "plan", env=toycloud, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "toycloud deployment toy (3 steps)" in plan.stdout and "+ toy/net toy-net" in plan.stdout
    assert cloud(tmp_path) == {}

    failed = run_cli("infra", "up", env={**toycloud, "TOYCLOUD_FAIL_AT": "k8s"}, cwd=tmp_path)
    assert failed.returncode == 1 and "the toy cloud refused k8s" in failed.stderr
    assert "Traceback" not in failed.stderr and set(cloud(tmp_path)) == {"toy-net", "toy-db"}

    resumed = run_cli("infra", "up", env=toycloud, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("adopted") == 2 and resumed.stdout.count("created") == 1
    assert set(cloud(tmp_path)) == {"toy-net", "toy-db", "toy-k8s"}

    status = run_cli("infra", "status", "--json", env=toycloud, cwd=tmp_path)
    assert [s["state"] for s in json.loads(status.stdout)] == ["done", "done", "done"]
    record = tmp_path / "data" / "infra" / "toycloud-toy.json"
    assert [r["id"] for r in json.loads(record.read_text())["resources"]] == ["toy-net", "toy-db", "toy-k8s"]

    down = run_cli("infra", "down", "--yes", env=toycloud, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert down.stdout.index("deleted toy/k8s") < down.stdout.index("deleted toy/net")  # reverse order
    assert cloud(tmp_path) == {} and json.loads(record.read_text())["resources"] == []
    again = run_cli("infra", "down", "--yes", env=toycloud, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to delete" in again.stdout

    state_dir = tmp_path / "elsewhere"
    moved = run_cli("infra", "up", "--state-dir", str(state_dir), env=toycloud, cwd=tmp_path)
    assert moved.returncode == 0 and (state_dir / "toycloud-toy.json").exists()
    images = run_cli("images", "push", "--dry-run", "--tag", "t1", "--image", "environment", env=toycloud, cwd=tmp_path)
    assert images.stdout.splitlines() == ["would run: docker push registry.toy.example/team/cmb/environment:t1"]


def test_providers_without_a_provisioner_and_bad_options_are_clear_errors(tmp_path: Path) -> None:
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")}
    local = run_cli("infra", "plan", env=env, cwd=tmp_path)
    assert local.returncode == 1 and "the infra provider 'local' cannot provision infrastructure" in local.stderr
    bad = run_cli("infra", "up", "--addons", "sometimes", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    missing = run_cli("infra", "dns", env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "cannot provision" in missing.stderr
    unknown = run_cli("infra", "plan", env={**env, "CMBCLUSTER_INFRA_PROVIDER": "azure"}, cwd=tmp_path)
    assert unknown.returncode == 1 and "azure" in unknown.stderr and "Traceback" not in unknown.stderr


# -- the engine, in process ------------------------------------------------------------------


class MemoryProvisioner(Provisioner):
    """Three steps over a dict standing in for a cloud; ``fail_at`` makes a step fail once."""

    provider = "memory"

    def __init__(self) -> None:
        self.cloud: dict[str, str] = {}
        self.fail_at: str | None = None

    @property
    def deployment(self) -> str:
        return "demo"

    def plan(self) -> list[PlannedStep]:
        return [
            PlannedStep(name="network", description="a network", creates=("net n1",)),
            PlannedStep(name="cluster", description="a cluster", creates=("cluster c1",)),
            PlannedStep(name="addon", description="an add-on", external=True),
        ]

    def apply_step(self, step: PlannedStep, ctx: StepContext) -> None:
        if self.fail_at == step.name:
            self.fail_at = None
            raise ProviderUnavailable(f"{step.name} refused")
        if step.external:
            if ctx.run(["true"]):
                ctx.created(ResourceRecord(step=step.name, kind="helm/release", id="addon"))
            return
        resource_id = {"network": "n1", "cluster": "c1"}[step.name]
        record = ResourceRecord(step=step.name, kind=step.name, id=resource_id, name=resource_id)
        if resource_id in self.cloud:
            ctx.adopted(record)
        else:
            self.cloud[resource_id] = step.name
            ctx.created(record)

    def delete_resource(self, resource: ResourceRecord, ctx: StepContext) -> None:
        self.cloud.pop(resource.id, None)

    def resource_exists(self, resource: ResourceRecord) -> bool:
        return resource.id in self.cloud or resource.kind == "helm/release"


@pytest.fixture
def memory() -> Iterator[MemoryProvisioner]:
    yield MemoryProvisioner()


def test_the_record_resumes_a_failed_up_and_down_empties_it(memory: MemoryProvisioner, tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    memory.fail_at = "cluster"
    events: list[ProgressEvent] = []
    with pytest.raises(ProviderUnavailable):
        provisioning.up(memory, record, ProvisioningOptions(addons="print"), progress=events.append)
    assert [e.action for e in events][-1] == "failed"
    reloaded = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    assert [r.id for r in reloaded.resources] == ["n1"] and reloaded.completed_steps == ["network"]

    provisioning.up(memory, reloaded, ProvisioningOptions(addons="print"))
    assert memory.cloud == {"n1": "network", "c1": "cluster"}
    states = {s.step: s.state for s in provisioning.status(memory, reloaded)}
    assert states == {"network": "done", "cluster": "done", "addon": "pending"}  # printed, not run
    del memory.cloud["c1"]  # deleted behind our back
    assert {s.step: s.state for s in provisioning.status(memory, reloaded)}["cluster"] == "missing"

    provisioning.down(memory, reloaded)
    assert reloaded.resources == [] and reloaded.completed_steps == []
    assert json.loads(reloaded.path.read_text())["resources"] == []


def test_addon_steps_run_or_are_skipped_as_told(memory: MemoryProvisioner, tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    events: list[ProgressEvent] = []
    provisioning.up(memory, record, ProvisioningOptions(addons="skip"), progress=events.append)
    assert "skipped (--addons skip)" in [e.message for e in events] and not record.find("helm/release")
    provisioning.up(memory, record, ProvisioningOptions(addons="install"))
    assert record.find("helm/release") and all(s.state == "done" for s in provisioning.status(memory, record))


def test_two_runs_on_one_deployment_cannot_interleave(memory: MemoryProvisioner, tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    with record.locked(), pytest.raises(Conflict, match="another `cmbcluster infra` run"):
        provisioning.up(memory, record)


def test_an_unreadable_or_foreign_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "memory-demo.json"
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="unreadable"):
        ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    path.write_text(json.dumps({"version": 1, "provider": "aws", "deployment": "other", "resources": []}))
    with pytest.raises(ConfigurationError, match="belongs to aws/other"):
        ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")


def test_dns_records_for_the_ui_host_and_the_environments_domain() -> None:
    a, wildcard = dns_records("CMB.Example.org.", "203.0.113.9", environments_domain="Envs.Example.org")
    assert (a.name, a.type, a.values) == ("cmb.example.org", "A", ("203.0.113.9",))
    assert wildcard.name == "*.envs.example.org"  # where environments are served, not *.<UI host>
    [cname] = dns_records("cmb.example.org", "lb-1.elb.amazonaws.com")  # path routing: the UI host only
    assert cname.type == "CNAME"
    for domain, target in (("localhost", "1.2.3.4"), ("cmb.example.org", "not a host"), ("bad_.org", "1.2.3.4")):
        with pytest.raises(InvalidRequest):
            dns_records(domain, target)
    with pytest.raises(InvalidRequest, match="environments domain"):
        dns_records("cmb.example.org", "1.2.3.4", environments_domain="bad_")


def test_a_failing_external_command_is_reported_with_its_output(tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    ctx = StepRun("addon", record, ProvisioningOptions(), lambda event: None)
    with pytest.raises(ProviderUnavailable, match=r"exit 3\): boom"):
        ctx.run(["sh", "-c", "echo boom >&2; exit 3"])


class GuardedProvisioner(MemoryProvisioner):
    """The memory cloud with what `up` checks first (tools, problems), what `down` keeps (a user's
    bucket), and DNS records in a dict."""

    def __init__(self, *, tools: tuple[str, ...] = (), problems: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tools, self.problems = tools, problems
        self.kept = {"bucket-of-vera": "a user's bucket, with all its data"}
        self.records: dict[tuple[str, str], tuple[str, ...]] = {}

    def required_tools(self, options: ProvisioningOptions) -> list[Tool]:
        return [Tool(name=name, why=f"{name} is needed") for name in self.tools]

    def check_up(self, note: Callable[[str], None]) -> list[str]:
        note("checked what could be checked")
        return list(self.problems)

    def retained(self, record: DeploymentRecord) -> list[ResourceRecord]:
        return [ResourceRecord(step="retained", kind="bucket", id=k, name=k, attributes={"why": v})
                for k, v in self.kept.items()]  # fmt: skip

    def delete_retained(self, resource: ResourceRecord, ctx: StepContext) -> None:
        assert "c1" not in self.cloud, "what is kept goes after what used it"
        del self.kept[resource.id]

    def deletion_order(self, resources: Sequence[ResourceRecord]) -> list[ResourceRecord]:
        ordered = list(reversed(resources))
        return [r for r in ordered if r.kind != "bucket"] + [r for r in ordered if r.kind == "bucket"]

    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        if not dry_run:
            for r in records:
                self.records = {k: v for k, v in self.records.items() if k[0] != r.name.rstrip(".") + "."}
                self.records[(r.name.rstrip(".") + ".", r.type)] = r.values
        return [f"UPSERT {r.type} {r.name}" for r in records]

    def delete_dns(self, record: DnsRecord) -> bool:
        return self.records.pop((record.name, record.type), None) == record.values


def test_up_names_every_missing_tool_and_problem_before_creating_anything(tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    guarded = GuardedProvisioner(tools=("no-such-tool-a", "no-such-tool-b", "sh"))
    with pytest.raises(ConfigurationError) as missing:
        provisioning.up(guarded, record)
    assert "`no-such-tool-a` is not installed" in str(missing.value) and "no-such-tool-b" in str(missing.value)
    assert "`sh`" not in str(missing.value) and guarded.cloud == {} and record.resources == []

    guarded = GuardedProvisioner(problems=("the credentials may not make clusters", "no DNS zone holds x.org"))
    events: list[ProgressEvent] = []
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(guarded, record, progress=events.append)
    assert "may not make clusters" in str(refused.value) and "no DNS zone" in str(refused.value)
    assert "nothing was created" in str(refused.value) and guarded.cloud == {}
    assert "checked what could be checked" in [e.message for e in events]


def test_down_keeps_what_the_deployment_made_unless_told_and_removes_its_dns_records(tmp_path: Path) -> None:
    record = ProvisioningRecord.for_deployment(tmp_path, provider="memory", deployment="demo")
    guarded = GuardedProvisioner()
    provisioning.up(guarded, record, ProvisioningOptions(addons="print"))
    records = dns_records("cmb.example.org", "203.0.113.9", environments_domain="envs.example.org")
    assert provisioning.dns(guarded, record, records, dry_run=True) and record.find(DNS_RECORD_KIND) == []
    provisioning.dns(guarded, record, records)
    assert {r.name for r in record.find(DNS_RECORD_KIND)} == {"cmb.example.org.", "*.envs.example.org."}
    # pointed at a load balancer later: the CNAME replaces the A record, in the cloud and in the record
    provisioning.dns(guarded, record, dns_records("cmb.example.org", "lb.example.net"))
    assert [(r.name, r.attributes["type"]) for r in record.find(DNS_RECORD_KIND, name="cmb.example.org.")] == [
        ("cmb.example.org.", "CNAME")
    ]

    events: list[ProgressEvent] = []
    provisioning.down(guarded, record, progress=events.append)
    deleted = [e.message for e in events if e.action == "deleted"]
    assert deleted[0].startswith("dns/record")  # the names first: nothing points at a load balancer that goes
    assert guarded.records == {} and guarded.cloud == {} and record.resources == []
    assert guarded.kept and any("kept on purpose: bucket bucket-of-vera" in e.message for e in events)

    provisioning.down(guarded, record, ProvisioningOptions(delete_retained=True))
    assert guarded.kept == {} and provisioning.retained(guarded, record) == []


def test_the_cli_lists_what_down_keeps(toycloud: dict[str, str], tmp_path: Path) -> None:
    up = run_cli("infra", "up", env=toycloud, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    down = run_cli("infra", "down", "--yes", env=toycloud, cwd=tmp_path)
    assert down.returncode == 0 and "keeping" not in down.stdout  # the toy cloud keeps nothing
    missing = run_cli("infra", "kubeconfig", env=toycloud, cwd=tmp_path)
    assert missing.returncode == 1 and "no kubeconfig" in missing.stderr
    given = run_cli("infra", "kubeconfig", env={**toycloud, "CMBCLUSTER_INFRA_KUBECONFIG": str(tmp_path / "kc")},
                    cwd=tmp_path)  # fmt: skip
    assert given.returncode == 1 and str(tmp_path / "kc") in given.stderr
    (tmp_path / "kc").write_text("{}")
    given = run_cli("infra", "kubeconfig", env={**toycloud, "CMBCLUSTER_INFRA_KUBECONFIG": str(tmp_path / "kc")},
                    cwd=tmp_path)  # fmt: skip
    assert given.returncode == 0 and given.stdout.strip() == str(tmp_path / "kc")
