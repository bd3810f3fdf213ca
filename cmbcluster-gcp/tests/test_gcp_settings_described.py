"""Every setting of the GCP plugin says what it does in `cmbcluster config example` (and the repository's
.env.example), which prints each field's description above its variable."""

from __future__ import annotations

from cmbcluster.plugins import PluginManager
from cmbcluster.settings import env_var_name
from cmbcluster_gcp.settings import GcpSettings


def test_every_setting_the_gcp_plugin_registers_is_described() -> None:
    registered = PluginManager(allow=["gcp"]).registered()
    assert {r.settings_model for plugin, _, r in registered if plugin == "gcp"} == {GcpSettings}
    fields = GcpSettings.model_fields.items()
    missing = [env_var_name(GcpSettings, name) for name, field in fields if not (field.description or "").strip()]
    assert not missing, f"no description, so `config example` prints them bare: {', '.join(missing)}"
