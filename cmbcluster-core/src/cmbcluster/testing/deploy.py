"""The deploy-values contract: what every ``cmbcluster_deploy_values`` implementation must return.

``cmbcluster deploy`` merges core's Helm values with every plugin's contribution and hands them to
the chart (``helm/cmbcluster``), whose ``values.schema.json`` refuses unknown keys. The suite
checks a plugin's values the way the chart will see them: merged over the chart's defaults and
core's values, valid against the schema, rendered by ``helm template``, JSON only, no secret of
the active settings in them, and nothing when the plugin's cloud is not in use::

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
without it that one test is skipped, saying so.
"""

from __future__ import annotations

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
from cmbcluster.registrations import ResolvedConfig

DeployValues = Callable[[ResolvedConfig], Mapping[str, Any] | None]
NAMESPACE = "cmbcluster"


def chart_path() -> Path:
    """The chart ``cmbcluster deploy`` installs (the checkout's, else the one packaged with core)."""
    return Path(find_chart(None))


def chart_values(config: ResolvedConfig, contribution: Mapping[str, Any]) -> dict[str, Any]:
    """What the chart receives: its defaults, then core's values, then ``contribution``."""
    import yaml

    defaults = yaml.safe_load((chart_path() / "values.yaml").read_text()) or {}
    return deep_merge(deep_merge(defaults, core_values(config, namespace=NAMESPACE)), contribution)


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
    def values(self, deploy_values: DeployValues, active_config: ResolvedConfig) -> dict[str, Any]:
        result = deploy_values(active_config)
        assert isinstance(result, Mapping) and result, "no values although your cloud is in use"
        return dict(result)

    def test_values_are_json(self, values: dict[str, Any]) -> None:
        assert json.loads(json.dumps(values)) == values

    def test_merged_values_satisfy_the_charts_schema(
        self, values: dict[str, Any], active_config: ResolvedConfig
    ) -> None:
        assert schema_problems(chart_values(active_config, values)) == []

    def test_the_chart_renders_with_them(
        self, values: dict[str, Any], active_config: ResolvedConfig, tmp_path: Path
    ) -> None:
        try:
            find_helm(None)
        except DeployError as exc:
            pytest.skip(f"helm template not checked: {exc}")
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
