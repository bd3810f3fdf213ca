"""Every setting says what it does: `cmbcluster config example` writes each field's description above
its variable, and an operator copying that .env cannot tell what a bare `# CMBCLUSTER_MAX_CPU=8` is for."""

from __future__ import annotations

from pydantic_settings import BaseSettings

from cmbcluster.plugins import PluginManager
from cmbcluster.settings import CoreSettings, env_var_name


def undescribed(models: list[type[BaseSettings]]) -> list[str]:
    """``Model: VARIABLE`` of every field of ``models`` that has no description."""
    return [
        f"{model.__name__}: {env_var_name(model, name)}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]


def test_every_setting_of_core_and_of_the_built_in_plugins_is_described() -> None:
    built_in = PluginManager(entry_points_enabled=False).settings_models()
    assert {m.__name__ for m in built_in} == {"KubernetesSettings", "OidcSettings"}  # local's are core's
    missing = undescribed([CoreSettings, *built_in])
    assert not missing, "no description, so `config example` prints them bare:\n" + "\n".join(missing)


def test_every_setting_of_the_installed_cloud_plugins_is_described() -> None:
    """Ours, as installed beside core in this repository's test environments (and any other)."""
    installed = PluginManager().settings_models()
    assert {"AwsSettings", "GcpSettings"} <= {m.__name__ for m in installed}
    missing = undescribed(list(installed))
    assert not missing, "no description, so `config example` prints them bare:\n" + "\n".join(missing)
