"""``cmbcluster deploy``: install or upgrade the control plane on Kubernetes with the Helm chart.

The chart's values are rendered from the validated configuration (:func:`cmbcluster.config.resolve`):

1. core's own: the providers chosen, the settings the operator set (as environment variables
   under ``config``; secret ones under ``secretConfig``), and the RBAC rules of the installed
   :mod:`cmbcluster.kubernetes.rbac`, so the Role always matches the code that needs it;
2. what each plugin contributes through ``cmbcluster_deploy_values`` (its ``global.<cloud>.*``
   values, the ServiceAccount's cloud-identity annotation, the storage driver...), deep-merged
   in plugin-name order;
3. the operator's own ``--values`` files, which Helm applies last.

The rendered values reach Helm on standard input (``-f -``): secrets never touch the disk.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from cmbcluster import __version__
from cmbcluster.commands.rollout import Rollout, preflight
from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.errors import CmbclusterError, ConfigurationError, PluginError
from cmbcluster.images import CONTROL_PLANE, repository
from cmbcluster.interfaces import RegistryInfo
from cmbcluster.kubernetes import rbac
from cmbcluster.settings import deploy_policy, env_var_name

log = logging.getLogger(__name__)

HOOK = "cmbcluster_deploy_values"
HIDDEN = "<hidden>"
DEFAULT_RELEASE = "cmbcluster"
# The chart in a checkout of the repository (cmbcluster-core/src/cmbcluster/commands/ -> helm/).
REPO_CHART = Path(__file__).resolve().parents[4] / "helm" / "cmbcluster"
#: the chart a wheel carries (copied from helm/cmbcluster when the wheel is built)
PACKAGED_CHART = Path(__file__).resolve().parents[1] / "chart"
CHART_ENV = "CMBCLUSTER_HELM_CHART"
HELM_ENV = "CMBCLUSTER_HELM"

# Settings the chart decides itself (where the process listens and keeps its data, how it reaches
# the API server) or that are rendered into dedicated values below, never passed through as-is.
_CHART_OWNED = {
    "cloud_provider", "storage_backend", "auth_providers", "host", "port", "data_dir", "database_url",
    "public_url", "secret_key", "log_level", "log_format", "namespace", "forwarded_allow_ips",
    # KubernetesSettings
    "kubeconfig", "kube_context", "in_cluster", "ingress_class", "environments_domain", "ingress_namespace",
    "tls_secret", "control_plane_url", "routing",
}  # fmt: skip
# Values paths that hold secrets: masked when printed.
_SECRET_PATHS = (("database", "url"), ("secretKey", "value"))

app = typer.Typer(help="Install or upgrade the control plane on Kubernetes (Helm).")


class DeployError(CmbclusterError):
    """Helm is missing or failed, or the configuration cannot be deployed."""

    code = "deploy_error"


# -- values ----------------------------------------------------------------------------------------
def rbac_values() -> dict[str, Any]:
    """The control plane's RBAC rules as chart values; also the content of the chart's files/rbac.json."""
    return {
        "namespacedRules": [dict(rule) for rule in rbac.NAMESPACED_RULES],
        "clusterRules": [dict(rule) for rule in rbac.CLUSTER_RULES],
    }


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, set)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)  # how such settings are read from the environment
    return str(value)


def settings_env(models: Sequence[BaseSettings]) -> tuple[dict[str, str], dict[str, str]]:
    """The control plane's own settings the operator set, as environment variables: (plain,
    secret). Never what belongs to the operator's machine (fields marked LOCAL_ONLY: an
    emulator's endpoint, a personal access token)."""
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for settings in models:
        for field in sorted(settings.model_fields_set - _CHART_OWNED):
            value = getattr(settings, field)
            if value is None or deploy_policy(type(settings), field) == "local-only":
                continue
            target = secret if isinstance(value, SecretStr) else plain
            target[env_var_name(type(settings), field)] = _env_value(value)
    return plain, secret


def core_values(config: ResolvedConfig, *, namespace: str) -> dict[str, Any]:
    """Values from core's settings: providers, public URL, database, the settings themselves, RBAC."""
    core = config.core
    models: list[BaseSettings] = [core, *config.provider_settings.values()]
    plain, secret = settings_env(models)
    values: dict[str, Any] = {
        "global": {"cloudProvider": core.cloud_provider},
        "auth": {"provider": ",".join(core.selected_auth)},
        "controlPlane": {"logLevel": core.log_level},
        "config": plain,
        "secretConfig": secret,
        "rbac": rbac_values(),
        # one name on every cloud: the cloud identity's trust (an IRSA role, a Workload Identity
        # binding) names this ServiceAccount
        "serviceAccount": {"name": rbac.CONTROL_PLANE_SERVICE_ACCOUNT},
    }
    # the control-plane image exactly as `cmbcluster images push` names it (cmbcluster.images)
    values["image"] = {"registry": repository(deployment_registry(config)), "repository": CONTROL_PLANE,
                       "tag": __version__}  # fmt: skip
    if core.storage_backend:
        values["storage"] = {"backend": core.storage_backend}
    if core.namespace != namespace and "namespace" in core.model_fields_set:
        values["environments"] = {"namespace": core.namespace}
    if core.public_url:
        host = urlsplit(core.public_url).hostname
        if host:
            values["ingress"] = {"host": host, "tls": {"enabled": core.public_url.startswith("https://")}}
    if core.database_url:
        values["database"] = {"url": core.database_url}
    if core.secret_key is not None:
        values["secretKey"] = {"value": core.secret_key.get_secret_value()}
    for settings in config.provider_settings.values():
        # The Kubernetes backend's routing settings, without importing its module's client.
        ingress_class = getattr(settings, "ingress_class", None)
        if isinstance(ingress_class, str) and "ingress_class" in settings.model_fields_set:
            values.setdefault("ingress", {})["className"] = ingress_class
        ingress_namespace = getattr(settings, "ingress_namespace", None)
        if isinstance(ingress_namespace, str) and "ingress_namespace" in settings.model_fields_set:
            values.setdefault("ingress", {})["controllerNamespace"] = ingress_namespace
        domain = getattr(settings, "environments_domain", None)
        if isinstance(domain, str) and domain:
            values.setdefault("environments", {})["domain"] = domain
        routing = getattr(settings, "routing", None)
        if isinstance(routing, str) and "routing" in settings.model_fields_set:
            values.setdefault("environments", {})["routing"] = routing
    return values


def deployment_registry(config: ResolvedConfig) -> RegistryInfo:
    """The active infra provider's registry (where `cmbcluster images push` pushes)."""
    infra = config.create(config.infra)
    try:
        return infra.registry()
    finally:
        infra.close()


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def plugin_values(config: ResolvedConfig) -> list[tuple[str, dict[str, Any]]]:
    """Each plugin's contribution (``cmbcluster_deploy_values``), in the documented order."""
    contributions = []
    for plugin_name, result in config.plugins.deploy_values(config):
        if result is None:
            continue
        if not isinstance(result, Mapping):
            raise PluginError(f"plugin {plugin_name!r}: {HOOK} must return a dict of Helm values or None")
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"plugin {plugin_name!r}: {HOOK} returned values that are not JSON: {exc}") from None
        contributions.append((plugin_name, dict(result)))
    return contributions


def check_deployable(config: ResolvedConfig) -> None:
    """What a valid local configuration may still get wrong for a cluster: every problem at once."""
    core = config.core
    problems = []
    if core.selected_compute != "kubernetes":
        problems.append(
            f"the compute backend is {core.selected_compute!r}: the chart runs environments on Kubernetes; "
            "set CLOUD_PROVIDER to aws, gcp or a cloud plugin (or CMBCLUSTER_COMPUTE_BACKEND=kubernetes)"
        )
    for settings in [core, *config.provider_settings.values()]:
        for field in sorted(settings.model_fields_set):
            if deploy_policy(type(settings), field) == "development" and getattr(settings, field):
                problems.append(f"{env_var_name(type(settings), field)} is a development switch: unset it to deploy")
    if "local" in core.selected_auth:
        problems.append(
            "the development sign-in (auth provider 'local') would serve beyond loopback in the cluster: "
            "enable a real identity provider (CMBCLUSTER_AUTH_PROVIDERS)"
        )
    if core.database_url and not core.database_url.startswith("postgresql"):
        problems.append(
            "CMBCLUSTER_DATABASE_URL must be a PostgreSQL URL in a cluster (unset it to keep SQLite on the "
            "chart's volume claim)"
        )
    if problems:
        raise ConfigurationError(problems)


def render_values(config: ResolvedConfig, *, namespace: str) -> dict[str, Any]:
    """Core's values with every plugin's contribution merged over them."""
    check_deployable(config)
    values = core_values(config, namespace=namespace)
    for _plugin, contribution in plugin_values(config):
        values = deep_merge(values, contribution)
    return values


def masked(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy safe to print, and the paths of what was left out of it. Secrets are left out, not
    replaced by a placeholder: printed values fed back to helm then keep the secrets the release
    already has (or let the chart generate its key) instead of storing a placeholder."""
    shown: dict[str, Any] = json.loads(json.dumps(values))
    hidden = [f"secretConfig.{name}" for name in sorted(shown.pop("secretConfig", None) or {})]
    for section, key in _SECRET_PATHS:
        if shown.get(section, {}).get(key):
            del shown[section][key]
            if not shown[section]:
                del shown[section]
            hidden.append(f"{section}.{key}")
    return shown, hidden


def printable(values: Mapping[str, Any]) -> str:
    """The values as YAML, secrets left out and named in a comment."""
    shown, hidden = masked(values)
    note = f"# not shown (secrets; `cmbcluster deploy` sends them): {', '.join(hidden)}\n" if hidden else ""
    return note + dump_values(shown).rstrip()


def sent_settings(values: Mapping[str, Any]) -> str:
    """One line naming every setting deploy sends into the Deployment (values never shown)."""
    plain = sorted(values.get("config") or {})
    secret = sorted(values.get("secretConfig") or {})
    return f"settings sent: {', '.join(plain) or 'none'}; secret: {', '.join(secret) or 'none'}"


def dump_values(values: Mapping[str, Any]) -> str:
    """YAML when PyYAML is there (it comes with the kubernetes client), else JSON, which is YAML too."""
    try:
        yaml: Any = importlib.import_module("yaml")  # untyped (no stubs installed): used as Any
    except ImportError:
        return json.dumps(values, indent=2, sort_keys=True)
    return str(yaml.safe_dump(dict(values), sort_keys=True, default_flow_style=False))


# -- helm ------------------------------------------------------------------------------------------
def find_helm(explicit: str | None) -> str:
    candidate = explicit or os.environ.get(HELM_ENV) or "helm"
    found = shutil.which(candidate)
    if found is None:
        raise DeployError(
            f"helm was not found ({candidate!r} is not an executable on PATH): install Helm 3.8 or newer "
            f"(https://helm.sh/docs/intro/install/), or name it with {HELM_ENV}=/path/to/helm (or --helm)"
        )
    return found


def find_chart(explicit: str | None) -> str:
    chart = explicit or os.environ.get(CHART_ENV)
    if chart:
        if "://" not in chart and not Path(chart).exists():
            raise DeployError(f"the chart {chart!r} does not exist (a chart folder, .tgz or oci:// reference)")
        return chart
    for candidate in (REPO_CHART, PACKAGED_CHART):  # a checkout's own first: it is what is being changed
        if (candidate / "Chart.yaml").exists():
            return str(candidate)
    raise DeployError(
        "no Helm chart given: pass --chart (the helm/cmbcluster folder of a CMBCluster checkout, a packaged "
        f".tgz or an oci:// reference) or set {CHART_ENV}"
    )


def helm_command(
    helm: str,
    *,
    release: str,
    chart: str,
    namespace: str,
    operator_values: Sequence[Path] = (),
    wait: bool = True,
    timeout: str = "10m",
    kube_context: str | None = None,
) -> list[str]:
    """``helm upgrade --install``; the rendered values come on standard input, the operator's files after."""
    command = [helm, "upgrade", "--install", release, chart, "--namespace", namespace, "--create-namespace"]
    if kube_context:
        command += ["--kube-context", kube_context]
    if wait:
        command += ["--wait", "--timeout", timeout]
    command += ["--values", "-"]
    for path in operator_values:
        command += ["--values", str(path)]
    return command


def run_helm(
    command: Sequence[str], values: Mapping[str, Any], *, timeout: float | None = None, rollout: Rollout | None = None
) -> str:
    """Run helm with ``values`` on standard input; DeployError with helm's own message if it fails,
    or, while helm waits, with what ``rollout`` finds stuck (then helm is stopped)."""
    # Output into files, not pipes: nothing is read while helm waits, and a pipe would fill.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errors:
        try:
            process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=out, stderr=errors, text=True)
        except OSError as exc:
            raise DeployError(f"could not run helm: {exc}") from None
        assert process.stdin is not None
        process.stdin.write(json.dumps(values))
        process.stdin.close()
        _wait_for_helm(process, command, timeout, rollout)
        out.seek(0)
        errors.seek(0)
        stdout, stderr = out.read(), errors.read()
    if process.returncode != 0:
        message = (stderr or stdout).strip() or f"exit status {process.returncode}"
        raise DeployError(f"helm failed (exit status {process.returncode}): {message}")
    return stdout


def _wait_for_helm(
    process: subprocess.Popen[str], command: Sequence[str], timeout: float | None, rollout: Rollout | None
) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise DeployError(f"helm did not finish within {timeout:.0f}s: {shlex.join(command[:4])}")
        stuck = rollout.stuck() if rollout is not None else None
        if stuck:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise DeployError(
                f"the control plane cannot start: {stuck}. Helm was stopped; fix the cause and deploy again, "
                "or undo: `helm rollback <release>` after an upgrade, `helm uninstall <release>` after a first install"
            )
        time.sleep(2 if rollout is not None else 0.2)


def cluster_checks(
    values: Mapping[str, Any],
    operator_values: Sequence[Path],
    *,
    release: str,
    namespace: str,
    kube_context: str | None,
    patience: float,
) -> Rollout | None:
    """Check the cluster before helm runs (DeployError listing what cannot work) and return the
    watch of the release while helm waits; None when the kubernetes client is not installed."""
    try:
        from kubernetes import config as kube_config
    except ImportError:  # deploying from a machine without the kubernetes extra: helm alone
        return None
    try:
        api = kube_config.new_client_from_config(context=kube_context)
    except Exception as exc:  # noqa: BLE001 - no usable kubeconfig: helm will say it in its words
        log.info("no cluster checks before helm: %s", exc)
        return None
    merged: dict[str, Any] = dict(values)
    for path in operator_values:
        loaded = json.loads(json.dumps(_load_yaml(path)))
        if isinstance(loaded, dict):
            merged = deep_merge(merged, loaded)
    claim = f"{chart_fullname(release)}-data"
    problems = preflight(api, merged, namespace=namespace, claim=claim)
    if problems:
        raise DeployError("; ".join(problems))
    return Rollout(api=api, namespace=namespace, release=release, claim=claim, patience=patience)


def chart_fullname(release: str) -> str:
    """The chart's ``cmbcluster.fullname`` for a release (its objects' names)."""
    name = release if "cmbcluster" in release else f"{release}-cmbcluster"
    return name[:63].rstrip("-")


def _load_yaml(path: Path) -> Any:
    yaml: Any = importlib.import_module("yaml")
    return yaml.safe_load(path.read_text())


# -- the command -----------------------------------------------------------------------------------
def _existing_files(paths: Sequence[Path]) -> list[Path]:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DeployError(f"values file not found: {', '.join(missing)}")
    holding = [str(p) for p in paths if HIDDEN in p.read_text(errors="replace")]
    if holding:  # printed by an earlier version, whose output stood secrets in with a placeholder
        raise DeployError(
            f"{', '.join(holding)} holds {HIDDEN!r} where a secret belongs: remove those lines (deploy sends "
            "the secrets itself) rather than store the placeholder"
        )
    return list(paths)


@app.callback(invoke_without_command=True)
def deploy(
    namespace: Annotated[
        str | None, typer.Option(help="Namespace of the release (default: CMBCLUSTER_NAMESPACE).")
    ] = None,
    values: Annotated[
        list[Path] | None,
        typer.Option("--values", "-f", help="Your own values file, applied after the rendered values (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the helm command and the values; change nothing.")
    ] = False,
    print_values: Annotated[
        bool, typer.Option("--print-values", help="Print the rendered values (secrets hidden) and stop.")
    ] = False,
    release: Annotated[str, typer.Option(help="Helm release name.")] = DEFAULT_RELEASE,
    chart: Annotated[
        str | None,
        typer.Option(help=f"Chart folder, .tgz or oci:// reference (default: ${CHART_ENV}, or the checkout's)"),
    ] = None,
    helm: Annotated[
        str | None, typer.Option(help=f"The helm executable (default: ${HELM_ENV}, or helm on PATH).")
    ] = None,
    kube_context: Annotated[str | None, typer.Option(help="Kubeconfig context helm uses.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the control plane is ready.")] = True,
    timeout: Annotated[str, typer.Option(help="How long helm waits (a Go duration).")] = "10m",
    stuck_after: Annotated[
        float,
        typer.Option(help="Stop waiting when the control plane's claim or pod has been stuck this many seconds."),
    ] = 90,
) -> None:
    """Render the chart's values from the configuration and run `helm upgrade --install`."""
    config = resolve(load_core_settings())
    release_namespace = namespace or config.core.namespace
    rendered = render_values(config, namespace=release_namespace)
    if print_values:
        typer.echo(printable(rendered))
        return
    operator_values = _existing_files(values or [])
    chart_ref = find_chart(chart)
    # A dry run needs no helm here: it shows the command to run where helm is.
    helm_path = (helm or os.environ.get(HELM_ENV) or "helm") if dry_run else find_helm(helm)
    command = helm_command(
        helm_path,
        release=release,
        chart=chart_ref,
        namespace=release_namespace,
        operator_values=operator_values,
        wait=wait,
        timeout=timeout,
        kube_context=kube_context,
    )
    if dry_run:
        typer.echo("# helm command (the values below on its standard input):")
        typer.echo(shlex.join(command))
        typer.echo("# values (secrets hidden):")
        typer.echo(printable(rendered))
        typer.echo(f"# {sent_settings(rendered)}")
        return
    rollout = cluster_checks(
        rendered, operator_values, release=release, namespace=release_namespace, kube_context=kube_context,
        patience=stuck_after,
    ) if wait else None  # fmt: skip
    typer.echo(f"deploying release {release} into namespace {release_namespace} with {shlex.join(command[:2])} ...")
    typer.echo(sent_settings(rendered))
    output = run_helm(command, rendered, rollout=rollout)
    typer.echo(output.rstrip())


__all__ = [
    "DeployError",
    "app",
    "core_values",
    "deep_merge",
    "helm_command",
    "masked",
    "printable",
    "rbac_values",
    "render_values",
    "settings_env",
]
