"""``GET /api/v1/admin/migration`` (admins only): the progress of ``cmbcluster migrate``, from its manifest."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from cmbcluster.api.deps import AdminUser, ApiRouter, DbSession
from cmbcluster.migration import engine as service

router = ApiRouter(prefix="/api/v1/admin", tags=["admin"])


class MigrationBucketOut(BaseModel):
    storage_id: str
    owner: str | None = Field(description="The owner's e-mail; None when the account no longer exists")
    source: str = Field(description="backend:bucket the objects come from")
    target: str = Field(description="backend:bucket they go to (bucket empty until it is created)")
    state: str = Field(description="copying | switched (the storage uses the target) | finished (source deleted)")
    message: str = Field(description="Why a bucket is not switched yet (waiting for environments, failures)")
    objects_total: int
    bytes_total: int
    objects_verified: int
    bytes_verified: int
    updated_at: dt.datetime


class MigrationOut(BaseModel):
    buckets: list[MigrationBucketOut]
    objects_total: int
    bytes_total: int
    objects_verified: int
    bytes_verified: int
    copying: int
    switched: int
    finished: int


@router.get("/migration", response_model=MigrationOut, summary="Progress of moving buckets to another cloud")
def migration_progress(db: DbSession, _admin: AdminUser) -> MigrationOut:
    buckets = [MigrationBucketOut.model_validate(b, from_attributes=True) for b in service.status(db)]
    return MigrationOut(
        buckets=buckets,
        objects_total=sum(b.objects_total for b in buckets),
        bytes_total=sum(b.bytes_total for b in buckets),
        objects_verified=sum(b.objects_verified for b in buckets),
        bytes_verified=sum(b.bytes_verified for b in buckets),
        copying=sum(b.state == "copying" for b in buckets),
        switched=sum(b.state == "switched" for b in buckets),
        finished=sum(b.state == "finished" for b in buckets),
    )
