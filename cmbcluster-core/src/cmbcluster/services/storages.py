"""Users' buckets: the ``storages`` rows and the storage backend, kept consistent.

Every function here is blocking (database and backend calls): the API calls them from worker
threads. Functions that reach a provider take the :class:`~cmbcluster.context.AppContext` after
the database session, as :mod:`cmbcluster.services.environments` does. Ownership is checked in
one place, :func:`get_owned`, which answers NotFound for an unknown id and for another user's id
alike, so nobody learns that someone else's bucket exists. Transactions end before any backend
call that may take long (a bucket's creation or deletion, a transfer, a usage measurement).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, Update, and_, delete, func, literal, or_, select, union_all, update
from sqlalchemy.orm import Session

from cmbcluster.db.engine import begin_locked
from cmbcluster.db.models import (
    Environment,
    EnvironmentStorage,
    Group,
    GroupMember,
    Storage,
    UploadJournal,
    User,
    utcnow,
)
from cmbcluster.errors import (
    AlreadyExists,
    CmbclusterError,
    Conflict,
    InsufficientStorage,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
)
from cmbcluster.interfaces import BucketOptions, ObjectInfo, ObjectPage, StorageBackend, StorageClass, UserRef
from cmbcluster.naming import validate_new_object_key, validate_object_key, validate_object_prefix
from cmbcluster.services import accounting, instances
from cmbcluster.services.audit import audit
from cmbcluster.services.ownership import owned
from cmbcluster.services.usage import Usage, cached_usage, is_stale
from cmbcluster.text import check_display_name

if TYPE_CHECKING:
    from cmbcluster.context import AppContext

log = logging.getLogger(__name__)

#: Environments in these states do not hold their buckets (the rest may be mounting them).
INACTIVE_ENVIRONMENT_STATUSES = ("stopped", "failed")
#: ``storages.display_name``'s size
MAX_DISPLAY_NAME = 100


# -- rows --------------------------------------------------------------------------------------


def get_owned(db: Session, user: User, storage_id: str) -> Storage:
    """The caller's storage, or NotFound: another user's id is answered exactly like an unknown one."""
    return owned(db, Storage, user, storage_id, what="storage")


def list_owned(db: Session, user: User) -> list[Storage]:
    return list(
        db.execute(select(Storage).where(Storage.user_id == user.id).order_by(Storage.created_at, Storage.id)).scalars()
    )


def sync_identity_access(db: Session, context: AppContext, user: User) -> None:
    """Tell the infra provider which buckets ``user``'s cloud identity may reach now: every active
    bucket of theirs on the active backend (see ``InfraProvider.update_user_buckets``). A failure
    raises: a start needs it done."""
    backend_name = context.config.storage.name
    rows = list_owned(db, user)
    buckets = [row.bucket_name for row in rows if row.status == "active" and row.backend == backend_name]
    context.infra.update_user_buckets(UserRef(id=user.id, email=user.email), buckets)


def _sync_identity_after_change(db: Session, context: AppContext, user: User) -> None:
    """After a bucket change, the user's cloud identity reaches exactly their buckets. The change
    itself has happened and is kept; a failure here is logged, and the next start applies it again
    (a start fails, with the reason, until it succeeds)."""
    try:
        sync_identity_access(db, context, user)
    except CmbclusterError as exc:
        log.warning("updating the cloud identity of user %s for their buckets failed: %s", user.id, exc.message)


def require_usable(storage: Storage, backend_name: str) -> None:
    """Objects can be reached only in an active storage that lives on the active backend."""
    if storage.status != "active":
        raise Conflict(f"the bucket {storage.display_name!r} is {storage.status}; its files cannot be used now")
    require_backend(storage, backend_name)


def require_backend(storage: Storage, backend_name: str) -> None:
    if storage.backend != backend_name:
        raise Conflict(
            # Seen between `migrate run` switching a bucket and the server moving to the new cloud:
            # the owner must not think the files lost.
            f"the bucket {storage.display_name!r} lives on the storage backend {storage.backend!r} now, and this "
            f"server uses {backend_name!r}: its files are there, and can be used again once the server is "
            f"configured for {storage.backend!r} (ask an administrator)"
        )


def count_owned(db: Session, user: User) -> int:
    return db.execute(select(func.count()).select_from(Storage).where(Storage.user_id == user.id)).scalar_one()


# -- buckets -----------------------------------------------------------------------------------


def create_storage(
    db: Session, context: AppContext, user: User, *, display_name: str, storage_class: StorageClass
) -> Storage:
    """Create the bucket, then its row; never one without the other. Then the user's cloud
    identity is given the new bucket (a failure there is logged, the bucket kept).

    The limit is answered with Conflict (409), not LimitExceeded (429): it is the user's current
    state (N buckets) that clashes with the request, and deleting a bucket resolves it, whereas
    429 means "retry later" and would make clients wait for nothing. The count is checked before
    creating the bucket (so an over-limit request costs no cloud call) and again in the inserting
    transaction (SQLite serialises writers, so concurrent creations cannot both pass it there).
    """
    display_name = check_display_name(display_name, what="a bucket name", limit=MAX_DISPLAY_NAME)
    backend, backend_name = context.storage, context.config.storage.name
    max_buckets = context.config.core.max_buckets_per_user
    _check_limit(db, user, max_buckets, adding=0)
    _check_unique_name(db, user, display_name)
    db.commit()  # end the read transaction: the backend call may take seconds
    info = backend.create_bucket(
        UserRef(id=user.id, email=user.email),
        BucketOptions(display_name=display_name, storage_class=storage_class),
    )
    try:
        now = utcnow()
        storage = Storage(
            user_id=user.id, backend=backend_name, bucket_name=info.name, display_name=display_name,
            storage_class=str(info.storage_class), status="active", created_at=now,
            usage_bytes=0, usage_objects=0, usage_noncurrent_bytes=0, usage_noncurrent_objects=0, usage_at=now,
        )  # fmt: skip
        db.add(storage)
        db.flush()
        _check_limit(db, user, max_buckets, adding=1)
        _check_unique_name(db, user, display_name, new_id=storage.id)
        audit(db, actor_id=user.id, action="storage.created", target_type="storage", target_id=storage.id,
              display_name=display_name, bucket=info.name, backend=backend_name,
              storage_class=str(info.storage_class))  # fmt: skip
        db.commit()
    except BaseException:
        db.rollback()
        _delete_orphan_bucket(backend, info.name)
        raise
    log.info("storage %s created (bucket %s)", storage.id, info.name, extra={"storage_id": storage.id})
    _sync_identity_after_change(db, context, user)
    return storage


def _check_limit(db: Session, user: User, max_buckets: int, *, adding: int) -> None:
    count = count_owned(db, user)
    if count - adding >= max_buckets:
        raise Conflict(
            f"you already have {count - adding} buckets, the most allowed per user is {max_buckets}; "
            "delete one before creating another"
        )


def _check_unique_name(db: Session, user: User, display_name: str, *, new_id: str | None = None) -> None:
    """A person tells their buckets apart by name: two of one user's buckets never share one (case
    and surrounding spaces aside). Checked before the bucket is made, and again in the inserting
    transaction (``new_id``: the row being inserted, not a clash with itself), like the limit."""
    # Compared here, not with the database's lower(), which folds ASCII only on SQLite ("ΣΦΧ" twice
    # passed); a person has a few dozen buckets at most.
    wanted = display_name.strip().casefold()
    rows = db.execute(select(Storage.id, Storage.display_name).where(Storage.user_id == user.id)).all()
    existing = next((name for id_, name in rows if id_ != new_id and name.strip().casefold() == wanted), None)
    if existing is not None:
        # The existing bucket's name as stored: the one typed may differ in case, and would read as a
        # bucket the person never made.
        how = "" if existing.strip() == display_name.strip() else " (names are compared ignoring case)"
        raise AlreadyExists(f"you already have a bucket named {existing.strip()!r}{how}: choose another name")


def _delete_orphan_bucket(backend: StorageBackend, bucket: str) -> None:
    try:
        backend.delete_bucket(bucket, force=True)
    except Exception:
        log.exception("bucket %s was created but its row could not be stored, and deleting it failed", bucket)


def delete_storage(db: Session, context: AppContext, user: User, storage_id: str, *, force: bool) -> None:
    """Delete the caller's bucket, then its row; then the user's cloud identity loses it. A bucket
    mounted by an environment that may be running is refused (Conflict); links from stopped
    environments are removed with the row.

    The row is marked ``deleting`` while the backend works, so uploads stop meanwhile; if the
    backend refuses (non-empty without ``force``) or fails, the row becomes ``active`` again. A
    bucket already gone from the backend (an earlier attempt that crashed) counts as deleted.
    """
    storage = get_owned(db, user, storage_id)
    require_backend(storage, context.config.storage.name)
    holders = db.execute(
        select(Environment.name, Environment.status)
        .join(EnvironmentStorage, EnvironmentStorage.environment_id == Environment.id)
        .where(EnvironmentStorage.storage_id == storage.id, Environment.status.not_in(INACTIVE_ENVIRONMENT_STATUSES))
        .order_by(Environment.name)
    ).all()
    if holders:
        names = ", ".join(f"{name!r} ({status})" for name, status in holders)
        them = "it" if len(holders) == 1 else "them"
        raise Conflict(
            f"the bucket {storage.display_name!r} is mounted by the environment{'s' if len(holders) > 1 else ''} "
            f"{names}: stop {them} first, then delete the bucket"
        )
    storage.status, storage.delete_force, storage.delete_owner = "deleting", force, context.instance_id
    db.commit()
    try:
        context.storage.delete_bucket(storage.bucket_name, force=force)
    except NotFound:
        log.warning("bucket %s of storage %s was already gone from the backend", storage.bucket_name, storage.id)
    except BaseException as exc:
        db.rollback()
        storage.status = "active"
        db.commit()
        if isinstance(exc, Conflict):  # not empty, still written to: the user's to resolve
            # The backend names the bucket by its real name (cmb-...), which the user never chose nor sees.
            named = exc.message.replace(storage.bucket_name, repr(storage.display_name))
            raise Conflict(named, detail=exc.detail) from None
        raise
    _forget_deleted(db, context, storage, actor_id=user.id, force=force)
    _sync_identity_after_change(db, context, user)


def _forget_deleted(db: Session, context: AppContext, storage: Storage, *, actor_id: str | None, force: bool,
                    resumed: bool = False) -> None:  # fmt: skip
    """The bucket is gone: its row and its links from stopped environments go too, audited."""
    detached = list(
        db.execute(
            select(EnvironmentStorage.environment_id).where(EnvironmentStorage.storage_id == storage.id)
        ).scalars()
    )
    db.execute(delete(EnvironmentStorage).where(EnvironmentStorage.storage_id == storage.id))
    accounting.close_storage(db, storage.id, utcnow())
    db.delete(storage)
    extra = {"resumed_after_restart": True} if resumed else {}
    audit(db, actor_id=actor_id, action="storage.deleted", target_type="storage", target_id=storage.id,
          display_name=storage.display_name, bucket=storage.bucket_name, force=force,
          detached_environments=detached, **extra)  # fmt: skip
    db.commit()
    log.info("storage %s deleted (bucket %s)", storage.id, storage.bucket_name, extra={"storage_id": storage.id})
    context.storage_runtime.refresher.invalidate(storage.id)


def resume_interrupted_deletes(db: Session, context: AppContext) -> dict[str, str]:
    """Finish the bucket deletes a crash interrupted (rows left ``deleting`` by a server instance
    that is gone, see :mod:`~cmbcluster.services.instances`), as they were asked (with or without
    force). A delete the backend refuses (not empty without force) or cannot do now is rolled
    back: the storage is ``active`` again, its usage re-measured, so what the user sees is what is
    stored and billed; they may delete it again.
    Returns each storage id with what became of it (``deleted`` or ``active``)."""
    backend_name = context.config.storage.name
    rows = list(
        db.execute(
            select(Storage).where(
                Storage.status == "deleting", Storage.backend == backend_name,
                instances.owned_by_gone(context, Storage.delete_owner),
            )
        ).scalars()
    )  # fmt: skip
    outcome: dict[str, str] = {}
    for storage in rows:
        owner = db.get(User, storage.user_id)
        db.commit()
        try:
            context.storage.delete_bucket(storage.bucket_name, force=storage.delete_force)
        except NotFound:
            pass  # deleted before the crash; only the row was left
        except CmbclusterError as exc:
            log.warning("the interrupted delete of storage %s (bucket %s) could not be finished, so it is active "
                        "again: %s", storage.id, storage.bucket_name, exc.message)  # fmt: skip
            storage.status, storage.usage_at = "active", None
            audit(db, actor_id=None, action="storage.delete_rolled_back", target_type="storage",
                  target_id=storage.id, bucket=storage.bucket_name, reason=exc.message)  # fmt: skip
            db.commit()
            outcome[storage.id] = "active"
            continue
        log.warning("finished the delete of storage %s (bucket %s) that a restart interrupted",
                    storage.id, storage.bucket_name)  # fmt: skip
        _forget_deleted(db, context, storage, actor_id=None, force=storage.delete_force, resumed=True)
        outcome[storage.id] = "deleted"
        if owner is not None:
            _sync_identity_after_change(db, context, owner)
    return outcome


# -- objects -----------------------------------------------------------------------------------

#: Keys recorded in one audit event; a batch of up to 1000 keys of up to 1 KiB each would make
#: a megabyte-sized row, so larger batches are recorded by count with the first keys as a sample.
AUDIT_KEYS = 50


def usable_storage(db: Session, context: AppContext, user: User, storage_id: str) -> Storage:
    """The caller's storage, whose objects may be used now (active, on the active backend); the
    transaction ends here, before any transfer."""
    storage = get_owned(db, user, storage_id)
    require_usable(storage, context.config.storage.name)
    db.commit()
    return storage


def usable_bucket(db: Session, context: AppContext, user: User, storage_id: str) -> str:
    """The bucket name of :func:`usable_storage`."""
    return usable_storage(db, context, user, storage_id).bucket_name


def list_objects(
    db: Session,
    context: AppContext,
    user: User,
    storage_id: str,
    prefix: str,
    *,
    delimiter: str | None,
    page_token: str | None,
    page_size: int,
) -> ObjectPage:
    """One page of the objects of the caller's storage under ``prefix``; ``page_token`` and the
    page's ``next_token`` are this server's sealed tokens (:func:`_seal_page_token`)."""
    bucket = usable_bucket(db, context, user, storage_id)
    validate_object_prefix(prefix)
    listing = _listing_digest(storage_id, prefix, delimiter)
    page = context.storage.list_objects(
        bucket, prefix, delimiter=delimiter, page_token=_unseal_page_token(context, listing, page_token),
        page_size=page_size,
    )  # fmt: skip
    return replace(page, next_token=_seal_page_token(context, listing, page.next_token))


#: The Sealer purpose of the objects listing's page tokens.
PAGE_TOKEN_PURPOSE = "object-page-tokens"  # noqa: S105 - a key-derivation label, not a secret
_LISTING_DIGEST_BYTES = 16


def _listing_digest(storage_id: str, prefix: str, delimiter: str | None) -> bytes:
    """What a page token is given for: one bucket's listing under one prefix, with or without folders."""
    return hashlib.sha256(json.dumps([storage_id, prefix, delimiter]).encode()).digest()[:_LISTING_DIGEST_BYTES]


def _seal_page_token(context: AppContext, listing: bytes, token: str | None) -> str | None:
    """The backend's next-page token as the API gives it: sealed with the listing it continues.

    A backend's token is its own business (the local backend's is a key, S3's is S3's), so a token
    no server gave could only be refused by guessing at each; sealed, any other is refused alike."""
    if token is None:
        return None
    sealed = context.sealer(PAGE_TOKEN_PURPOSE).seal(listing + token.encode())
    return base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")


def _unseal_page_token(context: AppContext, listing: bytes, given: str | None) -> str | None:
    if not given:
        return None
    try:
        plain = context.sealer(PAGE_TOKEN_PURPOSE).unseal(base64.urlsafe_b64decode(given + "=" * (-len(given) % 4)))
        token = plain[_LISTING_DIGEST_BYTES:].decode()
    except ValueError:  # not base64, not sealed by this server (or its previous key), not text
        raise InvalidRequest("page_token is not one this server gave: start from the first page without it") from None
    if plain[:_LISTING_DIGEST_BYTES] != listing:
        raise InvalidRequest(
            "page_token was given for another listing (another bucket, prefix or delimiter): "
            "start from the first page without it"
        )
    return token


def head_object(context: AppContext, bucket: str, key: str) -> ObjectInfo:
    """An object's metadata (NotFound when it does not exist)."""
    return context.storage.head_object(bucket, validate_object_key(key))


def read_object(
    context: AppContext, bucket: str, key: str, *, byte_range: tuple[int, int] | None, chunk_size: int
) -> Iterator[bytes]:
    """An object's bytes (``byte_range``: first and last, inclusive); NotFound before the first chunk."""
    return context.storage.download_object(
        bucket, validate_object_key(key), byte_range=byte_range, chunk_size=chunk_size
    )


def write_object(
    context: AppContext,
    storage_id: str,
    bucket: str,
    key: str,
    chunks: Iterable[bytes],
    *,
    content_type: str | None,
    allowance: Allowance | None = None,
    declared: int | None = None,
) -> ObjectInfo:
    """Store an object from a stream of chunks (all or nothing), then mark the storage's usage stale.

    The upload is journalled while it runs (:class:`~cmbcluster.db.models.UploadJournal`), owned by
    this server instance: if the server dies meanwhile, the replica that recovers aborts what the
    backend kept of it (:func:`abort_journalled_uploads`). The entry also holds the upload's bytes
    against the quotas of ``allowance`` (:class:`UploadReservation`): uploads running at once,
    on any replica, cannot together pass a quota."""
    key = validate_new_object_key(key)
    reservation = UploadReservation(context, allowance, storage_id=storage_id, bucket=bucket, key=key)
    reservation.open(declared)
    try:
        info = context.storage.upload_object(bucket, key, reservation.holding(chunks), content_type=content_type)
        reservation.finish(info.size)
    finally:
        reservation.close()  # failed, or stopped: the hold ends (nothing to do once finished)
    return info


def abort_journalled_uploads(db: Session, context: AppContext) -> int:
    """Abort what the backend keeps of the uploads that server instances now gone began and never
    finished (a SIGKILL, an OOM kill, a redeploy, a replica lost), and of those whose entry was not
    renewed for :func:`hold_lifetime` (an upload whose end could not be recorded), and forget
    them. A live upload of the same key is spared: only what began before it is aborted. An entry
    whose bucket cannot be reached now stays for the next pass (the bucket's lifecycle rule
    aborts it after a day anyway). Returns how many unfinished uploads were aborted."""
    backend = UploadJournal.backend == context.config.storage.name
    rows = list(db.execute(select(UploadJournal).where(backend, _ended_uploads(context))).scalars())
    aborted = 0
    for row in rows:
        # A live upload's multipart upload begins after its journal entry was written.
        live_since = db.execute(
            select(func.min(UploadJournal.started_at)).where(
                backend, UploadJournal.bucket_name == row.bucket_name, UploadJournal.key == row.key,
                _live_uploads(context),
            )
        ).scalar_one_or_none()  # fmt: skip
        started_before = min(utcnow(), live_since) if live_since is not None else utcnow()
        try:
            aborted += context.storage.abort_unfinished_uploads(row.bucket_name, key=row.key,
                                                                started_before=started_before)  # fmt: skip
        except NotFound:
            pass  # the bucket is gone, and its uploads with it
        except CmbclusterError as exc:
            log.warning("could not abort the unfinished upload of %s to bucket %s: %s; trying again at the next "
                        "pass", row.key, row.bucket_name, exc.message)  # fmt: skip
            continue
        db.delete(row)
        db.commit()
    if aborted:
        log.warning("aborted %d unfinished uploads a server that is gone (or an upload that stalled) left behind",
                    aborted)  # fmt: skip
    return aborted


#: The most objects one request deletes, moves or zips by folder; past it, the request is refused
#: (and nothing done), saying to act on fewer at once.
MAX_FOLDER_OBJECTS = 10_000
#: Objects a backend call deletes at once.
DELETE_BATCH = 1000


def delete_keys(context: AppContext, bucket: str, keys: Sequence[str]) -> None:
    """Delete ``keys`` from ``bucket``, :data:`DELETE_BATCH` at a time (a backend call each)."""
    for start in range(0, len(keys), DELETE_BATCH):
        context.storage.delete_objects(bucket, list(keys[start : start + DELETE_BATCH]))


def delete_objects(
    db: Session, context: AppContext, user: User, storage_id: str, keys: Sequence[str], prefixes: Sequence[str] = ()
) -> int:
    """Delete ``keys`` and every object under each of ``prefixes`` (folders, ending with ``/``):
    validated first, all or none of a batch is attempted. Returns how many."""
    storage = get_owned(db, user, storage_id)
    require_usable(storage, context.config.storage.name)
    for key in keys:
        if key.endswith("/") and key.strip("/"):
            raise InvalidRequest(f"{key!r} names a folder: folders to delete go in 'prefixes', files in 'keys'")
    unique = list(dict.fromkeys(validate_object_key(key) for key in keys))
    bucket = storage.bucket_name
    db.commit()  # no transaction held open across the backend call
    if prefixes:
        found = {info.key for info in folder_objects(context, bucket, prefixes)}
        unique = list(dict.fromkeys([*unique, *sorted(found)]))
    delete_keys(context, bucket, unique)
    audit(db, actor_id=user.id, action="storage.objects_deleted", target_type="storage", target_id=storage_id,
          count=len(unique), keys=unique[:AUDIT_KEYS], truncated=len(unique) > AUDIT_KEYS)  # fmt: skip
    invalidate_usage(db, context, storage_id)
    return len(unique)


def folder_objects(context: AppContext, bucket: str, prefixes: Iterable[str]) -> list[ObjectInfo]:
    """Every object under each folder (``prefix`` ending with ``/``), in key order; a request that
    reaches more than :data:`MAX_FOLDER_OBJECTS` is refused before anything is done."""
    found: dict[str, ObjectInfo] = {}
    for prefix in dict.fromkeys(prefixes):
        validate_object_prefix(prefix)
        if not prefix or not prefix.endswith("/"):
            raise InvalidRequest(f"a folder is named with a final '/': {prefix!r}")
        token: str | None = None
        while True:
            page = context.storage.list_objects(bucket, prefix, delimiter=None, page_token=token, page_size=1000)
            for info in page.objects:
                found[info.key] = info
            if len(found) > MAX_FOLDER_OBJECTS:
                raise Conflict(
                    f"these folders hold more than {MAX_FOLDER_OBJECTS} files: choose fewer at once (nothing was done)"
                )
            token = page.next_token
            if token is None:
                break
    return [found[key] for key in sorted(found)]


def selected_objects(
    db: Session, context: AppContext, user: User, storage_id: str, keys: Sequence[str], prefixes: Sequence[str]
) -> tuple[Storage, list[ObjectInfo]]:
    """The caller's bucket and the objects named by ``keys`` and under ``prefixes`` (each checked to
    exist: NotFound names a missing one), in key order, for a download of several at once."""
    storage = get_owned(db, user, storage_id)
    require_usable(storage, context.config.storage.name)
    db.commit()
    if not keys and not prefixes:
        raise InvalidRequest(
            "choose at least one file or folder: form fields `key` (a file) or `prefix` (a folder ending in '/'), "
            "sent as application/x-www-form-urlencoded"
        )
    found = {info.key: info for info in folder_objects(context, storage.bucket_name, prefixes)}
    for key in dict.fromkeys(keys):
        if key not in found:
            try:
                found[key] = context.storage.head_object(storage.bucket_name, validate_object_key(key))
            except NotFound:
                raise NotFound(
                    f"{key.rsplit('/', 1)[-1]!r} is not in this bucket (any more): reload the page"
                ) from None
    if len(found) > MAX_FOLDER_OBJECTS:
        raise Conflict(f"more than {MAX_FOLDER_OBJECTS} files are chosen: choose fewer at once")
    return storage, [found[key] for key in sorted(found)]


def archive_folder(base: str) -> str:
    """The folder a zip's names are relative to (the folder the page shows): ``base`` as a folder key
    ending with '/' (``maps`` is ``maps/``), or '' for the bucket's top; 400 for what no key could be.
    With its slash, a key outside it keeps its whole name (``m`` would cut ``maps/a`` to ``aps/a``)."""
    if not base:
        return ""
    return validate_object_key(base.removesuffix("/")) + "/"


def zip_archive(
    context: AppContext, bucket: str, objects: Sequence[ObjectInfo], base: str
) -> tuple[Iterator[bytes], int]:
    """A zip of ``objects`` (stored, not compressed: research data rarely compresses, and a stored
    zip's size is known in advance) as a stream of chunks, and its size. Each object is read from the
    backend only when the stream reaches it, a chunk at a time (zipstream-ng): constant memory
    however large the files. Names in the zip are the keys without ``base`` (:func:`archive_folder`)."""
    from zipstream import ZIP_STORED, ZipStream

    archive = ZipStream(compress_type=ZIP_STORED, sized=True)
    for info in objects:
        name = info.key[len(base) :] if base and info.key.startswith(base) else info.key
        archive.add(_lazy_object(context, bucket, info), name, size=info.size)
    return iter(archive), len(archive)


def _lazy_object(context: AppContext, bucket: str, info: ObjectInfo) -> Iterator[bytes]:
    """An object's bytes, asked of the backend at the first ``next()``: exactly ``info.size`` of them."""
    if info.size == 0:
        return
    yield from context.storage.download_object(bucket, info.key, byte_range=(0, info.size - 1))


#: The most objects one move copies; a larger folder is moved in parts (or from an environment).
MAX_MOVE_OBJECTS = 1000


def move_objects(db: Session, context: AppContext, user: User, storage_id: str, source: str, destination: str) -> int:
    """Rename or move a file (``source`` a key) or a folder (``source`` ending with ``/``, every
    object under it) to ``destination`` in the same bucket. Storage services have no rename: each
    object is copied (downloaded and uploaded again, streamed through the control plane in constant
    memory) and then deleted, the sources only once every copy exists. Refused, with nothing done,
    when something already exists at a destination. Returns how many objects moved."""
    storage = get_owned(db, user, storage_id)
    require_usable(storage, context.config.storage.name)
    db.commit()
    folder = source.endswith("/")
    if folder != destination.endswith("/"):
        raise InvalidRequest("a folder moves to a folder (both end with '/'), a file to a file name")
    if folder:
        validate_object_prefix(source)
        validate_object_prefix(destination)
        if destination.startswith(source):
            raise InvalidRequest("a folder cannot be moved into itself")
    else:
        validate_object_key(source)
    with _moving(db, context, storage):  # listed under the claim: a move before it may have moved them
        pairs = _move_pairs(context, storage.bucket_name, source, destination)
        if source == destination:
            return 0
        _copy_all(db, context, storage, pairs, _move_allowance(db, context, user, storage, pairs))
        delete_keys(context, storage.bucket_name, [info.key for info, _ in pairs])
    audit(db, actor_id=user.id, action="storage.objects_moved", target_type="storage", target_id=storage_id,
          display_name=storage.display_name, source=source, destination=destination, count=len(pairs))  # fmt: skip
    invalidate_usage(db, context, storage_id)
    return len(pairs)


def _move_pairs(context: AppContext, bucket: str, source: str, destination: str) -> list[tuple[ObjectInfo, str]]:
    """Each object a move takes (a file, or every file of a folder) with its new key, none of which
    may exist yet."""
    if source.endswith("/"):
        objects = folder_objects(context, bucket, [source])
        if not objects:
            raise NotFound(f"the folder {source!r} is empty or does not exist")
        if len(objects) > MAX_MOVE_OBJECTS:
            raise Conflict(
                f"the folder holds more than {MAX_MOVE_OBJECTS} files: move its sub-folders one at a time (or its "
                "files one by one), or move it in an environment, where the bucket is a folder"
            )
        pairs = [(info, destination + info.key[len(source) :]) for info in objects]
    else:
        try:
            pairs = [(context.storage.head_object(bucket, source), destination)]
        except NotFound:
            if context.storage.list_objects(bucket, source + "/", delimiter=None, page_token=None, page_size=1).objects:
                raise NotFound(f"{source!r} is a folder: to move it, end both names with '/' "
                               f"({source + '/'!r} to {destination + '/'!r})") from None  # fmt: skip
            raise
    for _, target in pairs:
        validate_new_object_key(target)
        try:
            context.storage.head_object(bucket, target)
        except NotFound:
            continue
        if source != destination:
            raise AlreadyExists(f"{target!r} already exists: choose another name, or delete it first")
    return pairs


@contextlib.contextmanager
def _moving(db: Session, context: AppContext, storage: Storage) -> Iterator[None]:
    """Run a move as the bucket's only one: a move copies and then deletes, so two moves of one folder
    at once would each copy it (and pass the quotas the copies count in). Claimed in the database, for
    every replica; a claim whose server is gone counts for nothing, and one the database could not take
    back when the move ended is given back at the next heartbeat. Another move is refused (409) until
    then: no connection is held meanwhile."""
    claimed = db.execute(
        update(Storage)
        .where(Storage.id == storage.id, instances.owned_by_gone(context, Storage.move_owner))
        .values(move_owner=context.instance_id)
    )
    db.commit()
    if claimed.rowcount == 0:  # type: ignore[attr-defined]  # a CursorResult
        raise Conflict(f"another move in bucket {storage.display_name!r} is under way: try again once it is done")
    try:
        yield
    finally:
        mine = (Storage.id == storage.id) & (Storage.move_owner == context.instance_id)
        give_back = update(Storage).where(mine).values(move_owner=None)
        try:
            db.rollback()  # whatever failed, the claim is given back
            db.execute(give_back)
            db.commit()
        except Exception:  # the database is away: given back at the next heartbeat (the error to report is the move's)
            log.exception("could not end the move claim on bucket %s; trying again shortly", storage.bucket_name)
            context.deferred_writes.add(give_back)


def _copy_all(
    db: Session, context: AppContext, storage: Storage, pairs: Sequence[tuple[ObjectInfo, str]],
    allowance: Allowance | None,
) -> None:  # fmt: skip
    """Copy each object of ``pairs`` to its new key; all or nothing: when one fails, the copies made
    before it are deleted (the originals are all still there) and its error raised."""
    bucket, copied = storage.bucket_name, []
    try:
        for info, target in pairs:
            # As an upload: journalled (a crash mid-copy leaves nothing billed), and held against the
            # quotas its copies count in, so that uploads running meanwhile cannot pass them together.
            chunks = _lazy_object(context, bucket, info)
            write_object(context, storage.id, bucket, target, chunks, content_type=info.content_type or None,
                         allowance=allowance, declared=info.size)  # fmt: skip
            copied.append(target)
    except BaseException:
        _take_back(db, context, storage.id, bucket, copied)
        raise


def _take_back(db: Session, context: AppContext, storage_id: str, bucket: str, copied: Sequence[str]) -> None:
    """Delete the copies a move that failed made (best effort: the error that stopped it is the one to report)."""
    if not copied:
        return
    try:
        delete_keys(context, bucket, copied)
        invalidate_usage(db, context, storage_id)
    except Exception:
        log.exception("a failed move's %d copies in bucket %s could not all be deleted", len(copied), bucket)


#: How long a move waits for its bucket's usage to be measured, where stale, before checking quotas.
MOVE_USAGE_WAIT_SECONDS = 10.0


def _move_allowance(
    db: Session, context: AppContext, user: User, storage: Storage, pairs: Sequence[tuple[ObjectInfo, str]]
) -> Allowance | None:
    """The quotas a move must fit when its bucket keeps earlier versions: there the originals stay,
    billed, as earlier versions until the bucket's lifecycle removes them, so a move adds its
    bytes as an upload would (otherwise moving files back and forth would pass any quota).
    Refused with InsufficientStorage (507) before anything is copied; None when nothing is counted
    (no versions kept, or no quota)."""
    moved = sum(info.size for info, _ in pairs)
    own_quota, groups = quotas_of(db, context, user)
    db.commit()
    # Asked of the backend (a few cloud calls) only where a quota counts.
    if (
        moved == 0
        or (own_quota is None and not groups)
        or not context.storage.get_bucket(storage.bucket_name).versioning
    ):
        return None
    allowance = upload_allowance(db, context, user, storage, declared=moved, wait_seconds=MOVE_USAGE_WAIT_SECONDS,
                                 check=False)  # fmt: skip
    tightest = allowance.tightest
    if tightest is not None and allowance.refuses(moved):
        assert tightest.quota_bytes is not None
        raise InsufficientStorage(
            f"this bucket keeps earlier versions: moving {len(pairs)} file{'s' if len(pairs) != 1 else ''} "
            f"keeps their {_size(moved)} where they were until its lifecycle removes them, more than the "
            f"{_size(tightest.remaining_bytes or 0)} left of {tightest.whose} of {_size(tightest.quota_bytes)} "
            f"({_size(tightest.used_bytes)} used, earlier versions included{tightest.held()}); nothing was moved. "
            "Delete files (earlier versions go with the lifecycle), or ask an administrator for more"
        )
    return allowance


def invalidate_usage(db: Session, context: AppContext, storage_id: str, *, added_bytes: int = 0) -> None:
    """After a change made through the API, the storage's cached usage is stale: marked so (and
    committed, with whatever the session holds), and a measurement under way is not stored.

    An upload's ``added_bytes`` are added to the cached figures meanwhile: other members of the
    user's groups count this bucket by them (:func:`quota_states`) without measuring it. Replacing
    an object counts its bytes twice until the next measurement (versioned buckets keep the old
    ones anyway), the safe side for a quota. The storage's ``usage_version`` changes: a measurement
    that began before, on any replica, does not replace these figures with its older ones."""
    db.execute(_usage_changed(storage_id, added_bytes))
    db.commit()
    context.storage_runtime.refresher.invalidate(storage_id)


def _usage_changed(storage_id: str, added_bytes: int) -> Update:
    """The statement of :func:`invalidate_usage`."""
    values: dict[str, Any] = {"usage_at": None, "usage_version": Storage.usage_version + 1}
    if added_bytes:
        values["usage_bytes"] = func.coalesce(Storage.usage_bytes, 0) + added_bytes
    return update(Storage).where(Storage.id == storage_id).values(**values)


# -- usage ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QuotaState:
    """A storage quota (the user's own, or one of their groups') and what counts against it: the
    buckets' current objects and the earlier versions kept of overwritten or deleted ones (what the
    cloud bills), as last measured, and, before an upload, what the uploads under way hold."""

    quota_bytes: int | None  # None: no quota
    current_bytes: int
    noncurrent_bytes: int
    user_id: str  # the user whose quotas these are
    group_id: str | None = None  # None: the user's own quota
    group: str | None = None  # the group's name
    reserved_bytes: int = 0  # held by uploads under way (counted before an upload only)

    @property
    def used_bytes(self) -> int:
        return self.current_bytes + self.noncurrent_bytes

    @property
    def remaining_bytes(self) -> int | None:
        if self.quota_bytes is None:
            return None
        return max(self.quota_bytes - self.used_bytes - self.reserved_bytes, 0)

    @property
    def whose(self) -> str:
        return "your storage quota" if self.group is None else f"the storage quota of your group {self.group!r}"

    def held(self) -> str:
        """What uploads under way hold, for a message; empty when nothing."""
        return f", and {_size(self.reserved_bytes)} held by uploads under way" if self.reserved_bytes else ""


def quota_of(context: AppContext, user: User) -> int | None:
    """The user's own quota, else the server's (CMBCLUSTER_STORAGE_QUOTA_BYTES); 0 means none."""
    quota = user.storage_quota_bytes
    if quota is None:
        quota = context.config.core.storage_quota_bytes
    return quota or None


@dataclass(frozen=True, kw_only=True)
class GroupQuota:
    """A group's storage quota, over its members' buckets together."""

    id: str
    name: str
    quota_bytes: int


def quotas_of(db: Session, context: AppContext, user: User) -> tuple[int | None, list[GroupQuota]]:
    """The user's own quota (None: none) and those of their groups that have one, by name."""
    groups = [
        GroupQuota(id=group_id, name=name, quota_bytes=quota or 0)
        for group_id, name, quota in db.execute(
            select(Group.id, Group.name, Group.storage_quota_bytes)
            .join(GroupMember, GroupMember.group_id == Group.id)
            .where(GroupMember.user_id == user.id, Group.storage_quota_bytes.is_not(None))
            .order_by(Group.name)
        )
    ]
    return quota_of(context, user), groups


def quota_states(
    db: Session, context: AppContext, user: User, own: Sequence[tuple[Storage, Usage]]
) -> list[QuotaState]:
    """The user's own quota state, then that of each of their groups with a storage quota (by
    name). ``own`` is every storage of the user with its usage (as just measured); the other
    members' buckets count as last measured (their cached figures, summed in the database)."""
    own_quota, groups = quotas_of(db, context, user)
    return _states(db, user.id, own_quota, groups, {row.id: usage for row, usage in own}, all_own=True)


def _states(
    db: Session,
    user_id: str,
    own_quota: int | None,
    groups: Sequence[GroupQuota],
    fresh: Mapping[str, Usage],
    *,
    all_own: bool,
    only_set: bool = False,
) -> list[QuotaState]:
    """The quota states, from ``fresh`` (usage of some of the user's own storages; ``all_own``:
    all of them) and the cached usage of every other storage that counts."""
    want_own = own_quota is not None or not only_set
    cached = _cached_usage(db, user_id, [g.id for g in groups], exclude=list(fresh), own=want_own and not all_own)
    fresh_current = sum(u.size_bytes or 0 for u in fresh.values())
    fresh_noncurrent = sum(u.noncurrent_bytes or 0 for u in fresh.values())

    def state(quota: int | None, key: str | None, name: str | None) -> QuotaState:
        current, noncurrent = cached.get(key, (0, 0))
        return QuotaState(
            quota_bytes=quota, user_id=user_id, group_id=key, group=name,
            current_bytes=fresh_current + current, noncurrent_bytes=fresh_noncurrent + noncurrent,
        )  # fmt: skip

    found = [state(own_quota, None, None)] if want_own else []
    return found + [state(g.quota_bytes, g.id, g.name) for g in groups]


def _cached_usage(
    db: Session, user_id: str, group_ids: list[str], *, exclude: list[str], own: bool
) -> dict[str | None, tuple[int, int]]:
    """The cached current and noncurrent bytes of the user's storages (key None, when ``own``) and
    of each group's members' storages (key: the group's id), leaving out ``exclude``: one query."""
    current = func.coalesce(func.sum(Storage.usage_bytes), 0)
    noncurrent = func.coalesce(func.sum(Storage.usage_noncurrent_bytes), 0)
    parts = []
    if own:
        parts.append(
            select(literal(None, String).label("group_id"), current, noncurrent)
            .where(Storage.user_id == user_id, Storage.id.not_in(exclude))
        )  # fmt: skip
    if group_ids:
        parts.append(
            select(GroupMember.group_id, current, noncurrent)
            .join(Storage, Storage.user_id == GroupMember.user_id)
            .where(GroupMember.group_id.in_(group_ids), Storage.id.not_in(exclude))
            .group_by(GroupMember.group_id)
        )
    if not parts:
        return {}
    query = parts[0] if len(parts) == 1 else union_all(*parts)
    return {key: (int(cur or 0), int(nonc or 0)) for key, cur, nonc in db.execute(query)}


@dataclass(frozen=True)
class Allowance:
    """The quotas an upload is checked against (those that are set), with what they leave."""

    states: tuple[QuotaState, ...] = ()

    @property
    def tightest(self) -> QuotaState | None:
        return min(self.states, key=lambda s: s.remaining_bytes or 0, default=None)

    @property
    def remaining_bytes(self) -> int | None:
        tightest = self.tightest
        return None if tightest is None else tightest.remaining_bytes

    def refuses(self, declared: int | None) -> bool:
        remaining = self.remaining_bytes
        return remaining is not None and (remaining == 0 or (declared is not None and declared > remaining))

    def check(self, declared: int | None) -> None:
        """Refuse an upload the quotas leave no room for (see :func:`upload_allowance`)."""
        for state in self.states:
            assert state.quota_bytes is not None
            if state.remaining_bytes == 0:
                raise InsufficientStorage(
                    f"{state.whose} of {_size(state.quota_bytes)} is used up ({_size(state.current_bytes)} in "
                    f"objects, {_size(state.noncurrent_bytes)} in earlier versions kept of overwritten or deleted "
                    f"ones{state.held()}); delete objects, or ask an administrator for more; nothing was stored"
                )
        if self.refuses(declared):
            raise self.exceeded()

    def exceeded(self) -> PayloadTooLarge:
        assert self.tightest is not None
        return quota_exceeded(self.tightest)


def reserved_bytes(db: Session, context: AppContext, state: QuotaState, *, exclude: str | None = None) -> int:
    """What the uploads under way into the buckets ``state`` counts hold, on every live replica
    (but the journal entry ``exclude``): an entry not renewed for :func:`hold_lifetime` holds nothing."""
    if state.group_id is None:
        whose = Storage.user_id == state.user_id
    else:
        whose = Storage.user_id.in_(select(GroupMember.user_id).where(GroupMember.group_id == state.group_id))
    query = (
        select(func.coalesce(func.sum(UploadJournal.reserved_bytes), 0))
        .join(Storage, Storage.id == UploadJournal.storage_id)
        .where(whose, _live_uploads(context))
    )
    if exclude is not None:
        query = query.where(UploadJournal.id != exclude)
    held = db.execute(query).scalar_one()
    return int(held)


def upload_allowance(
    db: Session, context: AppContext, user: User, storage: Storage, *, declared: int | None, wait_seconds: float,
    check: bool = True,
) -> Allowance:  # fmt: skip
    """Before an upload into ``storage``: the quotas it must fit (the user's own and their groups'),
    with what the uploads under way hold. Nothing is measured or summed when no quota is set.

    Only ``storage`` is measured afresh where stale (waiting at most ``wait_seconds``); the other
    buckets count as last measured, plus what was uploaded into them since through the API
    (:func:`invalidate_usage`), and the uploads under way are held in the journal. Only when those
    figures would refuse the upload is every stale bucket that counts measured again first (objects
    deleted since free room). A quota used up is refused with InsufficientStorage (507), an upload
    whose declared length passes what is left with PayloadTooLarge (413): nothing is sent to the
    backend. :class:`UploadReservation` then holds the upload's bytes while it runs. With
    ``check=False`` nothing is refused: the caller words its own refusal (a move)."""
    own_quota, groups = quotas_of(db, context, user)
    db.commit()  # hold no transaction while waiting for measurements
    if own_quota is None and not groups:
        return Allowance()
    fresh = current_usage([storage], context, wait_seconds=wait_seconds)
    allowance = _allowance(db, context, user, own_quota, groups, fresh)
    if allowance.refuses(declared):
        counted = {user.id, *_members(db, [g.id for g in groups])}
        others = select(Storage).where(Storage.user_id.in_(counted), Storage.id != storage.id)
        rows = list(db.execute(others).scalars())
        db.commit()
        current_usage(rows, context, wait_seconds=wait_seconds)  # the results are stored as they come
        allowance = _allowance(db, context, user, own_quota, groups, fresh)
    if check:
        allowance.check(declared)
    return allowance


def _allowance(
    db: Session, context: AppContext, user: User, own_quota: int | None, groups: Sequence[GroupQuota],
    fresh: Mapping[str, Usage],
) -> Allowance:  # fmt: skip
    states = _states(db, user.id, own_quota, groups, fresh, all_own=False, only_set=True)
    allowance = Allowance(tuple(replace(s, reserved_bytes=reserved_bytes(db, context, s)) for s in states))
    db.commit()
    return allowance


def _members(db: Session, group_ids: list[str]) -> list[str]:
    if not group_ids:
        return []
    return list(db.execute(select(GroupMember.user_id).where(GroupMember.group_id.in_(group_ids))).scalars())


def quota_exceeded(state: QuotaState) -> PayloadTooLarge:
    """This upload is larger than what is left of the quota."""
    assert state.quota_bytes is not None
    return PayloadTooLarge(
        f"this upload is larger than the {_size(state.remaining_bytes or 0)} left of {state.whose} of "
        f"{_size(state.quota_bytes)} ({_size(state.used_bytes)} used, earlier versions included{state.held()}); "
        "nothing was stored"
    )


#: A streamed upload of unknown length holds its quotas in steps of this many bytes beyond what
#: it sent: one database write per step, not per chunk.
RESERVATION_STEP = 16 * 1024 * 1024
#: While its bytes arrive, an upload renews its journal entry at most once per this part of the
#: upload idle timeout.
RENEWAL_FRACTION = 0.25


def renewal_seconds(context: AppContext) -> float:
    """How often at most an upload renews its journal entry while its bytes arrive."""
    return context.config.core.upload_idle_timeout_seconds * RENEWAL_FRACTION


def hold_lifetime(context: AppContext) -> dt.timedelta:
    """How long an upload's journal entry counts (its hold, and as an upload under way) after it
    was last renewed: the idle timeout, past which a live server stops the upload, plus the
    interval between renewals (its last bytes may have come up to that long after). Past it, the
    upload's server is gone or could not record its end: its hold no longer counts."""
    return dt.timedelta(seconds=context.config.core.upload_idle_timeout_seconds * (1 + RENEWAL_FRACTION))


def _live_uploads(context: AppContext) -> ColumnElement[bool]:
    """Journal entries of uploads under way: owned by a live server instance, and renewed lately."""
    renewed = UploadJournal.heartbeat_at >= utcnow() - hold_lifetime(context)
    return and_(instances.owned_by_live(context, UploadJournal.owner), renewed)


def _ended_uploads(context: AppContext) -> ColumnElement[bool]:
    """The converse of :func:`_live_uploads`: entries that upload nothing any more."""
    expired = UploadJournal.heartbeat_at < utcnow() - hold_lifetime(context)
    return or_(instances.owned_by_gone(context, UploadJournal.owner), expired)


def lock_quotas(db: Session, states: Sequence[QuotaState]) -> None:
    """Begin ``db``'s transaction holding the quotas of ``states`` until it ends: the rows of the
    user and of the groups they belong to, locked FOR UPDATE in one order (the user, then the
    groups by id, so two transactions never wait on each other), or on SQLite the database's write
    lock. Each check-and-hold of an upload and each upload's end take it: whatever one reads of a
    quota's usage and holds, no other changes before it has written its own."""
    if begin_locked(db):
        return
    users = sorted({s.user_id for s in states if s.group_id is None})
    groups = sorted({s.group_id for s in states if s.group_id is not None})
    # FOR NO KEY UPDATE: holds exclude each other, while inserts that only reference these rows
    # (an administrator adding group members) take KEY SHARE and pass, instead of deadlocking.
    if users:
        db.execute(select(User.id).where(User.id.in_(users)).order_by(User.id).with_for_update(key_share=True))
    if groups:
        db.execute(select(Group.id).where(Group.id.in_(groups)).order_by(Group.id).with_for_update(key_share=True))


def current_states(
    db: Session, context: AppContext, states: Sequence[QuotaState], *, exclude: str | None = None
) -> list[QuotaState]:
    """``states`` (the same quotas) as the database has them now: every bucket that counts as last
    measured plus what was stored through the API since, and what the uploads under way hold (but
    the journal entry ``exclude``). Read under :func:`lock_quotas`, it is what an upload may hold."""
    if not states:
        return []
    own = next((s.quota_bytes for s in states if s.group_id is None), None)
    groups = [GroupQuota(id=s.group_id, name=s.group or "", quota_bytes=s.quota_bytes or 0)
              for s in states if s.group_id is not None]  # fmt: skip
    now = _states(db, states[0].user_id, own, groups, {}, all_own=False, only_set=True)
    return [replace(s, reserved_bytes=reserved_bytes(db, context, s, exclude=exclude)) for s in now]


class UploadReservation:
    """An upload's journal entry (:class:`~cmbcluster.db.models.UploadJournal`), owned by this
    server instance, holding the upload's bytes against the quotas of ``allowance`` while it runs.

    Each hold is decided and written in one short transaction under :func:`lock_quotas`, from the
    usage and the other uploads' holds as they are at that moment (not as they were when the
    upload began: others may have stored bytes since), and the upload's end turns its hold into
    stored usage in one such transaction: uploads running at once, into any of the buckets a
    quota counts and on any replica, cannot together pass it. No lock is held while bytes stream.
    A declared length is held whole at the start; a stream of unknown length is held in steps of
    :data:`RESERVATION_STEP` (near a quota, what is left of it at once), and stopped with 413 once
    it would pass a quota. Every hold, and at least every :data:`RENEWAL_FRACTION` of the idle
    timeout while bytes arrive, renews the entry (:func:`hold_lifetime`)."""

    def __init__(self, context: AppContext, allowance: Allowance | None, *, storage_id: str, bucket: str,
                 key: str) -> None:  # fmt: skip
        self.context = context
        self.states = allowance.states if allowance is not None else ()
        self.storage_id = storage_id
        self.entry = UploadJournal(
            storage_id=storage_id, backend=context.config.storage.name, bucket_name=bucket, key=key,
            owner=context.instance_id, reserved_bytes=0,
        )  # fmt: skip
        self.entry_id: str | None = None
        self.held = 0
        self.renew_seconds = renewal_seconds(context)

    @property
    def checks(self) -> bool:
        return bool(self.states)

    def open(self, declared: int | None) -> None:
        """Journal the upload, holding its declared length, or its first step (413 when that
        passes a quota: nothing journalled)."""
        if self.checks:
            self.hold(0, declared if declared is not None else RESERVATION_STEP, exact=declared is not None)
        else:
            with self.context.sessions() as db:
                db.add(self.entry)
                db.commit()
                self.entry_id = self.entry.id

    def hold(self, sent: int, wanted: int, *, exact: bool = False) -> None:
        """Hold ``wanted`` bytes; when that passes a quota, what is left of it (at least ``sent``;
        unless ``exact``), and when even that passes it, refuse (413). Near a quota the stream then
        holds the rest at once, instead of a write and a check for every chunk."""
        with self.context.sessions() as db:
            lock_quotas(db, self.states)
            states = current_states(db, self.context, self.states, exclude=self.entry_id)
            tightest = min(states, key=_left)
            left = _left(tightest)
            if wanted > left:
                if exact or sent > left:
                    raise quota_exceeded(tightest)  # the transaction ends unwritten
                wanted = left
            if self.entry_id is None:
                self.entry.reserved_bytes = wanted
                db.add(self.entry)
            else:
                renewed = db.execute(update(UploadJournal).where(UploadJournal.id == self.entry_id)
                                     .values(reserved_bytes=wanted, heartbeat_at=utcnow()))  # fmt: skip
                self._check_renewed(renewed.rowcount)  # type: ignore[attr-defined]  # a CursorResult
            db.commit()
            self.entry_id = self.entry.id
        self.held = wanted

    def holding(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks``, holding more of the quotas whenever they pass what is held, and renewing
        the entry meanwhile."""
        sent = 0
        renewed = time.monotonic()
        for chunk in chunks:
            sent += len(chunk)
            if self.checks and sent > self.held:
                self.hold(sent, sent + RESERVATION_STEP)
                renewed = time.monotonic()
            elif time.monotonic() - renewed >= self.renew_seconds:
                self._renew()
                renewed = time.monotonic()
            yield chunk

    def _renew(self) -> None:
        with self.context.sessions() as db:
            renewed = db.execute(
                update(UploadJournal).where(UploadJournal.id == self.entry_id).values(heartbeat_at=utcnow())
            )
            self._check_renewed(renewed.rowcount)  # type: ignore[attr-defined]  # a CursorResult
            db.commit()

    def _check_renewed(self, rows: int) -> None:
        """The entry is gone: recovery took it for an upload that ended (not renewed in time, or
        its server taken for gone) and may have aborted what the cloud kept of it. Stop: going on
        would store bytes that no hold counts."""
        if rows == 0:
            self.entry_id = None
            raise RequestTimeout(
                "the upload was stopped: its hold on the storage quota was not renewed in time "
                "(the server was too busy or lost its database for a while); nothing was stored, send it again"
            )

    def finish(self, size: int) -> None:
        """The upload stored ``size`` bytes: in one transaction (under the quotas' lock), its hold
        ends and its bytes count in its storage's usage, so that no check sees neither."""
        with self.context.sessions() as db:
            if self.checks:
                lock_quotas(db, self.states)
            db.execute(delete(UploadJournal).where(UploadJournal.id == self.entry_id))
            db.execute(_usage_changed(self.storage_id, size))
            db.commit()
        self.entry_id = None
        self.context.storage_runtime.refresher.invalidate(self.storage_id)

    def close(self) -> None:
        """The upload failed or stopped: its hold ends (nothing to do once finished)."""
        if self.entry_id is None:
            return
        with self.context.sessions() as db:
            db.execute(delete(UploadJournal).where(UploadJournal.id == self.entry_id))
            db.commit()
        self.entry_id = None


def _left(state: QuotaState) -> int:
    """What ``state``'s quota leaves (negative: passed by so much)."""
    assert state.quota_bytes is not None
    return state.quota_bytes - state.used_bytes - state.reserved_bytes


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def storages_with_usage(
    db: Session, context: AppContext, user: User, *, wait_seconds: float
) -> list[tuple[Storage, Usage]]:
    """The caller's storages, oldest first, each with its usage (see :func:`current_usage`)."""
    rows = list_owned(db, user)
    db.commit()  # hold no transaction while waiting for measurements
    usage = current_usage(rows, context, wait_seconds=wait_seconds)
    return [(row, usage[row.id]) for row in rows]


def storage_with_usage(
    db: Session, context: AppContext, user: User, storage_id: str, *, wait_seconds: float
) -> tuple[Storage, Usage]:
    """One of the caller's storages with its usage (see :func:`current_usage`)."""
    storage = get_owned(db, user, storage_id)
    db.commit()
    return storage, current_usage([storage], context, wait_seconds=wait_seconds)[storage.id]


def current_usage(storages: Iterable[Storage], context: AppContext, *, wait_seconds: float) -> dict[str, Usage]:
    """Usage of each storage: the cached figures, re-measured first for those older than
    :data:`USAGE_MAX_AGE`, waiting at most ``wait_seconds`` in all for the measurements.

    Storages whose measurement is not done in time (a cloud bucket with millions of objects)
    are answered with their cached figures (``measured_at`` says how old); the measurement goes
    on and is stored for the next request. Storages on another backend or not active are never
    measured.
    """
    backend_name, refresher = context.config.storage.name, context.storage_runtime.refresher
    now = utcnow()
    result: dict[str, Usage] = {}
    pending: dict[str, Future[Usage]] = {}
    for storage in storages:
        result[storage.id] = cached_usage(storage)
        if storage.status == "active" and storage.backend == backend_name and is_stale(storage, now):
            pending[storage.id] = refresher.refresh(storage.id, storage.bucket_name)
    if pending:
        done, _ = wait(pending.values(), timeout=wait_seconds)
        for storage_id, future in pending.items():
            if future in done:
                error = future.exception()
                if error is None:
                    result[storage_id] = future.result()
                else:
                    log.warning("measuring the usage of storage %s failed: %s", storage_id, error)
    return result
