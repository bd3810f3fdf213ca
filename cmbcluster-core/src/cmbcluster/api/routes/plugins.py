"""Installed plugins, their hooks and load errors, and the providers in use."""

from __future__ import annotations

from pydantic import BaseModel

from cmbcluster.api.deps import AdminUser, ApiRouter, Context

router = ApiRouter(prefix="/api/v1/plugins", tags=["plugins"])


class PluginOut(BaseModel):
    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str]
    error: str | None
    builtin: bool
    loaded: bool


class PluginsOut(BaseModel):
    plugins: list[PluginOut]
    active: dict[str, str]


@router.get("", response_model=PluginsOut, summary="Installed plugins and the active providers (admins)")
def list_plugins(context: Context, admin: AdminUser) -> PluginsOut:
    return PluginsOut(
        plugins=[PluginOut(**info.as_dict()) for info in context.config.plugins.plugins()],
        active=context.config.summary(),
    )
