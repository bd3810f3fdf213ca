"""``cmbcluster deploy`` without a cluster: the values it renders from the configuration and the
plugins' hook, its dry run and --print-values (run as the real command), and its clear errors
when the configuration cannot be deployed, helm is missing, or helm fails."""

from __future__ import annotations

import json
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import AWS_ENV, CHART, GCP_ENV, helm, helm_binary, manifests, one  # tests/helm is on sys.path

from cmbcluster import __version__, hookimpl
from cmbcluster.commands.deploy import HIDDEN, deep_merge, rbac_values, render_values
from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.errors import ConfigurationError, PluginError
from cmbcluster.plugins import PluginManager
from cmbcluster.testing.process import clean_environ, run_cli

SECRETS = ("google-client-secret-value", "cognito-client-secret-value", "db-password-value", "k" * 40)


def deploy(*args: str, env: dict[str, str], cwd: Path) -> Any:
    return run_cli("deploy", *args, env=clean_environ(env), cwd=cwd)


def dry_run_output(stdout: str) -> tuple[list[str], dict[str, Any]]:
    """(the helm command, the values) from ``deploy --dry-run``'s output."""
    lines = stdout.splitlines()
    assert lines[0] == "# helm command (the values below on its standard input):", stdout
    assert lines[2] == "# values (secrets hidden):", stdout
    return shlex.split(lines[1]), yaml.safe_load("\n".join(lines[3:]))


# -- as the operator runs it --------------------------------------------------------------------------
def test_dry_run_for_gcp_prints_the_helm_command_and_the_values(tmp_path: Path) -> None:
    result = deploy("--dry-run", "--namespace", "research", env=GCP_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command, values = dry_run_output(result.stdout)
    assert command[:5] == ["helm", "upgrade", "--install", "cmbcluster", str(CHART)]
    assert command[5:] == [
        "--namespace",
        "research",
        "--create-namespace",
        "--wait",
        "--timeout",
        "10m",
        "--values",
        "-",
    ]
    assert values["global"]["cloudProvider"] == "gcp"
    assert values["global"]["gcp"] == {
        "projectId": "cmb-research",
        "projectNumber": "123456789",
        "region": "europe-west1",
        "clusterName": "cmbcluster",
        "artifactRegistry": "europe-west1-docker.pkg.dev/cmb-research/cmbcluster",
        "serviceAccountEmail": "cmbcluster-controlplane@cmb-research.iam.gserviceaccount.com",
    }
    assert values["storage"] == {"driver": "gcsfuse"}
    assert values["auth"] == {"provider": "gcp"}
    assert values["image"] == {
        "registry": "europe-west1-docker.pkg.dev/cmb-research/cmbcluster", "repository": "controlplane",
        "tag": __version__,
    }  # fmt: skip
    assert values["ingress"] == {"host": "cmb.example.org", "tls": {"enabled": True}}
    assert values["environments"] == {"domain": "envs.example.org"}
    assert values["config"]["CMBCLUSTER_ADMIN_EMAILS"] == "pi@example.org"
    assert values["config"]["GOOGLE_CLIENT_ID"] == "1234.apps.googleusercontent.com"
    assert "secretConfig" not in values  # secrets are left out and named, never a placeholder
    assert "# not shown (secrets; `cmbcluster deploy` sends them): secretConfig.GOOGLE_CLIENT_SECRET" in result.stdout
    sent = result.stdout.splitlines()[-1]
    assert sent.startswith("# settings sent: ") and "CMBCLUSTER_ADMIN_EMAILS" in sent and "GOOGLE_CLIENT_ID" in sent
    assert sent.endswith("; secret: GOOGLE_CLIENT_SECRET")
    assert values["rbac"] == rbac_values()
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)


def test_dry_run_for_aws_prints_the_helm_command_and_the_values(tmp_path: Path) -> None:
    own = tmp_path / "ours.yaml"
    own.write_text("controlPlane:\n  replicas: 3\n")
    result = deploy("--dry-run", "--values", str(own), "--release", "cmb", "--no-wait", env=AWS_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command, values = dry_run_output(result.stdout)
    # namespace: CMBCLUSTER_NAMESPACE's default; the operator's file comes after the rendered values
    assert command[1:] == ["upgrade", "--install", "cmb", str(CHART), "--namespace", "cmbcluster",
                           "--create-namespace", "--values", "-", "--values", str(own)]  # fmt: skip
    assert values["global"] == {
        "cloudProvider": "aws",
        "aws": {
            "region": "eu-west-1",
            "accountId": "123456789012",
            "eksClusterName": "cmb-eks",
            "ecrRegistryUrl": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "controlPlaneRoleArn": "arn:aws:iam::123456789012:role/cmbcluster-infra/cmb-eks/cmb-eks-controlplane",
        },
    }
    assert values["storage"] == {"driver": "mountpoint-s3"}
    assert values["image"] == {
        "registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cmb-eks", "repository": "controlplane",
        "tag": __version__,
    }  # fmt: skip
    assert "database" not in values and "secretKey" not in values and "secretConfig" not in values
    assert "secretConfig.COGNITO_CLIENT_SECRET, database.url, secretKey.value" in result.stdout
    assert {"COGNITO_USER_POOL_ID", "COGNITO_CLIENT_ID", "AWS_REGION"} <= set(values["config"])
    assert "CMBCLUSTER_DATABASE_URL" not in values["config"]  # the chart keeps it in its Secret
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)


@pytest.mark.parametrize("env", [GCP_ENV, AWS_ENV], ids=["gcp", "aws"])
def test_the_chart_accepts_what_deploy_renders(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = render_values(resolve(load_core_settings()), namespace="cmbcluster")  # exactly what helm gets
    rendered = helm(
        "template", "cmbcluster", str(CHART), "--namespace", "cmbcluster", "--values", "-", input_values=values
    )
    assert rendered.returncode == 0, rendered.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]  # the cloud identity reached the chart


def test_proxy_routing_set_for_the_deploy_reaches_the_control_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**GCP_ENV, "CMBCLUSTER_ROUTING": "proxy", "CMBCLUSTER_ENVIRONMENTS_DOMAIN": ""}.items():
        monkeypatch.setenv(key, value)
    values = render_values(resolve(load_core_settings()), namespace="cmbcluster")
    assert values["environments"]["routing"] == "proxy"
    assert "CMBCLUSTER_ROUTING" not in values.get("config", {})  # a value of the chart's own, not passed as-is
    rendered = helm(
        "template", "cmbcluster", str(CHART), "--namespace", "cmbcluster", "--values", "-", input_values=values
    )
    assert rendered.returncode == 0, rendered.stderr
    (deployment,) = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CMBCLUSTER_ROUTING"] == "proxy"


def test_print_values_hides_secrets_and_can_be_fed_back(tmp_path: Path) -> None:
    result = deploy("--print-values", env=AWS_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not any(secret in result.stdout for secret in SECRETS) and HIDDEN not in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert "secretConfig" not in printed and "secretKey" not in printed
    assert manifests(printed)  # as printed, the chart takes it (no placeholder stored as a secret)
    # an earlier version's output, with placeholders, is refused rather than deployed
    stale = tmp_path / "stale.yaml"
    stale.write_text(f"secretConfig:\n  COGNITO_CLIENT_SECRET: '{HIDDEN}'\n")
    refused = deploy("--dry-run", "--values", str(stale), env=AWS_ENV, cwd=tmp_path)
    assert refused.returncode == 1 and "holds '<hidden>'" in refused.stderr


def test_only_the_control_planes_own_settings_are_sent(tmp_path: Path) -> None:
    """What the operator's shell holds for their own machine (an emulator's endpoint, a personal
    access token) never reaches the Deployment; a development switch refuses the deploy."""
    shell = {**GCP_ENV, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023", "GOOGLE_API_ENDPOINT": "http://127.0.0.1:1",
             "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.personal", "GCP_IAM_ENDPOINT": "http://127.0.0.1:2"}  # fmt: skip
    result = deploy("--dry-run", env=shell, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for leaked in ("STORAGE_EMULATOR_HOST", "GOOGLE_API_ENDPOINT", "GOOGLE_OAUTH_ACCESS_TOKEN", "GCP_IAM_ENDPOINT"):
        assert leaked not in result.stdout, leaked
    assert "ya29.personal" not in result.stdout + result.stderr
    aws = deploy("--dry-run", env={**AWS_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}, cwd=tmp_path)
    assert aws.returncode == 0 and "AWS_ENDPOINT_URL" not in aws.stdout
    dev = deploy("--dry-run", env={**GCP_ENV, "CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE": "true"}, cwd=tmp_path)
    assert dev.returncode == 1 and "CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE is a development switch" in dev.stderr


# -- what cannot be deployed, and helm's failures: one clear line, exit 1 ------------------------------
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "the compute backend is 'local': the chart runs environments on Kubernetes"),
        ({**GCP_ENV, "CMBCLUSTER_AUTH_PROVIDERS": "gcp,local"}, "the development sign-in (auth provider 'local')"),
        ({**GCP_ENV, "CMBCLUSTER_DATABASE_URL": "sqlite:////tmp/x.db"}, "CMBCLUSTER_DATABASE_URL must be a PostgreSQL"),
        (
            {"CLOUD_PROVIDER": "azure"},
            "install the plugin that provides it, for example `pip install cmbcluster-azure`",
        ),
        ({"CLOUD_PROVIDER": "aws"}, "AWS_REGION is required but not set"),
    ],
    ids=["local", "dev-login", "sqlite-url", "unknown-plugin", "missing-setting"],
)
def test_configurations_that_cannot_be_deployed_are_refused(env: dict[str, str], message: str, tmp_path: Path) -> None:
    result = deploy("--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_helm_is_a_clear_error(tmp_path: Path) -> None:
    result = deploy("--helm", str(tmp_path / "no-helm"), env=GCP_ENV, cwd=tmp_path)
    assert result.returncode == 1
    assert "helm was not found" in result.stderr and "install Helm" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_values_file_is_a_clear_error(tmp_path: Path) -> None:
    result = deploy("--dry-run", "--values", str(tmp_path / "nope.yaml"), env=GCP_ENV, cwd=tmp_path)
    assert result.returncode == 1 and "values file not found" in result.stderr


def test_the_chart_and_context_can_be_chosen(tmp_path: Path) -> None:
    missing = deploy("--dry-run", "--chart", str(tmp_path / "no-chart"), env=GCP_ENV, cwd=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    chart = "oci://registry.example.org/charts/cmbcluster"
    chosen = deploy("--dry-run", "--chart", chart, "--kube-context", "gke-prod", env=GCP_ENV, cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    command, _ = dry_run_output(chosen.stdout)
    assert command[4] == chart
    assert command[command.index("--kube-context") + 1] == "gke-prod"


def test_helm_failing_is_reported_with_its_own_message(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: the cluster is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
        "users": [{"name": "gone", "user": {"token": "x"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}],
    }))  # fmt: skip
    env = {**GCP_ENV, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    result = deploy("--helm", helm_binary(), "--no-wait", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "helm failed (exit status 1)" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr  # helm's own words about the unreachable cluster
    assert "Traceback" not in result.stderr
    assert "google-client-secret-value" not in result.stderr


# -- the hook: contributions merged in order, bad ones refused ------------------------------------------
class AzurePlugin:
    """A third party's cloud, registered in-process."""

    @hookimpl
    def cmbcluster_deploy_values(self, config: ResolvedConfig) -> dict[str, Any] | None:
        if config.core.cloud_provider != "gcp":
            return None
        return {"serviceAccount": {"annotations": {"example.org/team": "cmb"}}, "global": {"gcp": {"region": "x"}}}


class BrokenPlugin:
    @hookimpl
    def cmbcluster_deploy_values(self, config: ResolvedConfig) -> Any:
        return ["not", "a", "dict"]


def _config(monkeypatch: pytest.MonkeyPatch, plugin: object, name: str) -> ResolvedConfig:
    for key, value in GCP_ENV.items():
        monkeypatch.setenv(key, value)
    manager = PluginManager()
    manager.register(plugin, name=name)
    return resolve(load_core_settings(), plugins=manager)


def test_plugin_contributions_are_deep_merged_after_the_cloud_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    values = render_values(_config(monkeypatch, AzurePlugin(), "zz-team"), namespace="cmbcluster")
    # the GCP plugin's name and the later plugin's annotations, merged
    assert values["serviceAccount"] == {"name": "cmbcluster-controlplane", "annotations": {"example.org/team": "cmb"}}
    # plugin-name order: 'gcp' before 'zz-team', so the later one wins where both set a value...
    assert values["global"]["gcp"]["region"] == "x"
    # ...and keys only the earlier one set survive the merge
    assert values["global"]["gcp"]["projectId"] == "cmb-research"


def test_a_plugin_returning_something_else_than_a_dict_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PluginError, match="plugin 'broken': cmbcluster_deploy_values must return a dict"):
        render_values(_config(monkeypatch, BrokenPlugin(), "broken"), namespace="cmbcluster")


def test_deploy_checks_everything_before_helm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMBCLUSTER_COMPUTE_BACKEND", "local")
    monkeypatch.setenv("CMBCLUSTER_AUTH_PROVIDERS", "local")
    with pytest.raises(ConfigurationError) as caught:
        render_values(_config(monkeypatch, AzurePlugin(), "zz-team"), namespace="cmbcluster")
    assert len(caught.value.problems) == 2  # both problems at once


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2]}, "e": {"f": 1}}) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}  # not changed in place


def test_values_are_json_for_helm() -> None:
    json.dumps(rbac_values())  # helm reads the rendered values as JSON on standard input


def test_a_pip_installed_core_finds_the_chart_in_its_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a checkout (no helm/ beside the package), deploy uses the chart packaged in the wheel."""
    from cmbcluster.commands import deploy

    packaged = tmp_path / "chart"
    packaged.mkdir()
    (packaged / "Chart.yaml").write_text("apiVersion: v2\nname: cmbcluster\nversion: 0.1.0\n")
    monkeypatch.setattr(deploy, "REPO_CHART", tmp_path / "no-checkout")
    monkeypatch.setattr(deploy, "PACKAGED_CHART", packaged)
    monkeypatch.delenv(deploy.CHART_ENV, raising=False)
    assert deploy.find_chart(None) == str(packaged)
    monkeypatch.setattr(deploy, "PACKAGED_CHART", tmp_path / "not-packaged")
    with pytest.raises(deploy.DeployError, match="no Helm chart given"):
        deploy.find_chart(None)


@pytest.mark.parametrize("env", [GCP_ENV, AWS_ENV], ids=["gcp", "aws"])
def test_the_image_pushed_is_the_image_the_chart_pulls(env: dict[str, str], tmp_path: Path) -> None:
    """`images build/push` and `deploy` name the control-plane image from one source: the
    reference the Deployment pulls is the one docker tagged (an earlier version pushed
    <registry>/cmbcluster/controlplane and pulled <registry>/cmbcluster-controlplane)."""
    built = run_cli("images", "build", "--dry-run", "--image", "controlplane", env=clean_environ(env), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    tagged = shlex.split(built.stdout.split("would run: ", 1)[1].splitlines()[0])
    pushed = tagged[tagged.index("--tag") + 1]
    _, values = dry_run_output(deploy("--dry-run", env=env, cwd=tmp_path).stdout)
    rendered = manifests(values)
    deployment = one(rendered, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == pushed
