"""Storage: your buckets (create, list with usage, get, delete) and their objects (list by
prefix, upload and download streamed in constant memory, delete).

Every backend call blocks (cloud SDKs do), so none runs on the event loop: the plain ``def``
routes run whole in FastAPI's thread pool, and the streaming ones (``async def``) hand each
backend call to a worker thread. Bucket and object bytes never sit whole in memory: uploads
go through :func:`cmbcluster.streaming.consume_in_thread` (a queue of a few 1 MiB chunks),
downloads through :func:`cmbcluster.streaming.iterate_in_thread`.
"""

from __future__ import annotations

import datetime as dt
import logging
from functools import partial
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import Depends, Form, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, StringConstraints, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cmbcluster.api.deps import ApiRouter, Context, CurrentUser, DbSession, in_worker
from cmbcluster.api.errors import ErrorOut, error_body, error_responses
from cmbcluster.api.guard import streams_body
from cmbcluster.api.transfer import (
    RangeNotSatisfiable,
    content_disposition,
    content_length,
    if_range_matches,
    object_headers,
    parse_range,
)
from cmbcluster.bodies import RequestBody
from cmbcluster.db.models import Storage
from cmbcluster.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from cmbcluster.interfaces import ObjectInfo, StorageClass
from cmbcluster.migration import engine as migration
from cmbcluster.naming import MAX_OBJECT_KEY_BYTES, validate_new_object_key
from cmbcluster.services import previews
from cmbcluster.services import storages as service
from cmbcluster.services.usage import Usage, cached_usage
from cmbcluster.streaming import (
    CHUNK_SIZE,
    consume_in_thread,
    idle_timeout,
    iterate_in_thread,
    limit_bytes,
    rechunk,
)

log = logging.getLogger(__name__)

#: How long a listing waits for stale buckets to be measured before answering with the cached
#: figures; a single bucket's page waits longer. See :func:`service.current_usage`.
LIST_USAGE_WAIT_SECONDS = 2.0
GET_USAGE_WAIT_SECONDS = 10.0
MAX_CONTENT_TYPE_LENGTH = 255
_BINARY = {"schema": {"type": "string", "format": "binary"}}


# -- models ------------------------------------------------------------------------------------


class StorageCreate(RequestBody):
    display_name: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=service.MAX_DISPLAY_NAME)
    ] = Field(description="A name for people; the bucket's real name is chosen by the server", examples=["Simulations"])
    storage_class: StorageClass = Field(
        default=StorageClass.STANDARD,
        strict=False,  # its value from JSON, a string (a strict enum takes only the enum itself)
        description="Portable storage class; a backend that does not offer it answers 400",
    )


class StorageOut(BaseModel):
    id: str
    display_name: str
    storage_class: str
    status: str = Field(
        description="'active'; 'deleting' while the bucket is being deleted; 'migrating' during the last pass of its "
        "move to another cloud (uploads and new mounts wait)"
    )
    backend: str = Field(description="The storage backend holding the bucket (local, aws, gcp, ...)")
    bucket_name: str = Field(description="The bucket's real name in that backend")
    created_at: dt.datetime
    size_bytes: int | None = Field(description="Total size of the objects; null until first measured")
    object_count: int | None = Field(description="Number of objects; null until first measured")
    noncurrent_bytes: int | None = Field(
        description="Earlier versions of overwritten or deleted objects, kept (and billed) until the bucket's "
        "lifecycle removes them; null until first measured"
    )
    noncurrent_object_count: int | None = Field(description="Number of those earlier versions")
    usage_measured_at: dt.datetime | None = Field(
        description="When size and count were measured (they are cached for a minute)"
    )
    moving_to: str | None = Field(
        default=None,
        description="The storage backend `cmbcluster migrate` is copying this bucket to (it stays usable meanwhile); "
        "null when it is not being moved",
    )


class QuotaOut(BaseModel):
    quota_bytes: int | None = Field(
        description="Bytes your buckets may hold, earlier versions included; null: no quota"
    )
    used_bytes: int = Field(description="Current objects and earlier versions of all your buckets, as last measured")
    noncurrent_bytes: int = Field(
        description="The part of used_bytes in earlier versions of overwritten or deleted objects"
    )


class GroupQuotaOut(QuotaOut):
    group: str = Field(description="The group's name: its quota counts every member's buckets")
    quota_bytes: int = Field(description="Bytes the members' buckets may hold together, earlier versions included")
    used_bytes: int = Field(description="Current objects and earlier versions of every member's buckets")


class StorageListOut(BaseModel):
    storages: list[StorageOut]
    quota: QuotaOut
    group_quotas: list[GroupQuotaOut] = Field(
        description="The storage quotas of your groups (those that have one): an upload must fit each"
    )


class ObjectOut(BaseModel):
    key: str = Field(description="The object's path in the bucket, '/'-separated")
    size: int = Field(description="Size in bytes")
    last_modified: dt.datetime
    content_type: str
    etag: str = Field(description="Changes whenever the object's content changes")


class ObjectPageOut(BaseModel):
    objects: list[ObjectOut]
    prefixes: list[str] = Field(description="The 'folders' directly under the prefix (with delimiter=true)")
    next_page_token: str | None = Field(description="Pass as page_token for the next page; null on the last one")


ObjectKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_OBJECT_KEY_BYTES)]


class DeleteObjectsIn(RequestBody):
    keys: list[ObjectKey] = Field(default_factory=list, max_length=1000, description="Up to 1000 object keys")
    prefixes: list[ObjectKey] = Field(
        default_factory=list, max_length=100,
        description="Folders (each ending with '/'): every object under them is deleted too",
    )  # fmt: skip

    @model_validator(mode="after")
    def _something(self) -> DeleteObjectsIn:
        if not self.keys and not self.prefixes:
            raise ValueError("name at least one key or folder")
        return self


class DeleteObjectsOut(BaseModel):
    deleted: int = Field(description="Keys processed; keys that did not exist count too (deleting is idempotent)")


class MoveIn(RequestBody):
    source: ObjectKey = Field(description="A file's key, or a folder ending with '/'")
    destination: ObjectKey = Field(description="The new key (a folder: ending with '/')")


class MoveOut(BaseModel):
    moved: int = Field(description="How many objects moved (a folder's every object)")


class FitsCardOut(BaseModel):
    keyword: str
    value: str
    comment: str


class FitsHduOut(BaseModel):
    index: int
    name: str = Field(description="EXTNAME, or PRIMARY for the first")
    cards: list[FitsCardOut]
    truncated: bool = Field(description="True when the header is longer than what was read")


class PreviewOut(BaseModel):
    key: str
    size: int
    content_type: str
    kind: Literal["text", "json", "csv", "image", "fits", "none"] = Field(
        description="How to show it: text (json and csv are text too), an image (load its download URL), "
        "FITS headers, or none"
    )
    text: str | None = Field(default=None, description="The file's beginning (text, json, csv)")
    truncated: bool = Field(default=False, description="True when the text is only the file's beginning")
    hdus: list[FitsHduOut] | None = Field(default=None, description="A FITS file's headers, HDU by HDU")
    message: str | None = Field(default=None, description="Why there is nothing to show")


def storage_out(storage: Storage, usage: Usage, moving_to: str | None = None) -> StorageOut:
    return StorageOut(
        id=storage.id, display_name=storage.display_name, storage_class=storage.storage_class,
        status=storage.status, backend=storage.backend, bucket_name=storage.bucket_name,
        created_at=storage.created_at, size_bytes=usage.size_bytes, object_count=usage.object_count,
        noncurrent_bytes=usage.noncurrent_bytes, noncurrent_object_count=usage.noncurrent_count,
        usage_measured_at=usage.measured_at, moving_to=moving_to,
    )  # fmt: skip


def object_out(info: ObjectInfo) -> ObjectOut:
    return ObjectOut(
        key=info.key, size=info.size, last_modified=info.last_modified, content_type=info.content_type,
        etag=info.etag,
    )  # fmt: skip


# -- per-server state --------------------------------------------------------------------------


async def make_storage_runtime(context: Context) -> None:
    """The server's storage runtime (usage refresher, upload limiter) is made on the event loop, before
    any route's worker thread could race to make it (an async dependency of every storage route)."""
    _ = context.storage_runtime


router = ApiRouter(
    prefix="/api/v1/storages",
    tags=["storage"],
    responses=error_responses(401, 404),
    dependencies=[Depends(make_storage_runtime)],
)


# -- buckets -----------------------------------------------------------------------------------


@router.post(
    "", status_code=201, response_model=StorageOut, summary="Create a bucket", responses=error_responses(400, 409, 503)
)
def create_storage(body: StorageCreate, user: CurrentUser, db: DbSession, context: Context) -> StorageOut:
    storage = service.create_storage(
        db, context, user, display_name=body.display_name, storage_class=body.storage_class
    )
    return storage_out(storage, cached_usage(storage))


@router.get("", response_model=StorageListOut, summary="List your buckets with their size and object count")
def list_storages(user: CurrentUser, db: DbSession, context: Context) -> StorageListOut:
    # Sizes come from the cache; stale ones (older than a minute) are measured again, at most
    # USAGE_WORKERS buckets at once per server and for at most LIST_USAGE_WAIT_SECONDS: a listing
    # never costs a full scan of every bucket on every call, nor waits on one huge bucket.
    rows = service.storages_with_usage(db, context, user, wait_seconds=LIST_USAGE_WAIT_SECONDS)
    own, *groups = service.quota_states(db, context, user, rows)
    moving = migration.moving(db, [row.id for row, _ in rows])
    return StorageListOut(
        storages=[storage_out(row, usage, moving.get(row.id)) for row, usage in rows],
        quota=QuotaOut(quota_bytes=own.quota_bytes, used_bytes=own.used_bytes, noncurrent_bytes=own.noncurrent_bytes),
        group_quotas=[
            GroupQuotaOut(group=g.group or "", quota_bytes=g.quota_bytes or 0, used_bytes=g.used_bytes,
                          noncurrent_bytes=g.noncurrent_bytes)
            for g in groups
        ],
    )  # fmt: skip


@router.get("/{storage_id}", response_model=StorageOut, summary="One of your buckets, with its size and object count")
def get_storage(storage_id: str, user: CurrentUser, db: DbSession, context: Context) -> StorageOut:
    storage, usage = service.storage_with_usage(db, context, user, storage_id, wait_seconds=GET_USAGE_WAIT_SECONDS)
    return storage_out(storage, usage, migration.moving(db, [storage.id]).get(storage.id))


@router.delete(
    "/{storage_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a bucket (force=true also deletes every object in it)",
    responses=error_responses(409, 503),
)
def delete_storage(
    storage_id: str,
    user: CurrentUser,
    db: DbSession,
    context: Context,
    force: Annotated[bool, Query(description="Delete the objects too; without it a non-empty bucket is 409")] = False,
) -> Response:
    service.delete_storage(db, context, user, storage_id, force=force)
    return Response(status_code=204)


# -- objects -----------------------------------------------------------------------------------


@router.get(
    "/{storage_id}/objects",
    response_model=ObjectPageOut,
    summary="List objects by prefix, a page at a time",
    responses=error_responses(400, 409),
)
def list_objects(
    storage_id: str,
    user: CurrentUser,
    db: DbSession,
    context: Context,
    prefix: Annotated[str, Query(max_length=MAX_OBJECT_KEY_BYTES, description="Only keys starting with this")] = "",
    page_token: Annotated[
        str | None,
        Query(
            max_length=8192,
            description="next_page_token of the previous page of this listing (the same prefix and delimiter); "
            "any other token is a 400",
        ),
    ] = None,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 1000,
    delimiter: Annotated[
        bool, Query(description="true: one folder level ('/'-delimited) with sub-folders in prefixes; false: all")
    ] = True,
) -> ObjectPageOut:
    page = service.list_objects(
        db, context, user, storage_id, prefix, delimiter="/" if delimiter else None, page_token=page_token or None,
        page_size=page_size,
    )  # fmt: skip
    return ObjectPageOut(
        objects=[object_out(info) for info in page.objects], prefixes=page.prefixes, next_page_token=page.next_token
    )


@router.post(
    "/{storage_id}/objects/delete",
    response_model=DeleteObjectsOut,
    summary="Delete up to 1000 objects",
    responses=error_responses(400, 409),
)
def delete_objects(
    storage_id: str, body: DeleteObjectsIn, user: CurrentUser, db: DbSession, context: Context
) -> DeleteObjectsOut:
    deleted = service.delete_objects(db, context, user, storage_id, body.keys, body.prefixes)
    return DeleteObjectsOut(deleted=deleted)


@router.post(
    "/{storage_id}/objects/move",
    response_model=MoveOut,
    summary="Rename or move a file or a folder within the bucket (copied, then the original deleted)",
    description="Storage services have no rename: every object is copied through the control plane (streamed, "
    "in constant memory) and the originals deleted once every copy exists. 409 when something exists at a "
    f"destination (nothing is done), for a folder of more than {service.MAX_MOVE_OBJECTS} files, or while another "
    "move in the bucket runs (one at a time: two moves of one folder would each copy it). In a bucket "
    "that keeps earlier versions the originals stay as such, counted against storage quotas: 507 when a quota has "
    "no room for them (nothing is done).",
    responses=error_responses(400, 409, 507),
)
def move_objects(storage_id: str, body: MoveIn, user: CurrentUser, db: DbSession, context: Context) -> MoveOut:
    return MoveOut(moved=service.move_objects(db, context, user, storage_id, body.source, body.destination))


@router.get(
    "/{storage_id}/preview/{key:path}",
    response_model=PreviewOut,
    summary="What a file holds, without downloading it: a text's beginning, a FITS file's headers",
    description="Read with ranged reads: at most the first 64 KiB of a text, and a few 2880-byte blocks per "
    "header of a FITS file's first HDUs. Images are shown from their download URL.",
    responses=error_responses(400, 409),
)
def preview_object(storage_id: str, key: str, user: CurrentUser, db: DbSession, context: Context) -> PreviewOut:
    bucket = service.usable_bucket(db, context, user, storage_id)
    info = service.head_object(context, bucket, key)
    found = previews.preview_object(context, bucket, info)
    return PreviewOut(
        key=info.key, size=info.size, content_type=info.content_type, kind=found.kind, text=found.text,
        truncated=found.truncated, message=found.message,
        hdus=None if found.hdus is None else [
            FitsHduOut(index=h.index, name=h.name, truncated=h.truncated,
                       cards=[FitsCardOut(keyword=c.keyword, value=c.value, comment=c.comment) for c in h.cards])
            for h in found.hdus
        ],
    )  # fmt: skip


@router.post(
    "/{storage_id}/archive",
    response_class=StreamingResponse,
    summary="Download several files and folders as one zip, streamed",
    description="A form (`application/x-www-form-urlencoded`, as a browser's form sends it): `key` for each "
    "file, `prefix` for each folder (ending with '/'), `base` the folder whose contents they are (names in the "
    "zip are relative to it). The zip is written while it is sent, each file read from the bucket only when "
    "its turn comes: constant memory whatever the sizes. Its files are stored, not compressed.",
    responses={
        200: {"content": {"application/zip": _BINARY}, "description": "The zip"},
        **error_responses(400, 409),
    },
)
async def download_archive(
    storage_id: str,
    user: CurrentUser,
    db: DbSession,
    context: Context,
    key: Annotated[list[ObjectKey], Form(max_length=service.MAX_FOLDER_OBJECTS)] = [],  # noqa: B006 - FastAPI copies it
    prefix: Annotated[list[ObjectKey], Form(max_length=100)] = [],  # noqa: B006
    base: Annotated[str, Form(max_length=MAX_OBJECT_KEY_BYTES)] = "",
) -> Response:
    folder = service.archive_folder(base)
    selected = partial(service.selected_objects, db, context, user, storage_id, key, prefix)
    storage, objects = await in_worker(db, selected)
    chunks, size = service.zip_archive(context, storage.bucket_name, objects, folder)
    name = folder.rstrip("/").rsplit("/", 1)[-1] or storage.display_name
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": content_disposition(f"{name}.zip"),
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(iterate_in_thread(chunks), media_type="application/zip", headers=headers)


@router.put(
    "/{storage_id}/objects/{key:path}",
    status_code=201,
    response_model=ObjectOut,
    summary="Upload an object: the request body, streamed (replaces an object of the same key)",
    description="408 when no byte of the body arrives for CMBCLUSTER_UPLOAD_IDLE_TIMEOUT_SECONDS (5 minutes by "
    "default): the upload is stopped and nothing is stored.",
    responses=error_responses(400, 408, 409, 413, 507),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The object's bytes; the request's Content-Type is stored with it",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
@streams_body
async def upload_object(
    storage_id: str,
    key: str,
    request: Request,
    response: Response,
    user: CurrentUser,
    db: DbSession,
    context: Context,
) -> ObjectOut:
    storage = await in_worker(db, partial(service.usable_storage, db, context, user, storage_id))
    bucket = storage.bucket_name
    validate_new_object_key(key)
    max_bytes = context.config.core.max_upload_bytes
    declared = content_length(request.headers)
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes)
    content_type = request.headers.get("content-type") or None
    if content_type is not None and (len(content_type) > MAX_CONTENT_TYPE_LENGTH or not content_type.isprintable()):
        raise InvalidRequest(f"Content-Type must be at most {MAX_CONTENT_TYPE_LENGTH} printable characters")
    allowance = await in_worker(
        db,
        partial(
            service.upload_allowance, db, context, user, storage, declared=declared, wait_seconds=GET_USAGE_WAIT_SECONDS
        ),
    )
    remaining = allowance.remaining_bytes
    if remaining is not None and remaining < max_bytes:  # a quota is the nearer limit: stop there
        max_bytes, too_large = remaining, (lambda _limit: allowance.exceeded())
    else:
        too_large = _too_large
    # Constant memory: the body goes from the socket to the backend's blocking upload through a
    # queue of a few 1 MiB chunks; past max_bytes the chunk iterator raises, so the backend
    # aborts the write and no object is stored (the same when the client goes away, or stalls:
    # its quota hold and worker thread are not kept past the idle timeout).
    idle = context.config.core.upload_idle_timeout_seconds
    body = idle_timeout(request.stream(), idle, lambda: _stalled(storage_id, idle))
    # A slow client's bytes are passed on at least as often as the upload renews its hold
    source = rechunk(limit_bytes(body, max_bytes, too_large), CHUNK_SIZE, max_wait=service.renewal_seconds(context))
    upload = partial(service.write_object, context, storage_id, bucket, key, content_type=content_type,
                     allowance=allowance, declared=declared)  # fmt: skip
    try:
        info = await consume_in_thread(source, upload, limiter=context.storage_runtime.upload_limiter)
    except ClientDisconnect:
        log.info("upload of an object to storage %s interrupted by the client; nothing stored", storage_id)
        raise InvalidRequest("the upload was interrupted before its end; nothing was stored") from None
    response.headers["Location"] = f"{router.prefix}/{storage_id}/objects/{quote(info.key)}"
    return object_out(info)


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"an upload may be at most {max_bytes} bytes on this server; nothing was stored")


def _stalled(storage_id: str, seconds: float) -> RequestTimeout:
    log.info("upload of an object to storage %s stopped: no byte for %g s; nothing stored", storage_id, seconds)
    return RequestTimeout(f"no byte of the upload arrived for {seconds:g} seconds: it was stopped, and nothing was "
                          "stored; send it again")  # fmt: skip


@router.get(
    "/{storage_id}/objects/{key:path}",
    response_class=StreamingResponse,
    summary="Download an object, streamed (supports a single 'Range: bytes=first-last')",
    responses={
        200: {"content": {"application/octet-stream": _BINARY}, "description": "The whole object"},
        206: {"content": {"application/octet-stream": _BINARY}, "description": "The requested range"},
        416: {"model": ErrorOut, "description": "The range starts past the end of the object"},
        **error_responses(400, 409),
    },
)
async def download_object(
    storage_id: str,
    key: str,
    user: CurrentUser,
    db: DbSession,
    context: Context,
    range_header: Annotated[
        str | None, Header(alias="Range", description="bytes=first-last, bytes=first- or bytes=-suffix")
    ] = None,
    if_range: Annotated[
        str | None, Header(alias="If-Range", description="Honour Range only if still this ETag")
    ] = None,
) -> Response:
    bucket = await in_worker(db, partial(service.usable_bucket, db, context, user, storage_id))
    info = await run_in_threadpool(service.head_object, context, bucket, key)
    headers = object_headers(info)
    wanted = range_header if range_header and if_range_matches(if_range, info) else None
    try:
        span = parse_range(wanted, info.size) if wanted else None
    except RangeNotSatisfiable as exc:
        return JSONResponse(
            error_body("range_not_satisfiable", str(exc)),
            status_code=416,
            headers={"Content-Range": f"bytes */{info.size}", "Accept-Ranges": "bytes"},
        )
    first, last = span if span is not None else (0, info.size - 1)
    headers["Content-Length"] = str(last - first + 1)
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    # Ask for exactly the bytes the headers announce (never more if the object grew meanwhile).
    # The backends raise NotFound on call, before the first chunk, so a missing object is a 404
    # here and never a broken 200.
    byte_range = (first, last) if info.size else None
    chunks = await run_in_threadpool(
        partial(service.read_object, context, bucket, key, byte_range=byte_range, chunk_size=CHUNK_SIZE)
    )
    return StreamingResponse(
        iterate_in_thread(chunks), status_code=206 if span is not None else 200, headers=headers,
        media_type=headers["Content-Type"],
    )  # fmt: skip


@router.head(
    "/{storage_id}/objects/{key:path}",
    response_class=Response,
    summary="An object's download headers (size, type, ETag) without its bytes",
    responses=error_responses(400, 409),
)
def head_object(storage_id: str, key: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    info = service.head_object(context, service.usable_bucket(db, context, user, storage_id), key)
    headers = object_headers(info)
    headers["Content-Length"] = str(info.size)
    return Response(status_code=200, headers=headers)


@router.delete(
    "/{storage_id}/objects/{key:path}",
    status_code=204,
    response_class=Response,
    summary="Delete an object (deleting one that does not exist also succeeds)",
    responses=error_responses(400, 409),
)
def delete_object(storage_id: str, key: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    service.delete_objects(db, context, user, storage_id, [key])
    return Response(status_code=204)
