"""The deploy-values contract: what every ``cmbcluster_deploy_values`` implementation must return.

``cmbcluster deploy`` merges core's Helm values with every plugin's contribution and hands them to
the chart (``helm/cmbcluster``), whose ``values.schema.json`` refuses unknown keys. The suite
checks a plugin's values the way the chart will see them: merged over the chart's defaults and
core's values, valid against the schema, rendered by ``helm template``, JSON only, no secret of
the active settings in them, nothing when the plugin's cloud is not in use, and nothing when only
its sign-in is (its settings are active then, as one model usually serves every concern: ask
``config.serves(name, concern)``)::

    from cmbcluster.testing.deploy import DeployValuesContract

    class TestAzureDeployValues(DeployValuesContract):
        @pytest.fixture
        def deploy_values(self):
            return cmbcluster_azure.plugin.cmbcluster_deploy_values

        @pytest.fixture
        def active_config(self, monkeypatch, tmp_path):
            return resolved_config(monkeypatch, CLOUD_PROVIDER="azure", AZURE_TENANT_ID="...",
                                   CMBCLUSTER_DATA_DIR=str(tmp_path))

The ``helm template`` check needs Helm 3.8 or newer (``CMBCLUSTER_HELM`` or ``helm`` on PATH);
without it that test fails, saying where to get it (a contract left unchecked must not pass).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cmbcluster.commands.deploy import DeployError, core_values, deep_merge, find_chart, find_helm
from cmbcluster.config import load_core_settings, resolve
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import Registration, ResolvedConfig

DeployValues = Callable[[ResolvedConfig], Mapping[str, Any] | None]
HELM_MISSING = (
    "helm template cannot be checked: no helm here (CMBCLUSTER_HELM is unset and `helm` is not on PATH). Install "
    "Helm 3.8 or newer (https://helm.sh/docs/intro/install/: a release binary, or your package manager's helm; in "
    "GitHub Actions azure/setup-helm), then put it on PATH or set CMBCLUSTER_HELM=/path/to/helm"
)
NAMESPACE = "cmbcluster"


def chart_path() -> Path:
    """The chart ``cmbcluster deploy`` installs (the checkout's, else the one packaged with core)."""
    return Path(find_chart(None))


def chart_values(config: ResolvedConfig, contribution: Mapping[str, Any]) -> dict[str, Any]:
    """What the chart receives: its defaults, then core's values, then ``contribution``."""
    import yaml

    defaults = yaml.safe_load((chart_path() / "values.yaml").read_text()) or {}
    return deep_merge(deep_merge(defaults, core_values(config, namespace=NAMESPACE)), contribution)


def _helm_found() -> bool:
    try:
        find_helm(None)
    except DeployError:
        return False
    return True


def sign_in_only(config: ResolvedConfig) -> ResolvedConfig:
    """``config`` with only its sign-in (and compute) kept: storage and infra are core's ``local``, and
    the settings are those of the registrations left. What ``CMBCLUSTER_AUTH_PROVIDERS=azure`` gives
    beside another storage and infra: ``config.settings(AzureSettings)`` is not None (one model
    serves every concern of a plugin), yet neither storage nor infra is Azure's."""
    builtin = PluginManager(entry_points_enabled=False).load()
    storage, infra = builtin.storage_backend("local"), builtin.infra_provider("local")
    kept: list[Registration[Any]] = [storage, infra, config.compute, *config.auth]
    models = {r.settings_model for r in kept if r.settings_model is not None}
    core = config.core.model_copy(
        update={"cloud_provider": "local", "storage_backend": "local", "infra_provider": "local",
                "compute_backend": config.compute.name, "auth_providers": [a.name for a in config.auth]}
    )  # fmt: skip
    return dataclasses.replace(
        config, core=core, storage=storage, infra=infra,
        provider_settings={m: s for m, s in config.provider_settings.items() if m in models},
    )  # fmt: skip


def schema_problems(values: Mapping[str, Any]) -> list[str]:
    """Every way ``values`` break the chart's ``values.schema.json`` (empty: valid), one line each."""
    import jsonschema

    schema = json.loads((chart_path() / "values.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in validator.iter_errors(values)
    ]


def helm_template(values: Mapping[str, Any], tmp_path: Path) -> str:
    """The manifests ``helm template`` renders from ``values`` (ProviderUnavailable-free: raises
    AssertionError with helm's message when it refuses)."""
    helm = find_helm(None)
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    result = subprocess.run(
        [helm, "template", "cmbcluster", str(chart_path()), "--namespace", NAMESPACE, "-f", str(values_file)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"helm template refused the values: {result.stderr.strip()}"
    return result.stdout


#: Variables that choose providers: unset before a test sets its own.
_SELECTION = ("CLOUD_PROVIDER", "CMBCLUSTER_STORAGE_BACKEND", "CMBCLUSTER_INFRA_PROVIDER",
              "CMBCLUSTER_COMPUTE_BACKEND", "CMBCLUSTER_AUTH_PROVIDERS")  # fmt: skip


def resolved_config(monkeypatch: pytest.MonkeyPatch, **env: str) -> ResolvedConfig:
    """The configuration the CLI resolves with these variables set (and no other provider choice),
    every installed plugin loaded: ``resolved_config(monkeypatch, CLOUD_PROVIDER="azure", ...)``."""
    for name in _SELECTION:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return resolve(load_core_settings(), PluginManager())


class DeployValuesContract:
    """Subclass it; provide ``deploy_values`` (your hook) and ``active_config`` (your cloud in use)."""

    @pytest.fixture
    def deploy_values(self) -> DeployValues:
        raise NotImplementedError("provide deploy_values: your plugin's cmbcluster_deploy_values")

    @pytest.fixture
    def active_config(self) -> ResolvedConfig:
        raise NotImplementedError("provide active_config: a resolved configuration with your cloud in use")

    @pytest.fixture
    def inactive_config(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ResolvedConfig]:
        """The embedded default (``local``) with every installed plugin loaded: not your deployment."""
        with monkeypatch.context() as patch:
            yield resolved_config(patch, CMBCLUSTER_DATA_DIR=str(tmp_path / "data"))

    @pytest.fixture
    def sign_in_only_config(self, active_config: ResolvedConfig) -> ResolvedConfig:
        """``active_config`` with its sign-in alone in use (:func:`sign_in_only`)."""
        return sign_in_only(active_config)

    @pytest.fixture
    def values(self, deploy_values: DeployValues, active_config: ResolvedConfig) -> dict[str, Any]:
        result = deploy_values(active_config)
        assert isinstance(result, Mapping) and result, "no values although your cloud is in use"
        return dict(result)

    def test_values_are_json(self, values: dict[str, Any]) -> None:
        assert json.loads(json.dumps(values)) == values

    def test_merged_values_satisfy_the_charts_schema(
        self, values: dict[str, Any], active_config: ResolvedConfig
    ) -> None:
        problems = schema_problems(chart_values(active_config, values))
        assert not problems, "the chart's values.schema.json refuses them:\n" + "\n".join(problems)

    def test_the_chart_renders_with_them(
        self, values: dict[str, Any], active_config: ResolvedConfig, tmp_path: Path
    ) -> None:
        if not _helm_found():  # fail, not skip: an unchecked contract must not look like a pass
            pytest.fail(HELM_MISSING, pytrace=False)
        manifests = helm_template(chart_values(active_config, values), tmp_path)
        assert "kind: Deployment" in manifests

    def test_no_secret_is_in_the_values(self, values: dict[str, Any], active_config: ResolvedConfig) -> None:
        dumped = json.dumps(values)
        for settings in active_config.provider_settings.values():
            for field in type(settings).model_fields:
                value = getattr(settings, field)
                if isinstance(value, SecretStr) and len(value.get_secret_value()) >= 4:
                    assert value.get_secret_value() not in dumped, f"{field} belongs under secretConfig"

    def test_nothing_when_the_deployment_is_not_yours(
        self, deploy_values: DeployValues, inactive_config: ResolvedConfig
    ) -> None:
        assert deploy_values(inactive_config) is None

    def test_nothing_when_only_your_sign_in_is_in_use(
        self, deploy_values: DeployValues, sign_in_only_config: ResolvedConfig
    ) -> None:
        """Your settings are active (your sign-in uses them), but the control plane's cloud, its
        identity and the storage driver belong to another provider: core renders your settings
        itself. Ask ``config.serves(name, "storage")`` / ``config.serves(name, "infra")``."""
        values = deploy_values(sign_in_only_config)
        assert values is None, (
            f"values although only sign-in is yours ({sign_in_only_config.summary()}): {json.dumps(values)}"
        )
