"""Online backup of the SQLite database to the active storage backend, and restore.

One implementation for every cloud: backups go through :class:`~cmbcluster.interfaces.StorageBackend`
(the storage hook), to the bucket named by ``CMBCLUSTER_DATABASE_BUCKET`` (aliases
``S3_DATABASE_BUCKET``, ``GCS_DATABASE_BUCKET``, ``DATABASE_BUCKET``), under
``CMBCLUSTER_DATABASE_BACKUP_PREFIX``.

- **Backup**: sqlite3's backup API copies the live database, in one step, to a temporary file
  beside it (a local disk, by configuration). In WAL mode, which the engine always sets, that
  step is a read transaction: writers carry on while it runs. The copy is checked, then gzipped
  and streamed to ``<prefix>cmbcluster-<UTC timestamp>.sqlite3.gz``; timestamps sort, so the
  newest backup is the last name. Older backups beyond ``CMBCLUSTER_DATABASE_BACKUPS_KEPT`` are
  deleted (a versioned bucket still holds them as non-current versions).
- **Restore**: the backup is downloaded to a temporary file beside the database and checked
  (``PRAGMA integrity_check``, and it must hold a migrated CMBCluster schema) before anything is
  touched; the current database (with its ``-wal`` and ``-shm``) is then renamed aside, never
  deleted, and the backup renamed into place. The server must not be running meanwhile.
- **At start** (:func:`restore_at_start`): a missing local database is restored from the newest
  backup that verifies, so a server on a fresh disk picks up where it left off; before that,
  :func:`sweep_backup_leftovers` deletes the copies killed backups left beside the database.
- **Periodically** (:func:`run_periodic_backups`): in the server's background, when the database
  changed since the last backup.

PostgreSQL is not backed up here: its own tools do that better.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import sqlite3
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from cmbcluster.db.engine import sqlite_path
from cmbcluster.errors import CmbclusterError, ConfigurationError, Conflict, InvalidRequest, NotFound
from cmbcluster.interfaces import StorageBackend
from cmbcluster.naming import validate_object_prefix

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cmbcluster.config import ResolvedConfig
    from cmbcluster.context import AppContext
    from cmbcluster.settings import CoreSettings

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
CONTENT_TYPE = "application/gzip"
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"
_NAME = re.compile(r"^cmbcluster-(?P<version>\d{8}T\d{12}Z)\.sqlite3\.gz$")
_TEMP_PREFIX = ".cmbcluster-backup-"
#: How long the periodic backups' first look at their bucket may take before it is said unreadable.
BUCKET_CHECK_SECONDS = 30


class BackupUnavailable(CmbclusterError):
    """Backups cannot run with this configuration (PostgreSQL, no database bucket, ...)."""

    code = "backup_unavailable"


@dataclass(frozen=True, kw_only=True)
class BackupInfo:
    """One backup in the database bucket. ``version`` is its UTC timestamp, as in its name."""

    key: str
    version: str
    size: int
    created_at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class SkippedBackup:
    """A newer backup a restore passed over because it does not verify, and why."""

    backup: BackupInfo
    reason: str


@dataclass(frozen=True, kw_only=True)
class RestoreResult:
    backup: BackupInfo
    database: Path
    #: Where the database that was replaced now lies (None when there was none).
    kept_aside: Path | None
    #: Newer backups that did not verify, newest first (restoring "the newest" falls back past them).
    skipped: tuple[SkippedBackup, ...] = ()
    #: Access taken away since the backup that the restore kept taken away, a line each for people.
    access_kept_away: tuple[str, ...] = ()


def _wal_files(database: Path) -> list[Path]:
    return [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm")]


def _configured(core: CoreSettings) -> tuple[Path, str, str]:
    """The database file, bucket and prefix of the backups; BackupUnavailable saying why not."""
    database = sqlite_path(core.effective_database_url)
    if database is None:
        raise BackupUnavailable(
            "the database is not a SQLite file (CMBCLUSTER_DATABASE_URL): back up PostgreSQL with its own "
            "tools (pg_dump, your provider's snapshots); CMBCluster backs up SQLite only"
        )
    if not core.database_bucket:
        raise BackupUnavailable(
            "no database bucket is configured: set CMBCLUSTER_DATABASE_BUCKET (or S3_DATABASE_BUCKET, "
            "GCS_DATABASE_BUCKET) to a bucket of the storage backend"
        )
    try:
        prefix = validate_object_prefix(core.database_backup_prefix)
    except InvalidRequest as exc:
        raise ConfigurationError([f"CMBCLUSTER_DATABASE_BACKUP_PREFIX is not a valid prefix: {exc}"]) from None
    return database, core.database_bucket, prefix


class DatabaseBackups:
    """Backups of the SQLite file ``database`` in ``bucket`` of ``storage``, under ``prefix``."""

    def __init__(self, storage: StorageBackend, bucket: str, database: Path, *, prefix: str = "", kept: int = 0):
        problem = storage.bucket_names.problem(bucket)
        if problem is not None:  # as the storage service would, before anything is copied or uploaded
            raise ConfigurationError([f"the database bucket: {problem}"])
        self.storage = storage
        self.bucket = bucket
        self.database = database
        self.prefix = validate_object_prefix(prefix)
        self.kept = kept

    @classmethod
    def from_settings(cls, core: CoreSettings, storage: StorageBackend) -> DatabaseBackups:
        """Backups as configured; :class:`BackupUnavailable` saying why when they cannot run."""
        database, bucket, prefix = _configured(core)
        return cls(storage, bucket, database, prefix=prefix, kept=core.database_backups_kept)

    # -- backup ------------------------------------------------------------------------------
    def backup(self) -> BackupInfo:
        """Copy the live database and upload the copy; return the new backup."""
        if not self.database.is_file():
            raise NotFound(f"there is no database at {self.database} to back up")
        created = dt.datetime.now(dt.UTC)
        version = created.strftime(_STAMP_FORMAT)
        key = f"{self.prefix}cmbcluster-{version}.sqlite3.gz"
        with self._temporary_file() as copy:
            try:
                _online_copy(self.database, copy)
            except sqlite3.DatabaseError as exc:  # not a database, or not readable: one line, not a traceback
                raise InvalidRequest(f"cannot back up {self.database}: {exc}") from exc
            _check_database(copy, f"the copy of {self.database}")
            info = self.storage.upload_object(self.bucket, key, _gzip_chunks(copy), content_type=CONTENT_TYPE)
        backup = BackupInfo(key=key, version=version, size=info.size, created_at=created)
        log.info("database backed up to %s/%s (%d bytes)", self.bucket, key, info.size, extra={"backup": key})
        try:
            self.prune(backup)
        except CmbclusterError as exc:  # the backup itself is safe; the next one retries the clean-up
            log.warning("could not delete old database backups from %s: %s", self.bucket, exc)
        return backup

    def prune(self, newest: BackupInfo) -> list[BackupInfo]:
        """Delete the backups older than the ``kept`` newest up to ``newest`` (the one just made);
        return them.

        A backup is ordered by the time in its name. One named after ``newest`` was written while
        a clock ran ahead, or is not ours: it is neither deleted nor counted, since counting it
        deleted the backup just made and every good one before it (found by an outsider's trial).
        """
        if self.kept <= 0:
            return []
        backups = self.list()
        ahead = [b for b in backups if b.version > newest.version]
        if ahead:
            log.warning("database backups in %s are named after the one just made (%s), kept and not counted: %s",
                        self.bucket, newest.key, ", ".join(b.key for b in ahead))  # fmt: skip
        old = [b for b in backups if b.version <= newest.version][: -self.kept]
        if old:
            self.storage.delete_objects(self.bucket, [b.key for b in old])
        return old

    # -- listing -----------------------------------------------------------------------------
    def list(self) -> list[BackupInfo]:
        """Every backup under the prefix, oldest first."""
        backups: list[BackupInfo] = []
        token: str | None = None
        while True:
            page = self.storage.list_objects(self.bucket, self.prefix, delimiter="/", page_token=token)
            for obj in page.objects:
                match = _NAME.match(obj.key[len(self.prefix) :])
                if match:
                    version = match["version"]
                    created = dt.datetime.strptime(version, _STAMP_FORMAT).replace(tzinfo=dt.UTC)
                    backups.append(BackupInfo(key=obj.key, version=version, size=obj.size, created_at=created))
            token = page.next_token
            if token is None:
                return sorted(backups, key=lambda b: b.version)

    def find(self, version: str | None = None) -> BackupInfo:
        """The newest backup, or the one whose version, name or key is ``version``."""
        backups = self.list()
        if not backups:
            raise NotFound(f"there is no database backup in {self.bucket}/{self.prefix}")
        if version is None:
            return backups[-1]
        for backup in backups:
            if version in (backup.version, backup.key, backup.key[len(self.prefix) :]):
                return backup
        raise NotFound(
            f"no database backup {version!r} in {self.bucket}/{self.prefix}; "
            f"the newest is {backups[-1].version} (list them with `cmbcluster db backup --list`)"
        )

    # -- restore -----------------------------------------------------------------------------
    def restore(self, version: str | None = None, *, server_stopped: bool = True) -> RestoreResult:
        """Replace the database with a backup (the newest by default), checked first.

        The current database is renamed aside, with its ``-wal`` and ``-shm``, never deleted.
        Nothing changes when the download or the check fails. Refused (Conflict) while a server
        serves the database (``server_stopped``: check it; the server's own start-up restore
        passes False, holding the lock itself).
        """
        if server_stopped:
            with ServingLock(self.database) as lock:
                if not lock.acquire():
                    raise Conflict(
                        f"a control plane (pid {lock.holder() or 'unknown'}) is serving {self.database}: stop it "
                        "first (on Kubernetes: scale the Deployment to 0 and run the restore as a Job with the "
                        "data volume, see docs/operators/backup.md)"
                    )
                return self.restore(version, server_stopped=False)
        if version is not None:
            return self._restore_one(self.find(version), ())
        # The newest backup that verifies: a damaged newest one (a bad upload, a truncated object)
        # must not stop a restore, or a server's first start, while older good ones exist.
        self.find()  # NotFound when there is none
        skipped: list[SkippedBackup] = []
        for backup in reversed(self.list()):
            try:
                return self._restore_one(backup, tuple(skipped))
            except InvalidRequest as exc:
                log.warning("database backup %s/%s does not verify and is skipped: %s", self.bucket, backup.key,
                            exc.message)  # fmt: skip
                skipped.append(SkippedBackup(backup=backup, reason=exc.message))
        raise InvalidRequest(
            f"no database backup in {self.bucket}/{self.prefix} verifies: "
            + "; ".join(f"{s.backup.key}: {s.reason}" for s in skipped)
        )

    def _restore_one(self, backup: BackupInfo, skipped: tuple[SkippedBackup, ...]) -> RestoreResult:
        self.database.parent.mkdir(parents=True, exist_ok=True)
        with self._temporary_file() as downloaded:
            with open(downloaded, "wb") as out:
                for chunk in _gunzip(self.storage.download_object(self.bucket, backup.key), backup.key):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _check_database(downloaded, f"backup {backup.key}")
            kept_away = _keep_access_taken_away(self.database, downloaded) if self.database.is_file() else ()
            kept_aside = self._set_aside(backup.version)
            os.replace(downloaded, self.database)
        log.warning(
            "database restored from %s/%s%s%s%s", self.bucket, backup.key,
            f"; the previous one is kept as {kept_aside}" if kept_aside else "",
            f"; skipped the newer {', '.join(s.backup.key for s in skipped)}, which did not verify" if skipped else "",
            "".join(f"; {line}" for line in kept_away),
            extra={"backup": backup.key, "kept_aside": str(kept_aside) if kept_aside else None},
        )  # fmt: skip
        return RestoreResult(backup=backup, database=self.database, kept_aside=kept_aside, skipped=skipped,
                             access_kept_away=kept_away)  # fmt: skip

    def _set_aside(self, version: str) -> Path | None:
        """Rename the database and its WAL files to ``<name>.before-restore-<stamp>``; a stray WAL
        without its database goes too, as SQLite would apply it to the restored file."""
        present = [p for p in [self.database, *_wal_files(self.database)] if p.exists()]
        if not present:
            return None
        stamp = dt.datetime.now(dt.UTC).strftime(_STAMP_FORMAT)
        aside = self.database.with_name(f"{self.database.name}.before-restore-{stamp}")
        for path in present:
            # SQLite finds a database's WAL by name: keep the trio together under the new name.
            os.replace(path, aside.with_name(aside.name + path.name[len(self.database.name) :]))
        if self.database not in present:
            log.warning("moved the WAL files of a missing database aside: %s-wal, -shm", aside)
            return None
        return aside

    @contextlib.contextmanager
    def _temporary_file(self) -> Iterator[Path]:
        """A file beside the database: the same local disk, so the final rename is atomic. It is
        locked (flock) while in use, so that :func:`sweep_backup_leftovers` tells one a killed
        backup or restore left behind from one under way."""
        import fcntl

        self.database.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.database.parent, prefix=_TEMP_PREFIX, suffix=".sqlite3")
        path = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            for leftover in _temporary_files(path):
                leftover.unlink(missing_ok=True)
            os.close(fd)


def _temporary_files(path: Path) -> list[Path]:
    return [path, *_wal_files(path), path.with_name(path.name + "-journal")]


def sweep_backup_leftovers(database: Path) -> list[Path]:
    """Delete the temporary copies (``.cmbcluster-backup-*``) that backups or restores killed
    mid-way left beside ``database``: each is a full copy of the database, and repeated kills would
    fill the disk. A copy in use by a live process is locked and kept. Returns what was deleted."""
    import fcntl

    removed: list[Path] = []
    for path in sorted(database.parent.glob(f"{_TEMP_PREFIX}*.sqlite3")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a backup under way (`cmbcluster db backup` beside the server)
        else:
            for leftover in _temporary_files(path):
                if leftover.exists():
                    leftover.unlink(missing_ok=True)
                    removed.append(leftover)
        finally:
            os.close(fd)
    if removed:
        log.warning("deleted what killed database backups or restores left beside %s: %s", database,
                    ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _keep_access_taken_away(current: Path, restored: Path) -> tuple[str, ...]:
    """Access the current database took away since the backup stays taken away in the restored
    one: a restore had brought back deactivated (and deleted) accounts with their API tokens,
    admin rights taken back, ended sessions and revoked tokens (found by an outsider's trial).
    A deleted account comes back deactivated. Returns a line for people per kind of access kept away.

    A current database that cannot be read (a restore is how a damaged one is replaced) is said,
    and the restore goes on. One whose changes cannot be written into the backup refuses the
    restore (Conflict, not InvalidRequest: that would read as a backup that does not verify, and
    the restore would fall back to an older one), nothing changed: as it is, it gives access back.
    """
    from sqlalchemy import create_engine, inspect, select, update

    from cmbcluster.db.engine import in_batches
    from cmbcluster.db.models import ApiToken, Session, User, utcnow

    def engine(path: Path, mode: str) -> Engine:
        return create_engine("sqlite://", creator=lambda: sqlite3.connect(_uri(path, mode), uri=True))

    def first_line(exc: BaseException) -> str:
        return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]

    source, target = engine(current, "ro"), engine(restored, "rw")
    try:
        try:
            with source.connect() as db:
                now_users = {row.id: row for row in db.execute(select(User.id, User.status, User.role))}
                live_sessions = set(db.execute(select(Session.id).where(Session.revoked_at.is_(None))).scalars())
                live_tokens = set(db.execute(select(ApiToken.id).where(ApiToken.revoked_at.is_(None))).scalars())
        except Exception as exc:  # noqa: BLE001 - a damaged database says nothing; the restore goes on
            said = (f"could not read what access the replaced database took away since the backup ({first_line(exc)}): "
                    "deactivations and revocations made since are undone, make them again")  # fmt: skip
            log.warning("%s", said)
            return (said,)
        try:
            with target.begin() as db:
                then_users = db.execute(select(User.id, User.email, User.status, User.role)).all()
                deactivate = [u for u in then_users if u.status == "active" and (
                    u.id not in now_users or now_users[u.id].status != "active")]  # fmt: skip
                demote = [u for u in then_users
                          if u.role == "admin" and u.id in now_users and now_users[u.id].role != "admin"]  # fmt: skip
                sessions = [i for i in db.execute(select(Session.id).where(Session.revoked_at.is_(None))).scalars()
                            if i not in live_sessions]  # fmt: skip
                tokens = [i for i in db.execute(select(ApiToken.id).where(ApiToken.revoked_at.is_(None))).scalars()
                          if i not in live_tokens]  # fmt: skip
                # A backup from before migration 0010 has no admin_because; its upgrade at start adds it.
                demoted: dict[str, Any] = {"role": "user"}
                if "admin_because" in {column["name"] for column in inspect(db).get_columns("users")}:
                    demoted["admin_because"] = None
                now = utcnow()
                for batch in in_batches([u.id for u in deactivate]):
                    db.execute(update(User).where(User.id.in_(batch)).values(status="deactivated"))
                for batch in in_batches([u.id for u in demote]):
                    db.execute(update(User).where(User.id.in_(batch)).values(**demoted))
                for table, ids in ((Session, sessions), (ApiToken, tokens)):
                    for batch in in_batches(ids):
                        db.execute(update(table).where(table.id.in_(batch)).values(revoked_at=now))
        except Exception as exc:
            raise Conflict(
                f"could not keep in the backup the access {current} took away since it ({first_line(exc)}), so "
                "nothing was restored; to restore it as it is, move the current database aside first (its "
                "deactivations and revocations since are then undone: make them again)"
            ) from exc
    finally:
        source.dispose()
        target.dispose()
    lines = []
    if deactivate:
        emails = ", ".join(u.email for u in deactivate)
        lines.append(f"{len(deactivate)} accounts deactivated or deleted since the backup stay deactivated: {emails}")
    if demote:
        lines.append(f"{len(demote)} admins demoted since the backup stay users: {', '.join(u.email for u in demote)}")
    if sessions or tokens:
        lines.append(f"{len(sessions)} sessions and {len(tokens)} API tokens ended since the backup stay ended")
    return tuple(lines)


def _online_copy(source: Path, target: Path) -> None:
    """Copy ``source`` with the backup API, in a single step: in WAL mode that is one read
    transaction, which never blocks writers (stepping would restart on every write)."""
    # mode=rw: never create a database where there was none.
    with contextlib.closing(sqlite3.connect(_uri(source, "rw"), uri=True, timeout=30)) as src:
        with contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
            # A self-contained single file (the live database is in WAL mode, and the copy says so).
            dst.execute("PRAGMA journal_mode=DELETE")


def _uri(path: Path, mode: str) -> str:
    """A SQLite URI for ``path`` (any characters in it escaped) opened in ``mode``: never created."""
    return f"{path.resolve().as_uri()}?mode={mode}"


def _check_database(path: Path, what: str) -> None:
    """``PRAGMA integrity_check`` passes and the file holds a migrated CMBCluster schema."""
    try:
        with contextlib.closing(sqlite3.connect(_uri(path, "ro"), uri=True)) as db:
            result = [row[0] for row in db.execute("PRAGMA integrity_check")]
            has_schema = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise InvalidRequest(f"{what} is not a usable SQLite database: {exc}") from None
    if result != ["ok"]:
        raise InvalidRequest(f"{what} fails SQLite's integrity check: {'; '.join(result[:5])}")
    if not has_schema:
        raise InvalidRequest(f"{what} is not a CMBCluster database (it has no migration table)")


def _gzip_chunks(path: Path) -> Iterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip format
    with open(path, "rb") as f:
        while block := f.read(CHUNK_SIZE):
            if out := compressor.compress(block):
                yield out
    yield compressor.flush()


def _gunzip(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    decompressor = zlib.decompressobj(31)
    try:
        for chunk in chunks:
            if out := decompressor.decompress(chunk):
                yield out
        if tail := decompressor.flush():
            yield tail
    except zlib.error as exc:
        raise InvalidRequest(f"backup {what} is not valid gzip data: {exc}") from None
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if not decompressor.eof:
        raise InvalidRequest(f"backup {what} is truncated")


# -- the server's side ------------------------------------------------------------------------
class ServingLock:
    """An exclusive lock on ``<database>.serving`` that a control plane holds while it serves a
    SQLite database, and a restore while it replaces it: neither happens under the other (a
    restore under a running server would leave it writing to the file set aside). The kernel
    releases it when the process ends, however it ends."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".serving")
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (never waits); False when another process holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid written by whoever holds the lock (for messages)."""
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> ServingLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def serving_lock(context: AppContext) -> ServingLock | None:
    """The lock a server takes for its database: SQLite only (PostgreSQL serves many replicas)."""
    database = sqlite_path(context.config.core.effective_database_url)
    if database is None:
        return None
    lock = ServingLock(database)
    if not lock.acquire():
        raise ConfigurationError(
            [f"another process (pid {lock.holder() or 'unknown'}) is serving or restoring {database}: one control "
             "plane per SQLite database (use PostgreSQL for several replicas)"]
        )  # fmt: skip
    return lock


def restore_at_start(context: AppContext) -> RestoreResult | None:
    """Before migrations: restore the newest backup when the SQLite file is missing.

    A storage failure stops the start (with its message) rather than starting on an empty
    database, whose next backup would become the newest one.
    """
    core = context.config.core
    database = sqlite_path(core.effective_database_url)
    if database is None or not core.database_bucket or database.exists():
        return None
    backups = DatabaseBackups.from_settings(core, context.storage)
    try:
        newest = backups.list()
    except CmbclusterError as exc:
        raise ConfigurationError(
            [f"the database {database} is missing and its backups in {core.database_bucket} cannot be listed: {exc}"]
        ) from exc
    if not newest:
        log.info("no database at %s and no backup in %s: starting with a new database", database, backups.bucket)
        from cmbcluster.db.engine import opening

        # made now: `serve` asks before the app's start-up asks again (a place it cannot be made: one line)
        with opening(core.effective_database_url), context.engine.connect():
            pass
        return None
    try:
        # the server's own start: it holds the serving lock, or (`serve`, before the app) is starting
        result = backups.restore(server_stopped=False)
    except CmbclusterError as exc:
        raise ConfigurationError(
            [f"the database {database} is missing and no backup could be restored: {exc}; restore one with "
             "`cmbcluster db restore --version VERSION`, or unset CMBCLUSTER_DATABASE_BUCKET to start with an "
             "empty database"]
        ) from exc  # fmt: skip
    context.engine.dispose()  # no connection may outlive the file it opened
    return result


def _fingerprint(database: Path) -> tuple[tuple[int, int], ...]:
    """Changes whenever a transaction commits (to the WAL) or a checkpoint writes the file."""
    stats = []
    for path in (database, *_wal_files(database)[:1]):
        try:
            stat = path.stat()
            stats.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            stats.append((0, 0))
    return tuple(stats)


async def run_periodic_backups(context: AppContext, stop: asyncio.Event) -> None:
    """Back up the database every ``CMBCLUSTER_DATABASE_BACKUP_INTERVAL_MINUTES`` when it changed,
    and once more when the server stops, so that a restart on a fresh disk loses nothing.

    Returns at once when backups are off (interval 0, no bucket, not SQLite). A failed backup is
    logged and retried at the next interval; the server carries on.
    """
    core = context.config.core
    if core.database_backup_interval_minutes <= 0 or not core.database_bucket:
        return
    try:
        backups = DatabaseBackups.from_settings(core, context.storage)
    except BackupUnavailable as exc:
        log.info("periodic database backups are off: %s", exc)
        return
    interval = core.database_backup_interval_minutes * 60
    last = _fingerprint(backups.database)  # as restored or migrated at start: nothing new yet
    try:  # said at start, not first at the first backup an hour on, or at the stop (bounded: a stop may come)
        await asyncio.wait_for(run_in_threadpool(backups.list), timeout=BUCKET_CHECK_SECONDS)
    except Exception as exc:  # noqa: BLE001 - whatever the store answers, the server serves; said loudly
        log.error("the database bucket %s cannot be read, so database backups will fail until it can: %s",
                  backups.bucket, exc)  # fmt: skip
    while True:
        stopping = False
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            stopping = True
        except TimeoutError:
            pass
        current = _fingerprint(backups.database)
        if current != last and stopping:
            await _final_backup(backups, core.database_stop_backup_seconds)
        elif current != last:
            try:
                await run_in_threadpool(backups.backup)
                last = current
            except Exception:  # keep the loop alive; the next interval retries
                log.exception("database backup failed")
        if stopping:
            return


async def _final_backup(backups: DatabaseBackups, bound: float) -> None:
    """The backup a stopping server makes, waited for at most ``bound`` seconds: with the storage
    service down, its client's retries would hold the stop for as long as they last. It runs in a
    daemon thread, which the process does not wait for once the stop goes on without it (an
    unfinished upload stores nothing; the database bucket's lifecycle aborts what it left)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[BaseException | None] = loop.create_future()  # the backup's error, if any

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            backups.backup()
        except Exception as exc:  # noqa: BLE001 - handed to the stopping server, which logs it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="cmbcluster-final-backup", daemon=True).start()
    try:
        error = await asyncio.wait_for(asyncio.shield(done), timeout=bound)
    except TimeoutError:
        log.warning(
            "the final database backup did not finish within %g s (CMBCLUSTER_DATABASE_STOP_BACKUP_SECONDS): is "
            "the storage service down? The server stops without it; the newest backup is the one made before, "
            "and the changes since are only in %s", bound, backups.database,
        )  # fmt: skip
        return
    if error is not None:
        log.error("the final database backup failed; the changes since the last backup are only in %s",
                  backups.database, exc_info=error)  # fmt: skip


@contextlib.contextmanager
def open_backups(config: ResolvedConfig) -> Iterator[DatabaseBackups]:
    """The configured backups with the active storage backend, closed afterwards (for the CLI)."""
    core = config.core
    _configured(core)  # refuse PostgreSQL or no bucket before making any client
    try:
        storage = config.create(config.storage)
    except CmbclusterError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            [f"{config.describe(config.storage)} could not be created: {type(exc).__name__}: {exc}"]
        ) from exc
    try:
        yield DatabaseBackups.from_settings(core, storage)
    finally:
        storage.close()
