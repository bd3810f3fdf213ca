"""The application catalog: everyone signed in reads it, admins change it; and the resource presets."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Query, Response
from pydantic import BaseModel, Field

from cmbcluster.api.deps import AdminUser, ApiRouter, Context, CurrentUser, DbSession
from cmbcluster.context import AppContext
from cmbcluster.db.models import Application
from cmbcluster.services import catalog
from cmbcluster.services.catalog import ApplicationCreate, ApplicationUpdate

router = ApiRouter(prefix="/api/v1/applications", tags=["applications"])


class ApplicationOut(BaseModel):
    id: str
    slug: str
    name: str
    summary: str
    image: str
    command: list[str]
    port: int
    working_dir: str
    icon: str
    category: str
    tags: list[str]
    default_preset: str
    active: bool
    available: bool = Field(description="False when its program is missing on this server (see unavailable_reason)")
    unavailable_reason: str | None = Field(
        default=None, description="Why it cannot start on this server, with the fix (for example a command to run)"
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class ApplicationsOut(BaseModel):
    items: list[ApplicationOut]


class PresetOut(BaseModel):
    name: str
    cpu: float = Field(description="CPU cores")
    memory_mib: int
    description: str
    available: bool = Field(description="False when this server's limits are below the preset")


class CustomLimitsOut(BaseModel):
    max_cpu: float
    max_memory_mib: int
    min_memory_mib: int
    cpu_step: float


class PresetsOut(BaseModel):
    presets: list[PresetOut]
    custom: CustomLimitsOut = Field(description="What the 'custom' preset allows")


_STORED_FIELDS = [name for name in ApplicationOut.model_fields if name not in ("available", "unavailable_reason")]


def application_out(app: Application, context: AppContext) -> ApplicationOut:
    reason = catalog.availability(context.compute, app)
    stored = {name: getattr(app, name) for name in _STORED_FIELDS}
    return ApplicationOut(**stored, available=reason is None, unavailable_reason=reason)


@router.get("", response_model=ApplicationsOut, summary="The application catalog")
def list_applications(
    user: CurrentUser,
    db: DbSession,
    context: Context,
    include_inactive: Annotated[bool, Query(description="Admins only: include inactive applications")] = False,
) -> ApplicationsOut:
    apps = catalog.list_applications(db, include_inactive=include_inactive and user.role == "admin")
    return ApplicationsOut(items=[application_out(app, context) for app in apps])


@router.get("/presets", response_model=PresetsOut, summary="Resource presets and the limits of custom resources")
def list_presets(user: CurrentUser, context: Context) -> PresetsOut:
    core = context.config.core
    return PresetsOut(
        presets=[
            PresetOut(
                name=p.name,
                cpu=p.cpu,
                memory_mib=p.memory_mib,
                description=p.description,
                available=p.cpu <= core.max_cpu and p.memory_mib <= core.max_memory_mib,
            )
            for p in catalog.PRESETS.values()
        ],
        custom=CustomLimitsOut(
            max_cpu=core.max_cpu,
            max_memory_mib=core.max_memory_mib,
            min_memory_mib=catalog.MIN_MEMORY_MIB,
            cpu_step=catalog.CPU_STEP,
        ),
    )


@router.get("/{id_or_slug}", response_model=ApplicationOut, summary="One application, by id or slug")
def get_application(id_or_slug: str, user: CurrentUser, db: DbSession, context: Context) -> ApplicationOut:
    return application_out(catalog.get_application(db, id_or_slug, include_inactive=user.role == "admin"), context)


@router.post("", response_model=ApplicationOut, status_code=201, summary="Add an application (admins)")
def create_application(body: ApplicationCreate, admin: AdminUser, db: DbSession, context: Context) -> ApplicationOut:
    return application_out(catalog.create_application(db, body, actor_id=admin.id), context)


@router.patch("/{id_or_slug}", response_model=ApplicationOut, summary="Change an application (admins)")
def update_application(
    id_or_slug: str, body: ApplicationUpdate, admin: AdminUser, db: DbSession, context: Context
) -> ApplicationOut:
    app = catalog.get_application(db, id_or_slug, include_inactive=True)
    return application_out(catalog.update_application(db, app, body, actor_id=admin.id), context)


@router.delete(
    "/{id_or_slug}",
    status_code=204,
    summary="Delete an application no environment uses (admins)",
    responses={409: {"description": "Environments use it: deactivate it instead"}},
)
def delete_application(id_or_slug: str, admin: AdminUser, db: DbSession) -> Response:
    app = catalog.get_application(db, id_or_slug, include_inactive=True)
    catalog.delete_application(db, app, actor_id=admin.id)
    return Response(status_code=204)
