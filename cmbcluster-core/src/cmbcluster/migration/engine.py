"""Plan, run and finish a migration of every user's buckets to another storage backend.

The database holds the manifest (:class:`~cmbcluster.db.models.MigrationBucket`, one per bucket,
and :class:`~cmbcluster.db.models.MigrationObject`, one per object copied and verified), so a
run killed at any point resumes where it stopped: an object whose source still lists with the
ETag, size and modification time recorded is not copied again. Per bucket, a run:

1. creates the user's bucket on the target (same owner, display name and storage class, or the
   standard class where the target has not that one), recorded before anything is copied;
   with ``--managed-transfer`` and a plugin's offer (``cmbcluster_managed_transfer``), the cloud's
   transfer service copies the bucket first, and the objects whose size and MD5 match on both
   sides are recorded as verified (any other is reported, and the bucket is not switched);
2. copies every object not in the manifest, or changed on the source since (while the bucket
   stays in use); objects deleted from the source since their copy are deleted from the target;
3. freezes the bucket (status ``migrating``: uploads and new starts are refused with that word)
   unless a running environment mounts it, which it reports and waits for (the next run);
4. copies what changed meanwhile, then checks the target's listing against the manifest: an
   object changed or added behind the migration is reported, and the bucket is not switched;
5. switches the storage row to the target bucket in one transaction.

The database follows with ``db backup`` semantics: once every bucket is switched, a backup is
written to the target's database bucket, which a server configured for the target restores at
its first start. ``finish`` deletes source buckets, only those whose listing still matches the
manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import (
    Environment,
    EnvironmentStorage,
    MigrationBucket,
    MigrationObject,
    Storage,
    User,
    utcnow,
)
from cmbcluster.errors import CmbclusterError, Conflict, InvalidRequest, NotFound, PluginError
from cmbcluster.interfaces import (
    BucketOptions,
    InfraProvider,
    ObjectInfo,
    StorageBackend,
    StorageClass,
    TransferEnd,
    TransferOffers,
    UserRef,
)
from cmbcluster.migration.copy import Copied, Failed, OnBytes, copy_objects, list_all, md5_of, merge_by_key
from cmbcluster.services.audit import audit

log = logging.getLogger(__name__)

#: Storage rows in these environment states hold the bucket mounted.
MOUNTING_STATUSES = ("pending", "starting", "running", "stopping")
#: The manifest is committed at least this often (seconds) and every this many objects: a run
#: killed in between copies at most that much again.
COMMIT_SECONDS = 0.5
COMMIT_OBJECTS = 200

#: Internet egress, USD per GB, from each cloud's storage: the first tier of the list price.
#: Sources and date in docs/ARCHITECTURE_POLYCLOUD.md ("Moving between clouds").
EGRESS_USD_PER_GB: dict[str, float] = {"gcp": 0.12, "aws": 0.09, "local": 0.0}
EGRESS_SOURCE = "docs/ARCHITECTURE_POLYCLOUD.md, list prices read 2026-12-05"


@dataclass(kw_only=True)
class Side:
    """One end of a migration: a storage backend by its configured name, that cloud's infra
    provider (None: the target gives users no cloud identity of its own), and the storage
    provider's settings (handed to a managed transfer)."""

    name: str
    storage: StorageBackend
    infra: InfraProvider | None = None
    settings: object | None = None


# -- plan ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BucketPlan:
    storage_id: str
    owner: str
    display_name: str
    bucket: str
    objects: int
    bytes: int
    already_verified: int


@dataclass(frozen=True, kw_only=True)
class Plan:
    source: str
    target: str
    buckets: list[BucketPlan]
    identities: list[str]
    usd_per_gb: float | None

    @property
    def objects(self) -> int:
        return sum(b.objects for b in self.buckets)

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.buckets)

    @property
    def users(self) -> int:
        return len({b.owner for b in self.buckets})

    @property
    def egress_usd(self) -> float | None:
        """What leaving the source costs: bytes still to copy times the source's price per GB (a billion bytes)."""
        if self.usd_per_gb is None:
            return None
        left = sum(b.bytes - b.already_verified for b in self.buckets)
        return round(left / 1e9 * self.usd_per_gb, 2)


def _to_move(db: Session, source: str, target: str) -> list[tuple[Storage, User]]:
    rows = db.execute(
        select(Storage, User)
        .join(User, User.id == Storage.user_id)
        .where(Storage.backend == source)
        .order_by(User.email, Storage.created_at)
    ).all()
    return [(s, u) for s, u in rows]


def plan(db: Session, source: Side, target: Side) -> Plan:
    """What a run would move (read-only: listings only)."""
    _check_sides(source, target)
    buckets: list[BucketPlan] = []
    identities: set[str] = set()
    for storage, user in _to_move(db, source.name, target.name):
        objects = size = 0
        for obj in list_all(source.storage, storage.bucket_name):
            objects += 1
            size += obj.size
        row = _manifest_row(db, storage, target.name)
        verified = 0
        if row is not None:
            verified = db.execute(
                select(func.coalesce(func.sum(MigrationObject.size), 0)).where(MigrationObject.bucket_id == row.id)
            ).scalar_one()
        buckets.append(
            BucketPlan(
                storage_id=storage.id, owner=user.email, display_name=storage.display_name,
                bucket=storage.bucket_name, objects=objects, bytes=size, already_verified=int(verified),
            )
        )  # fmt: skip
        if target.infra is not None:
            identities.add(user.email)
    db.rollback()
    return Plan(
        source=source.name,
        target=target.name,
        buckets=buckets,
        identities=sorted(identities),
        usd_per_gb=EGRESS_USD_PER_GB.get(source.name),
    )


def _check_sides(source: Side, target: Side) -> None:
    if source.name == target.name:
        raise InvalidRequest(f"the server already uses the storage backend {target.name!r}: nothing to migrate")


def _manifest_row(db: Session, storage: Storage, target: str) -> MigrationBucket | None:
    return db.execute(
        select(MigrationBucket).where(
            MigrationBucket.storage_id == storage.id, MigrationBucket.target_backend == target
        )
    ).scalar_one_or_none()


# -- run -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BucketOutcome:
    storage_id: str
    owner: str
    display_name: str
    state: str  # switched | waiting | failed | copied (a --copy-only run: verified, not switched)
    copied: int = 0
    skipped: int = 0
    message: str = ""


@dataclass(kw_only=True)
class RunResult:
    buckets: list[BucketOutcome] = field(default_factory=list)
    database: str = ""

    @property
    def complete(self) -> bool:
        return all(b.state == "switched" for b in self.buckets)


class Events:
    """What a run tells its display; every method may be called from the run's thread only,
    except ``bytes_copied`` which the copying threads call."""

    def bucket_started(self, label: str, objects: int, size: int, done: int) -> None:
        """A bucket's copy begins: ``objects``/``size`` in all, ``done`` bytes already verified."""

    def bytes_copied(self, n: int) -> None:
        """``n`` more bytes went through (copying threads)."""

    def bucket_done(self, outcome: BucketOutcome) -> None:
        """A bucket is switched, waits, or failed."""

    def note(self, text: str) -> None:
        """Something the operator should read."""


class Migration:
    """``cmbcluster migrate run``: every bucket on ``source`` to ``target`` (see the module)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        source: Side,
        target: Side,
        *,
        namespace: str = "",
        parallel: int = 8,
        events: Events | None = None,
        transfers: TransferOffers | None = None,
        copy_only: bool = False,
    ) -> None:
        """``transfers``: where to ask for a managed transfer of each bucket (the operator chose
        ``--managed-transfer``); None streams every bucket. ``copy_only``: copy and verify, switch
        nothing (``--copy-only``): the bulk moves while users keep working, and the run that
        switches, in a maintenance window, copies only what changed since."""
        _check_sides(source, target)
        self.sessions = sessions
        self.source = source
        self.target = target
        self.namespace = namespace
        self.parallel = parallel
        self.events = events or Events()
        self.transfers = transfers
        self.copy_only = copy_only

    def run(self) -> RunResult:
        result = RunResult()
        with self.sessions() as db:
            todo = [
                (s.id, UserRef(id=u.id, email=u.email)) for s, u in _to_move(db, self.source.name, self.target.name)
            ]
        identities_done: set[str] = set()
        for storage_id, owner in todo:
            if owner.id not in identities_done:
                self._ensure_identity(owner)
                identities_done.add(owner.id)
            outcome = self._bucket(storage_id, owner)
            result.buckets.append(outcome)
            self.events.bucket_done(outcome)
        # Also the owners of buckets an earlier run switched: their identity may not have been made
        # then (the target's cluster not there yet, a refused call), and the note promised this run.
        with self.sessions() as db:
            switched = set(
                db.execute(
                    select(MigrationBucket.user_id).where(
                        MigrationBucket.source_backend == self.source.name,
                        MigrationBucket.target_backend == self.target.name,
                        MigrationBucket.state == "switched",
                    )
                ).scalars()
            )
        for owner_id in sorted(identities_done | switched):
            self._sync_identity(owner_id)
        return result

    # -- one bucket ---------------------------------------------------------------------------
    def _bucket(self, storage_id: str, owner: UserRef) -> BucketOutcome:
        with self.sessions() as db:
            storage = db.get(Storage, storage_id)
            assert storage is not None
            outcome = BucketOutcome(
                storage_id=storage.id, owner=owner.email, display_name=storage.display_name, state="failed"
            )
            if storage.status not in ("active", "migrating"):
                outcome.message = f"the bucket is {storage.status}; run again once it is active"
                return outcome
            row = self._manifest_row(db, storage)
            try:
                if row.target_bucket is None:
                    row.target_bucket = self._create_target_bucket(storage, owner)
                    db.commit()  # recorded before any copy: a rerun reuses it
                if self.transfers is not None:
                    self._managed_pass(db, row, outcome)
                    if outcome.message:
                        return outcome
                by_service = outcome.copied
                self._copy_pass(db, row, outcome, announce=True)
                outcome.skipped -= min(by_service, outcome.skipped)  # the service's, counted as copied already
                if outcome.message:
                    return outcome
                if self.copy_only:
                    outcome.state = "copied"
                    outcome.message = "copied and verified; still in use where it was (--copy-only)"
                    return outcome
                waiting = _freeze(db, storage)
                if waiting:
                    outcome.state = "waiting"
                    outcome.message = "mounted by " + ", ".join(waiting) + "; switched once they stop (run again)"
                    row.message = outcome.message
                    db.commit()
                    return outcome
                try:
                    self._copy_pass(db, row, outcome, announce=False)
                    if not outcome.message:
                        outcome.message = self._check_target(db, row)
                    if outcome.message:
                        return outcome
                    _switch(db, storage, row)
                    outcome.state = "switched"
                    outcome.message = f"now {self.target.name}:{row.target_bucket}"
                    return outcome
                finally:
                    _thaw(db, storage_id)
            except CmbclusterError as exc:
                db.rollback()
                outcome.message = exc.message
                return outcome
            finally:
                if outcome.state != "switched":
                    _record_message(db, row.id, outcome.message)

    def _manifest_row(self, db: Session, storage: Storage) -> MigrationBucket:
        row = _manifest_row(db, storage, self.target.name)
        if row is None:
            row = MigrationBucket(
                storage_id=storage.id, user_id=storage.user_id, source_backend=self.source.name,
                source_bucket=storage.bucket_name, target_backend=self.target.name, state="copying", message="",
                objects_total=0, bytes_total=0,
            )  # fmt: skip
            db.add(row)
            db.commit()
        return row

    def _create_target_bucket(self, storage: Storage, owner: UserRef) -> str:
        options = BucketOptions(display_name=storage.display_name, storage_class=StorageClass(storage.storage_class))
        try:
            return self.target.storage.create_bucket(owner, options).name
        except InvalidRequest as exc:  # a storage class the target has not: its standard one
            self.events.note(f"{storage.display_name}: {exc.message}; created with the standard class")
            return self.target.storage.create_bucket(owner, BucketOptions(display_name=storage.display_name)).name

    def _copy_pass(self, db: Session, row: MigrationBucket, outcome: BucketOutcome, *, announce: bool) -> None:
        """Copy what the manifest lacks or what changed; drop from the target what the source lost.

        The source's listing and the manifest are walked side by side in key order, the manifest
        read a batch at a time (:func:`_manifest`): memory stays flat however many objects the
        bucket holds.
        """
        assert row.target_bucket is not None
        objects = size = done = 0
        for obj, known in merge_by_key(list_all(self.source.storage, row.source_bucket), _manifest(db, row.id)):
            if obj is not None:
                objects += 1
                size += obj.size
                if _unchanged(known, obj):
                    done += obj.size
        row.objects_total, row.bytes_total = objects, size
        db.commit()
        if announce:
            self.events.bucket_started(f"{outcome.owner} / {outcome.display_name}", objects, size, done)
        gone: list[str] = []

        def changed() -> Iterator[ObjectInfo]:
            # Runs in this thread, between the results below. A copy recorded meanwhile is of a key
            # the walk has passed on both sides, so the manifest's next batch never includes it.
            for obj, known in merge_by_key(list_all(self.source.storage, row.source_bucket), _manifest(db, row.id)):
                if obj is None:
                    assert known is not None
                    gone.append(known.key)
                    if len(gone) >= MANIFEST_BATCH:
                        self._drop(db, row, gone)
                elif _unchanged(known, obj):
                    outcome.skipped += announce  # counted once, on the first pass
                else:
                    yield obj

        failures: list[str] = []  # the first five, and how many in all
        failed = 0
        last_commit, pending = time.monotonic(), 0
        on_bytes: OnBytes = self.events.bytes_copied
        for result in copy_objects(
            self.source.storage, row.source_bucket, self.target.storage, row.target_bucket, changed(),
            parallel=self.parallel, progress=on_bytes,
        ):  # fmt: skip
            if isinstance(result, Copied):
                _record(db, row.id, result)
                outcome.copied += 1
                pending += 1
            elif isinstance(result, Failed):
                failed += 1
                if len(failures) < 5:
                    failures.append(f"{result.source.key}: {result.error}")
            else:  # deleted from the source meanwhile: so from the target and the manifest
                gone.append(result.key)
            if pending >= COMMIT_OBJECTS or time.monotonic() - last_commit >= COMMIT_SECONDS:
                db.commit()
                last_commit, pending = time.monotonic(), 0
        db.commit()
        self._drop(db, row, gone)
        if failed:
            shown = "; ".join(failures) + (f"; and {failed - len(failures)} more" if failed > len(failures) else "")
            outcome.message = f"{failed} object(s) not copied: {shown}"

    def _drop(self, db: Session, row: MigrationBucket, keys: list[str]) -> None:
        """Objects the source no longer has: deleted from the target and the manifest; ``keys`` emptied."""
        assert row.target_bucket is not None
        if not keys:
            return
        self.target.storage.delete_objects(row.target_bucket, keys)
        db.execute(delete(MigrationObject).where(MigrationObject.bucket_id == row.id, MigrationObject.key.in_(keys)))
        db.commit()
        keys.clear()

    def _managed_pass(self, db: Session, row: MigrationBucket, outcome: BucketOutcome) -> None:
        """Let a plugin's managed transfer copy the bucket, then verify it from both listings.

        The service's word is not taken: an object is recorded as verified only when the target
        lists it with the source's size and MD5 (read and computed where a side reports none).
        Anything else is reported in ``outcome.message`` and the bucket is not switched.
        """
        assert row.target_bucket is not None
        label = f"{outcome.owner} / {outcome.display_name}"
        ends = (
            TransferEnd(backend=self.source.name, bucket=row.source_bucket, storage=self.source.storage,
                        settings=self.source.settings),
            TransferEnd(backend=self.target.name, bucket=row.target_bucket, storage=self.target.storage,
                        settings=self.target.settings),
        )  # fmt: skip
        assert self.transfers is not None
        offer = self.transfers(*ends)
        if offer is None:
            self.events.note(
                f"{label}: no plugin offers a managed transfer from {self.source.name} to {self.target.name}; "
                "streamed instead"
            )
            return
        self.events.note(f"{label}: {offer.service} copies the bucket; then both listings are compared")
        try:
            offer.run(self.events.bytes_copied)
        except CmbclusterError:
            raise
        except Exception as exc:  # a plugin's bug or its SDK's error: this bucket fails, the others go on
            log.exception("%s failed for %s", offer.service, label)
            raise PluginError(f"{offer.service} failed: {type(exc).__name__}: {exc}") from exc
        problems: list[str] = []  # the first five, and how many in all
        wrong = 0
        last_commit = time.monotonic()
        pairs = merge_by_key(list_all(self.source.storage, row.source_bucket),
                             list_all(self.target.storage, row.target_bucket))  # fmt: skip
        for listed, copy in pairs:
            if listed is None:
                assert copy is not None
                problem = f"{copy.key} is on the target but not on the source"
            elif copy is None:
                problem = f"{listed.key} is missing from the target"
            elif copy.size != listed.size:
                problem = f"{listed.key} has {copy.size} bytes on the target, {listed.size} on the source"
            else:
                md5 = listed.md5 or md5_of(self.source.storage, row.source_bucket, listed.key)[0]
                stored = copy.md5 or md5_of(self.target.storage, row.target_bucket, copy.key)[0]
                if stored != md5 and (listed.md5 or copy.md5):
                    # A listed MD5 may be none (an S3 ETag of an object encrypted otherwise than its
                    # bucket's default): the bytes decide before an object is called wrong.
                    md5 = md5_of(self.source.storage, row.source_bucket, listed.key)[0] if listed.md5 else md5
                    stored = md5_of(self.target.storage, row.target_bucket, copy.key)[0] if copy.md5 else stored
                if stored == md5:
                    _record(db, row.id, Copied(source=listed, size=listed.size, md5=md5, target_etag=copy.etag,
                                               reread=copy.md5 is None, attempts=1))  # fmt: skip
                    outcome.copied += 1
                    if time.monotonic() - last_commit >= COMMIT_SECONDS:
                        db.commit()
                        last_commit = time.monotonic()
                    continue
                problem = f"{listed.key} holds other bytes on the target (MD5 differs)"
            wrong += 1
            if len(problems) < 5:
                problems.append(problem)
        db.commit()
        if wrong:
            shown = "; ".join(problems) + (f"; and {wrong - len(problems)} more" if wrong > len(problems) else "")
            outcome.message = (
                f"not switched: {offer.service} left {wrong} object(s) wrong: {shown}. The verified ones are "
                "recorded; `cmbcluster migrate run` copies the rest"
            )

    def _check_target(self, db: Session, row: MigrationBucket) -> str:
        """The target's listing must be the manifest: same keys, sizes and ETags as verified.
        Both are walked side by side in key order, the manifest a batch at a time."""
        assert row.target_bucket is not None
        problems: list[str] = []
        count = 0
        forget: list[str] = []  # changed or missing: the next run copies and verifies them again
        for obj, want in merge_by_key(list_all(self.target.storage, row.target_bucket), _manifest(db, row.id)):
            if want is None:
                assert obj is not None
                problem = f"{obj.key} was added to the target behind the migration"
            elif obj is None:
                problem = f"{want.key} is missing from the target"
                forget.append(want.key)
            elif (want.size, want.target_etag) != (obj.size, obj.etag):
                problem = f"{obj.key} changed on the target after it was verified"
                forget.append(obj.key)
            else:
                continue
            count += 1
            if len(problems) < 5:
                problems.append(problem)
            if len(forget) >= MANIFEST_BATCH:
                _forget(db, row.id, forget)
        _forget(db, row.id, forget)
        if not problems:
            return ""
        return f"not switched: {'; '.join(problems)}" + (f" (and {count - 5} more)" if count > 5 else "")

    # -- identities -----------------------------------------------------------------------------
    def _ensure_identity(self, owner: UserRef) -> None:
        if self.target.infra is None:
            return
        try:
            self.target.infra.ensure_user_identity(owner, namespace=self.namespace)
        except CmbclusterError as exc:
            self.events.note(
                f"the cloud identity of {owner.email} on {self.target.name} could not be created: {exc.message}"
            )

    def _sync_identity(self, owner_id: str) -> None:
        """The user's identity on the target reaches exactly their buckets there."""
        if self.target.infra is None:
            return
        with self.sessions() as db:
            user = db.get(User, owner_id)
            if user is None:  # deleted since an earlier run switched their buckets
                return
            buckets = list(
                db.execute(
                    select(Storage.bucket_name).where(
                        Storage.user_id == owner_id, Storage.backend == self.target.name, Storage.status == "active"
                    )
                ).scalars()
            )
        owner = UserRef(id=user.id, email=user.email)
        try:
            identity = self.target.infra.ensure_user_identity(owner, namespace=self.namespace)
            self.target.infra.update_user_buckets(owner, buckets)
            if identity is not None:
                for bucket in buckets:
                    self.target.storage.ensure_bucket_access(bucket, identity)
        except CmbclusterError as exc:
            self.events.note(
                f"the cloud identity of {user.email} on {self.target.name} does not reach its buckets yet: "
                f"{exc.message} (the next start of an environment, or the next run, grants it)"
            )


@dataclass(frozen=True, slots=True)
class _Entry:
    """One object of the manifest (:class:`~cmbcluster.db.models.MigrationObject`)."""

    key: str
    size: int
    source_etag: str
    source_modified: dt.datetime
    target_etag: str


#: Manifest entries read per query: what a bucket's walk holds of the manifest at once.
MANIFEST_BATCH = 1000


def _manifest(db: Session, bucket_id: str) -> Iterator[_Entry]:
    """A bucket's manifest in key order, read MANIFEST_BATCH entries at a time (each query starts
    after the last key read, so rows written meanwhile behind that key are not read again).

    Keys are compared as the listings order them, by code point: SQLite's default collation does;
    PostgreSQL's may follow a locale, so it is told "C".
    """
    key = MigrationObject.key
    ordered = key.collate("C") if db.get_bind().dialect.name == "postgresql" else key
    after: str | None = None
    while True:
        query = select(
            key, MigrationObject.size, MigrationObject.source_etag, MigrationObject.source_modified,
            MigrationObject.target_etag,
        ).where(MigrationObject.bucket_id == bucket_id)  # fmt: skip
        if after is not None:
            query = query.where(ordered > after)
        rows = db.execute(query.order_by(ordered).limit(MANIFEST_BATCH)).all()
        for found, size, etag, modified, target_etag in rows:
            yield _Entry(key=found, size=size, source_etag=etag, source_modified=modified, target_etag=target_etag)
        if len(rows) < MANIFEST_BATCH:
            return
        after = rows[-1][0]


def _forget(db: Session, bucket_id: str, keys: list[str]) -> None:
    """Drop ``keys`` from the manifest (the next run copies them again); ``keys`` emptied."""
    if keys:
        db.execute(delete(MigrationObject).where(MigrationObject.bucket_id == bucket_id, MigrationObject.key.in_(keys)))
        keys.clear()
    db.commit()


def _unchanged(known: _Entry | None, obj: ObjectInfo) -> bool:
    if known is None:
        return False
    return (known.size, known.source_etag, known.source_modified) == (obj.size, obj.etag, _utc(obj.last_modified))


def _utc(when: dt.datetime) -> dt.datetime:
    """The precision the database keeps (microseconds, UTC) so a listing compares equal to its record."""
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def _record(db: Session, bucket_id: str, copied: Copied) -> None:
    db.execute(
        delete(MigrationObject).where(MigrationObject.bucket_id == bucket_id, MigrationObject.key == copied.source.key)
    )
    db.add(
        MigrationObject(
            bucket_id=bucket_id, key=copied.source.key, size=copied.size, md5=copied.md5,
            source_etag=copied.source.etag, source_modified=_utc(copied.source.last_modified),
            target_etag=copied.target_etag,
        )
    )  # fmt: skip


def _record_message(db: Session, bucket_id: str, message: str) -> None:
    db.rollback()
    db.execute(
        update(MigrationBucket).where(MigrationBucket.id == bucket_id).values(message=message, updated_at=utcnow())
    )
    db.commit()


def _freeze(db: Session, storage: Storage) -> list[str]:
    """Mark the bucket ``migrating`` unless an environment mounts it; the environments it waits for.

    The status is written first, so the check runs inside the write transaction: an environment
    reserved meanwhile either is seen here, or (reserved after) finds the bucket migrating.
    """
    db.execute(update(Storage).where(Storage.id == storage.id).values(status="migrating"))
    mounted = db.execute(
        select(Environment.name, Environment.status, User.email)
        .join(EnvironmentStorage, EnvironmentStorage.environment_id == Environment.id)
        .join(User, User.id == Environment.user_id)
        .where(EnvironmentStorage.storage_id == storage.id, Environment.status.in_(MOUNTING_STATUSES))
    ).all()
    if mounted:
        db.rollback()
        return [f"environment {name!r} of {email} ({status})" for name, status, email in mounted]
    db.commit()
    return []


def _thaw(db: Session, storage_id: str) -> None:
    db.rollback()
    db.execute(update(Storage).where(Storage.id == storage_id, Storage.status == "migrating").values(status="active"))
    db.commit()


def _switch(db: Session, storage: Storage, row: MigrationBucket) -> None:
    """One transaction: the storage row now names the target bucket; the manifest says so."""
    assert row.target_bucket is not None
    db.execute(
        update(Storage)
        .where(Storage.id == storage.id)
        .values(
            backend=row.target_backend, bucket_name=row.target_bucket, status="active",
            usage_bytes=row.bytes_total, usage_objects=row.objects_total, usage_at=utcnow(),
            usage_version=Storage.usage_version + 1,  # a measurement of the old bucket stores nothing
        )
    )  # fmt: skip
    row.state, row.switched_at, row.message = "switched", utcnow(), ""
    audit(
        db, actor_id=None, action="storage.migrated", target_type="storage", target_id=storage.id,
        source=f"{row.source_backend}:{row.source_bucket}", target=f"{row.target_backend}:{row.target_bucket}",
    )  # fmt: skip
    db.commit()


# -- the database ----------------------------------------------------------------------------
def move_database(
    database: Path | None, target: StorageBackend, bucket: str | None, *, prefix: str = "", target_name: str = ""
) -> str:
    """A ``db backup`` of the (switched) database into the target's database bucket, once no control
    plane serves it: what a server still running changed after the copy (a bucket made, a sign-in)
    would never reach the new deployment, which restores the copy."""
    from cmbcluster.db.backup import DatabaseBackups, ServingLock

    if database is None:
        return "the database is PostgreSQL: it stays where it is (point the new deployment at it)"
    if not bucket:
        return (
            "no database bucket on the target was given (--database-bucket): copy the SQLite file yourself, "
            "or run `cmbcluster db backup` with the target's settings"
        )
    with ServingLock(database) as lock:  # held while copying: no server starts on it meanwhile
        if not lock.acquire():
            raise Conflict(
                f"every bucket is switched, but the database did not move: a control plane (pid "
                f"{lock.holder() or 'unknown'}) still serves it, and what it changes after a copy would be lost. "
                f"Stop it, then run `cmbcluster migrate run --to {target_name or '...'}` again: it copies nothing "
                "again and moves the database"
            )
        backup = DatabaseBackups(target, bucket, database, prefix=prefix).backup()
    return f"database backed up to {bucket}/{backup.key}: a server configured for the target restores it at start"


# -- finish ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FinishOutcome:
    storage_id: str
    source: str
    deleted: bool
    message: str = ""


def finish(db: Session, sources: Callable[[str], StorageBackend]) -> list[FinishOutcome]:
    """Delete every switched source bucket whose listing still matches the manifest.

    ``sources(name)`` gives the storage backend of that name. A source with an object the
    manifest lacks, or that changed since its copy, is kept and reported; so is one the backend
    cannot list or delete now, and the others are still deleted.
    """
    outcomes: list[FinishOutcome] = []
    rows = db.execute(select(MigrationBucket).where(MigrationBucket.state == "switched")).scalars().all()
    for row in rows:
        label = f"{row.source_backend}:{row.source_bucket}"
        storage = db.get(Storage, row.storage_id)
        if storage is None or storage.backend != row.target_backend or storage.bucket_name != row.target_bucket:
            kept = "the storage no longer points at the migrated copy: kept"
            outcomes.append(FinishOutcome(storage_id=row.storage_id, source=label, deleted=False, message=kept))
            continue
        backend = sources(row.source_backend)
        differing, first = 0, ""
        try:
            try:
                for obj, known in merge_by_key(list_all(backend, row.source_bucket), _manifest(db, row.id)):
                    if obj is not None and not _unchanged(known, obj):
                        differing += 1
                        first = first or obj.key
            except NotFound:
                differing = 0  # already deleted by an earlier finish that stopped before recording it
            if differing:
                outcomes.append(FinishOutcome(
                    storage_id=row.storage_id, source=label, deleted=False,
                    message=f"{differing} object(s) on the source are not in the verified copy "
                            f"(first: {first}): kept; copy them yourself, or run `migrate run` again",
                ))  # fmt: skip
                continue
            try:
                backend.delete_bucket(row.source_bucket, force=True)
            except NotFound:
                pass
        except CmbclusterError as exc:
            # One source that cannot be listed or deleted (refused, busy, unreachable) is kept and
            # reported; the others are still deleted, and the next `finish` tries it again.
            db.rollback()
            outcomes.append(FinishOutcome(
                storage_id=row.storage_id, source=label, deleted=False, message=f"{exc.message}: kept for now",
            ))  # fmt: skip
            continue
        row.state = "finished"
        db.execute(delete(MigrationObject).where(MigrationObject.bucket_id == row.id))
        audit(db, actor_id=None, action="storage.migration_finished", target_type="storage",
              target_id=row.storage_id, source=label)  # fmt: skip
        db.commit()
        outcomes.append(FinishOutcome(storage_id=row.storage_id, source=label, deleted=True))
    return outcomes


# -- progress, for the API -------------------------------------------------------------------
def moving(db: Session, storage_ids: list[str]) -> dict[str, str]:
    """Of these storages, those a migration is copying (not switched yet): the target backend of each."""
    if not storage_ids:
        return {}
    rows = db.execute(
        select(MigrationBucket.storage_id, MigrationBucket.target_backend).where(
            MigrationBucket.storage_id.in_(storage_ids), MigrationBucket.state == "copying"
        )
    )
    return {storage_id: target for storage_id, target in rows}  # noqa: C416 - rows are Row objects, not pairs


@dataclass(frozen=True, kw_only=True)
class BucketStatus:
    storage_id: str
    owner: str | None
    source: str
    target: str
    state: str
    message: str
    objects_total: int
    bytes_total: int
    objects_verified: int
    bytes_verified: int
    updated_at: dt.datetime


def status(db: Session) -> list[BucketStatus]:
    """Every bucket a migration has touched, with what is verified so far (the manifest's counts)."""
    verified = {
        bucket_id: (int(count), int(size))
        for bucket_id, count, size in db.execute(
            select(MigrationObject.bucket_id, func.count(), func.coalesce(func.sum(MigrationObject.size), 0)).group_by(
                MigrationObject.bucket_id
            )
        )
    }
    rows = db.execute(
        select(MigrationBucket, User.email)
        .join(User, User.id == MigrationBucket.user_id, isouter=True)
        .order_by(MigrationBucket.created_at)
    ).all()
    found = []
    for row, email in rows:
        count, size = verified.get(row.id, (0, 0))
        if row.state in ("switched", "finished"):  # the manifest of a finished bucket is dropped
            count, size = row.objects_total, row.bytes_total
        found.append(
            BucketStatus(
                storage_id=row.storage_id, owner=email, source=f"{row.source_backend}:{row.source_bucket}",
                target=f"{row.target_backend}:{row.target_bucket or ''}", state=row.state, message=row.message,
                objects_total=row.objects_total, bytes_total=row.bytes_total, objects_verified=count,
                bytes_verified=size, updated_at=row.updated_at,
            )
        )  # fmt: skip
    return found
