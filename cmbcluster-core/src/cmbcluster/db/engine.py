"""Engine set-up (SQLite in WAL mode by default, any SQLAlchemy URL) and migrations."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import Engine, Executable, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import ObjectDeletedError, StaleDataError
from sqlalchemy.pool import NullPool

from cmbcluster.errors import CmbclusterError, ConfigurationError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

#: What the database raises when another transaction changed or deleted a record this one writes
#: (two requests, or a request and a background loop, recording the same change at once).
CHANGED_MEANWHILE = (StaleDataError, ObjectDeletedError, IntegrityError)

MIGRATIONS = "cmbcluster.db:migrations"
#: The newest migration in ``migrations/versions`` (a test keeps the two equal). Knowing it lets
#: an up-to-date database start without importing Alembic, which costs a third of start-up.
SCHEMA_HEAD = "0010"
#: Values bound in one ``IN (...)`` query: well under every database's bound-parameter limit.
IN_BATCH = 500
T = TypeVar("T")


#: The databases CMBCluster runs on: SQLite (one server) and PostgreSQL (several replicas). Others
#: lack what it relies on (PostgreSQL's advisory locks keep replicas' schema changes, first sign-ins and
#: starts apart), and the chart refuses them.
SUPPORTED_DATABASES = ("sqlite", "postgresql")
#: What installs a supported database's drivers, for the message when one is missing.
DRIVER_PACKAGES = {
    "psycopg": "pip install 'cmbcluster-core[postgresql]' (psycopg[binary])",
    "psycopg2": "pip install psycopg2-binary (or postgresql://, psycopg 3: pip install 'cmbcluster-core[postgresql]')",
}


class DatabaseUnavailable(CmbclusterError):
    """The database cannot be opened or reached, or does not exist where a command only reads it."""

    http_status = 503
    code = "database_unavailable"


def database_url_problems(url: str) -> list[str]:
    """What stops the database at ``url`` from being opened on this machine, one line each: a
    database CMBCluster does not support, a driver that is not installed, a SQLite file on a FUSE or
    network mount. No connection is made. ``serve`` and ``config check`` refuse on these."""
    try:
        parsed = _engine_url(make_url(url))
    except ArgumentError:
        return [f"CMBCLUSTER_DATABASE_URL {_NOT_A_URL}"]
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_DATABASES:
        return [f"CMBCLUSTER_DATABASE_URL {_UNSUPPORTED.format(backend=backend)}"]
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        driver = parsed.get_driver_name() if not isinstance(exc, NoSuchModuleError) else parsed.drivername
        install = DRIVER_PACKAGES.get(driver, f"install the Python package of the {driver} driver")
        return [f"CMBCLUSTER_DATABASE_URL: the driver for {backend} ({driver}) is not installed: {install}"]
    return sqlite_location_problems(url)


#: Said of CMBCLUSTER_DATABASE_URL when SQLAlchemy cannot parse it (the value is not repeated: it may
#: hold a password).
_NOT_A_URL = (
    "is not a database URL: use postgresql://user:password@host/name, or sqlite:////absolute/path.db "
    "(unset: SQLite in the data directory); quote special characters of the password (%40 for @)"
)
_UNSUPPORTED = "names {backend}, which is not supported: use PostgreSQL (postgresql://...) or SQLite (sqlite:///...)"


def check_database_url(url: str) -> str:
    """``url`` if SQLAlchemy parses it and names a supported database (a settings validator: the
    problem is reported with the other settings', naming the variable, before anything starts)."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError(_NOT_A_URL) from None
    if backend not in SUPPORTED_DATABASES:
        raise ValueError(_UNSUPPORTED.format(backend=backend))
    return url


def _engine_url(parsed: URL) -> URL:
    if parsed.drivername == "postgresql":  # the driver the `postgresql` extra installs (psycopg 3)
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database, an in-memory one or a ``file:`` URI."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in {"", ":memory:"} or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def create_db_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys and a busy timeout, and its folder and
    file (private to this user) unless ``create`` is False: then a SQLite file that does not exist
    is :class:`DatabaseUnavailable` (a command that only reads must not create an empty database)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError([f"CMBCLUSTER_DATABASE_URL {_NOT_A_URL}"]) from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None and not create and not path.exists():
            raise DatabaseUnavailable(
                f"the database {path} does not exist (`cmbcluster db upgrade` or `cmbcluster serve` creates it)"
            )
        if path is not None and create:
            path.parent.mkdir(parents=True, exist_ok=True)
        # More than every thread that may hold one at once (the general and the cluster worker
        # threads, 8 and 16; the progress hub's three, the revocation watch's one and the usage
        # refresher's four; the event loop), so the event loop never waits for one. SQLite
        # connections are cheap.
        kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}, "pool_size": 40, "max_overflow": 10}
        engine = create_engine(url, **kwargs)
        if path is not None:
            # At each new connection, not now: a server restores a missing database from its backup
            # before its first connection, and an empty file here would read as present.
            event.listen(engine, "do_connect", lambda *_: _private_file(path))
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    problems = database_url_problems(url)
    if problems:  # a missing driver: one clear line, not ModuleNotFoundError at the first connection
        raise ConfigurationError(problems)
    # Up to 40 connections a replica, more than its threads may hold at once (see above; the
    # default 5 + 10 would make the event loop wait in a burst of starts), 8 of them kept open.
    return create_engine(_engine_url(parsed), pool_size=8, max_overflow=32, **kwargs)


def _private_file(path: Path) -> None:
    """Before SQLite opens ``path``: create it empty and 0600 if missing (SQLite takes an empty file
    as a new database, and would create it 0644 under the usual umask; its -wal and -shm files take
    the database file's mode). One readable by others (made before, or a restored backup) is made
    private when it is this user's, with its -wal and -shm files."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    except OSError:
        return  # cannot create it here: SQLite's own attempt says why (see DatabaseUnavailable)
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            info = file.stat()
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077 and info.st_uid == os.getuid():
                log.warning("database file %s was readable by other users: now 0600", file)
                file.chmod(0o600)
        except OSError:
            continue  # absent (-wal, -shm), or not ours to change


def open_problem(url: str, exc: DatabaseError) -> DatabaseUnavailable:
    """What a command says when the database at ``url`` cannot be opened or reached (``exc``):
    one line naming the database and, for SQLite, the permission or folder that stopped it."""
    shown = make_url(url).render_as_string(hide_password=True)
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    path = sqlite_path(url)
    try:
        hint = _sqlite_access_hint(path) if path is not None else None
    except OSError as denied:  # a folder on the way this user may not even look into
        hint = str(denied)
    return DatabaseUnavailable(f"cannot open the database {shown}: {reason}" + (f" ({hint})" if hint else ""))


def _sqlite_access_hint(path: Path) -> str | None:
    """Why this user cannot open the SQLite file ``path``, when a permission or the folder says."""
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    folder = path.parent
    if not folder.is_dir():
        return f"its folder {folder} does not exist or is not a folder"
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        # SQLite writes its -wal and -shm files beside the database: the folder must be writable too
        return f"its folder {folder} is not readable and writable by this user (uid {os.getuid()})"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user (uid {os.getuid()})"
    return None


#: How long `config check --connect` waits for PostgreSQL to answer.
CONNECT_TIMEOUT_SECONDS = 10


def reach_database(url: str) -> str:
    """Open the database at ``url`` and read from it, as a server would (`config check --connect`):
    what answered, or :class:`DatabaseUnavailable` saying why not. A SQLite file that does not exist
    yet is not created: its folder must let this user create it, as ``serve`` will."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # serve creates the missing folders under the nearest existing one
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DatabaseUnavailable(
                f"cannot create the database {path}: {folder} is not writable by this user (uid {os.getuid()})"
            )
        return f"{path} does not exist yet; serve creates it"
    if path is None and make_url(url).get_backend_name() == "sqlite":
        return "in memory"
    if path is not None:
        engine = create_db_engine(url, create=False)
    else:  # a bounded wait: an address that drops packets would otherwise hold the check for minutes
        engine = create_engine(
            _engine_url(make_url(url)), poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        )
    try:
        with opening(url), engine.connect() as connection:
            tables = len(inspect(connection).get_table_names())  # reads the file: catches one that is not a database
    finally:
        engine.dispose()
    return f"answered ({tables} tables)"


@contextlib.contextmanager
def opening(url: str) -> Iterator[None]:
    """Within this block, failing to open or reach the database at ``url`` (SQLAlchemy's
    OperationalError, or DatabaseError for a file that is not a database, raised while connecting,
    with no statement) is :class:`DatabaseUnavailable`: the command line prints it as one line."""
    try:
        yield
    except DatabaseError as exc:
        if exc.statement is not None:  # a statement failed (a migration, say), not the opening: as it is
            raise
        raise open_problem(url, exc) from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def begin_locked(db: Session) -> bool:
    """Begin ``db``'s transaction for a read, check and write that no other may interleave with.

    SQLite has one writer at a time, but a plain BEGIN takes the write lock only at the first
    write, after another writer may have changed what was read: BEGIN IMMEDIATE takes it before
    the first read. Returns True then (the whole database is locked until the transaction ends).
    Other databases lock rows: False, and the caller reads the rows it decides on with
    ``SELECT ... FOR UPDATE``. Hold such a transaction for a few statements only."""
    connection = db.connection()
    if connection.dialect.name != "sqlite":
        return False
    # (The session may have begun, as one_writer() begins it; the database's transaction may not.)
    if getattr(connection.connection.dbapi_connection, "in_transaction", False):
        raise RuntimeError("begin_locked() must begin the session's transaction")
    connection.exec_driver_sql("BEGIN IMMEDIATE")
    return True


#: See one_writer()
_SQLITE_WRITER = threading.Lock()


@contextlib.contextmanager
def one_writer(db: Session) -> Iterator[None]:
    """On SQLite, the writes of this process that a burst repeats (starts, the progress hub's
    records) one at a time, from their first write to their commit: SQLite has one writer anyway,
    and each waiter is woken the moment the one before commits, instead of in SQLite's busy
    handler, which sleeps between its tries (up to 100 ms each) while the database is free. A
    session that already wrote holds the database's lock: it goes on (waiting here could deadlock).
    Elsewhere, nothing: other databases lock rows."""
    if db.get_bind().dialect.name != "sqlite" or getattr(
        db.connection().connection.dbapi_connection, "in_transaction", True
    ):
        yield
        return
    with _SQLITE_WRITER:
        yield


class GroupCommit(Generic[T]):
    """Writes that would run one after the other, written several at a time (a group commit).

    Each caller hands in its item and waits; one caller at a time, the leader, writes every item
    handed in so far with ``write(items)`` (every caller passes the same function), in one
    transaction, while the next ones queue up. A burst of 200 starts made 200 transactions, each
    holding the database's one writer (SQLite) or the start lock (PostgreSQL) for a few statements,
    and under load each waited its turn several milliseconds longer than its own work (threads
    taking turns at the interpreter's lock between statements): one after the other, they took most
    of the burst. ``write`` decides every item's outcome itself; if it raises, each item of its
    batch gets that exception."""

    def __init__(self) -> None:
        self._queue: list[tuple[T, list[BaseException]]] = []
        self._queue_lock = threading.Lock()
        self._leader = threading.Lock()

    @property
    def queued(self) -> int:
        """How many items wait for a leader to write them."""
        with self._queue_lock:
            return len(self._queue)

    def submit(self, item: T, write: Callable[[list[T]], None]) -> None:
        """Write ``item`` with whatever else is queued (blocking); raise what its write raised."""
        failure: list[BaseException] = []
        with self._queue_lock:
            self._queue.append((item, failure))
        # Whoever holds the lock writes what is queued: ours, unless a leader before took it (it
        # released the lock only once written).
        with self._leader:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            if batch:
                try:
                    write([queued for queued, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - each waiting caller raises it
                    for _, failed in batch:
                        failed.append(exc)
        if failure:
            raise failure[0]


def begin_serialised(db: Session, lock_id: int) -> None:
    """Begin ``db``'s transaction so that transactions passing the same ``lock_id`` run one after the
    other, on every replica: BEGIN IMMEDIATE on SQLite (its one write lock), a transaction-scoped
    advisory lock on PostgreSQL. For what reads that no row exists and then adds it, where there is
    no row to lock yet (the first user). Hold it for a few statements only."""
    if not begin_locked(db):
        advisory_lock(db, lock_id)


def advisory_lock(db: Session, lock_id: int) -> None:
    """On PostgreSQL, take the transaction-scoped advisory lock ``lock_id``: transactions taking the
    same one run one after the other, on every replica. Elsewhere nothing (SQLite has one writer)."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(_ADVISORY_LOCK, {"lock_id": lock_id})


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:lock_id)")


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


#: The PostgreSQL advisory lock schema changes are made under (starts take 4242001, new accounts 4242002)
SCHEMA_LOCK = 4242000


def upgrade(engine: Engine, revision: str = "head", *, secret_key: bytes | None = None) -> None:
    """Apply migrations up to ``revision`` (nothing to do, and no Alembic import, when current).

    An empty database gets the current schema in one step and is stamped with its revision,
    as Alembic's cookbook recommends; a test keeps the models and the migrations identical.
    ``secret_key`` is the control plane's key: migrations that encrypt stored values need it.
    On PostgreSQL, replicas starting together take turns (an advisory lock): two creating the schema
    of an empty database at once made one fail to start ("duplicate key ... pg_type").
    """
    if revision == "head" and current_revision(engine) == SCHEMA_HEAD:
        return  # the usual start: nothing to lock
    with _schema_lock(engine):
        _upgrade(engine, revision, secret_key=secret_key)


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock :data:`SCHEMA_LOCK` on a connection of its own (SQLite: one
    server per database file, which holds its serving lock)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:lock_id)"), {"lock_id": SCHEMA_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:lock_id)"), {"lock_id": SCHEMA_LOCK})
            connection.commit()


def _upgrade(engine: Engine, revision: str, *, secret_key: bytes | None) -> None:
    if revision == "head":
        current = current_revision(engine)
        if current == SCHEMA_HEAD:
            return
        if current is None and not inspect(engine).get_table_names():
            _create_current_schema(engine)
            return
    from alembic import command

    cfg = _alembic_config(engine)
    cfg.attributes["secret_key"] = secret_key
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # SQLite's batch migrations copy a table and drop the old one: with foreign keys on,
            # dropping `users` would cascade and delete every row that refers to it. Off for the
            # migration (it must be set outside a transaction), checked, then on again.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # ends SQLAlchemy's autobegun transaction (the PRAGMA began none)
        try:
            with connection.begin():
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, revision)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows that refer to missing rows; nothing was changed")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def _create_current_schema(engine: Engine) -> None:
    from cmbcluster.db.models import Base

    with engine.begin() as connection:
        Base.metadata.create_all(connection)
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
        connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": SCHEMA_HEAD})


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the database's ``alembic_version`` table, or None when empty."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def sqlite_location_problems(url: str) -> list[str]:
    """What is wrong with a SQLite database at ``url`` on a FUSE or network mount, where file locks and
    WAL do not work (nothing for another database, or a local disk). Checked before anything starts."""
    if not url.startswith("sqlite"):
        return []
    path = Path(url.split("///", 1)[-1]) if "///" in url else None
    if path is None or str(path) in {"", ":memory:"}:
        return []
    fstype = filesystem_type(path.parent if not path.exists() else path)
    if fstype and (fstype.startswith("fuse") or fstype in {"nfs", "nfs4", "cifs", "smb3"}):
        return [
            f"the SQLite database {path} is on a {fstype} file system; SQLite needs a local disk "
            "(file locks and WAL do not work on FUSE or network mounts): move CMBCLUSTER_DATA_DIR "
            "or use CMBCLUSTER_DATABASE_URL=postgresql://..."
        ]
    return []


def filesystem_type(path: Path) -> str | None:
    """The file system type holding ``path`` (Linux /proc/mounts), or None when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")) and len(
            mount_point
        ) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def in_batches(items: Sequence[T], size: int = IN_BATCH) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``, one ``IN (...)`` query each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DeferredWrites:
    """Writes this process could not make when it should have (the database was away), made at
    its next heartbeat: a claim it failed to give back would otherwise hold until the process ends,
    as its own claims never count as gone. Each must be idempotent (it may be made twice)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._waiting: list[Executable] = []

    def add(self, statement: Executable) -> None:
        with self._lock:
            self._waiting.append(statement)

    def write(self) -> None:
        """Make the writes waiting, in one transaction; they wait for the next beat if it fails."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        try:
            with self.sessions() as db:
                for statement in waiting:
                    db.execute(statement)
                db.commit()
        except Exception:
            with self._lock:
                self._waiting[:0] = waiting
            log.warning("%d deferred writes failed again; trying at the next heartbeat", len(waiting), exc_info=True)
