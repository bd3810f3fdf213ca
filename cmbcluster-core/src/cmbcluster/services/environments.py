"""Environments: create from the catalog, start, stop, restart, delete, and their limits.

The database holds what each user asked for (``desired_state``) and the last status seen;
the compute backend holds what runs. Every choice (application, resources, buckets and mount
points, variables) is stored, so a restart or a start after a stop reproduces the environment.
Limits and the server-wide start slots live in the database, so they hold across replicas.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import functools
import logging
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Row, Table, bindparam, delete, func, insert, inspect, select
from sqlalchemy import update as update_statement  # this module's update() changes an environment
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached, selectinload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.schema import sort_tables

from cmbcluster.compute.mounts import mount_bucket
from cmbcluster.context import AppContext
from cmbcluster.db.engine import CHANGED_MEANWHILE, begin_locked, begin_serialised, one_writer
from cmbcluster.db.models import (
    Application,
    Environment,
    EnvironmentStorage,
    StartSlot,
    Storage,
    User,
    new_id,
    utcnow,
)
from cmbcluster.errors import CmbclusterError, Conflict, InvalidRequest, LimitExceeded, NotFound
from cmbcluster.interfaces import (
    EnvironmentPhase,
    EnvironmentSpec,
    Resources,
    UserRef,
)
from cmbcluster.naming import MAX_KEY_SEGMENT_BYTES
from cmbcluster.services import budgets, storages, user_settings
from cmbcluster.services.audit import activity, audit
from cmbcluster.services.catalog import resolve_resources
from cmbcluster.services.ownership import Owner, owned, owned_id
from cmbcluster.services.status import apply_status, delete_expired_slots, release_start_slot
from cmbcluster.text import check_display_name, describe_character, first_control_or_bidi

log = logging.getLogger(__name__)

#: Statuses of an environment that holds (or is about to hold) resources.
ACTIVE_STATUSES = ("pending", "starting", "running")
#: Statuses from which ``start`` may run again.
STARTABLE_STATUSES = ("stopped", "failed")
MAX_MOUNTS = 10
MAX_ENV_VARS = 100
MAX_NAME = 100
#: a busy environment writes its activity at most this often
ACTIVITY_WRITE_INTERVAL = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class MountChoice:
    storage_id: str
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class EnvironmentRequest:
    """What a user chooses when creating an environment."""

    application: str
    name: str | None = None
    preset: str | None = None
    cpu: float | None = None
    memory_mib: int | None = None
    mounts: Sequence[MountChoice] = ()
    env: dict[str, str] = field(default_factory=dict)


def get_owned(db: Session, user: Owner, environment_id: str) -> Environment:
    """The user's environment, or NotFound: another user's id looks exactly like an unknown one."""
    return owned(
        db, Environment, user, environment_id, what="environment",
        options=(selectinload(Environment.application_row), selectinload(Environment.mounts)),
    )  # fmt: skip


def check_owned(db: Session | Connection, user: Owner, environment_id: str) -> None:
    """NotFound unless the environment is the user's (nothing loaded)."""
    owned_id(db, Environment, user, environment_id, what="environment")


def list_owned(db: Session, user: User) -> list[Environment]:
    return list(
        db.execute(
            select(Environment)
            .where(Environment.user_id == user.id)
            .options(selectinload(Environment.application_row), selectinload(Environment.mounts))
            .order_by(Environment.created_at)
        ).scalars()
    )


def running_ids(db: Session, user: Owner) -> list[str]:
    """The ids of the user's environments that hold resources now."""
    return list(
        db.execute(
            select(Environment.id).where(Environment.user_id == user.id, Environment.status.in_(ACTIVE_STATUSES))
        ).scalars()
    )


def create(
    db: Session, context: AppContext, user: User, request: EnvironmentRequest, *, start: bool = False
) -> Environment:
    """Validate every choice and store the environment (``stopped``); with ``start``, reserve its
    start in the same transaction and hand it to the backend (blocking). A start refused by a limit
    leaves nothing behind, not even an audit event: retrying the same request is all it takes."""
    core = context.config.core
    if start:
        budgets.check_start(db, context, user)
    application = db.execute(
        select(Application).where((Application.id == request.application) | (Application.slug == request.application))
    ).scalar_one_or_none()
    if application is None or not application.active:
        raise NotFound(f"application {request.application} not found")
    missing = context.compute.check_command(application.command)
    if missing is not None:
        raise Conflict(f"{application.name} cannot start on this server: {missing}")
    preset, cpu, memory = resolve_resources(
        request.preset or (None if request.cpu or request.memory_mib else application.default_preset),
        request.cpu,
        request.memory_mib,
        max_cpu=core.max_cpu,
        max_memory_mib=core.max_memory_mib,
    )
    env_vars = _validate_env(request.env)
    mounts = _validate_mounts(db, user, request.mounts)
    name = check_display_name(request.name or application.name, what="an environment name", limit=MAX_NAME)
    # The user's settings for the start, read in this transaction (before anything is added to the
    # session, which a query would flush): after the reservation they took one more transaction,
    # with a connection checked out again, for each create of a burst.
    settings = _read_settings(db, context, user.id) if start else None
    env = Environment(
        id=new_id(), user_id=user.id, application_id=application.id, name=name, backend=context.config.compute.name,
        desired_state="stopped", status="stopped", cpu=cpu, memory_mib=memory, preset=preset, env=env_vars,
    )  # fmt: skip
    rows = [
        EnvironmentStorage(
            environment_id=env.id, storage_id=storage.id, mount_path=choice.mount_path, read_only=choice.read_only
        )
        for storage, choice in sorted(mounts, key=lambda mount: mount[1].mount_path)  # as the relationship orders
    ]
    # Not flushed yet: with ``start``, it is inserted once, already pending (see reserve_start).
    db.add_all([env, *rows])
    # Starting it reads its application and mounts: known here, so marked as loaded (no queries
    # again, and nothing more for the flush to do).
    set_committed_value(env, "application_row", application)
    set_committed_value(env, "mounts", rows)
    audit(db, actor_id=user.id, action="environment.created", target_type="environment", target_id=env.id,
          name=name, application=application.slug, preset=preset)  # fmt: skip
    if start:
        reserve_start(db, context, user, env)  # commits everything, or rolls everything back and raises
        launch(db, context, env, settings=settings)
    else:
        db.commit()
    return env


def start(db: Session, context: AppContext, user: User, env: Environment) -> None:
    """Start a stopped or failed environment with its stored choices (blocking)."""
    budgets.check_start(db, context, user)
    earlier = env.status
    reserve_start(db, context, user, env)
    launch(db, context, env, earlier_status=earlier)


def restart(db: Session, context: AppContext, user: User, env: Environment) -> None:
    """Stop (when it runs) and start again with the same choices (blocking)."""
    budgets.check_start(db, context, user)  # before the stop: a refused restart keeps it running
    if env.status in ACTIVE_STATUSES:
        stop(db, context, env, actor_id=user.id, reason="restarting")
    start(db, context, user, env)


def _validate_env(env: dict[str, str]) -> dict[str, str]:
    """The same rules as the user's own variables (names, reserved names, value size)."""
    if len(env) > MAX_ENV_VARS:
        raise InvalidRequest(f"at most {MAX_ENV_VARS} environment variables")
    return {user_settings.validate_env_var_name(k): user_settings.validate_env_var_value(v) for k, v in env.items()}


def _validate_mount_path(mount_path: str) -> str:
    """``mount_path`` without a final slash, if every backend can make it a folder (a NUL or a name
    longer than a file name's would fail the start) and it reads as itself where it is shown (the
    environment's page, its home folder): no control or bidirectional character, as new object keys."""
    path = mount_path.rstrip("/") or "/"
    if path == "/" or not path.startswith("/"):
        raise InvalidRequest(f"mount path {mount_path!r} must be an absolute folder other than /")
    if any(p in {"", ".", ".."} for p in path.split("/")[1:]):
        raise InvalidRequest(f"mount path {mount_path!r} must name its folders: no '.', '..' or empty ones")
    if len(path) > 400:
        raise InvalidRequest("mount paths are at most 400 characters")
    bad = first_control_or_bidi(path)
    if bad is not None:
        raise InvalidRequest(f"a mount path cannot contain {describe_character(bad)}")
    if any(len(name.encode("utf-8")) > MAX_KEY_SEGMENT_BYTES for name in path.split("/")):
        raise InvalidRequest(f"each folder name of a mount path may be at most {MAX_KEY_SEGMENT_BYTES} bytes")
    return path


def _validate_mounts(db: Session, user: User, choices: Sequence[MountChoice]) -> list[tuple[Storage, MountChoice]]:
    if len(choices) > MAX_MOUNTS:
        raise InvalidRequest(f"at most {MAX_MOUNTS} buckets can be mounted")
    seen_paths: set[str] = set()
    seen_storages: set[str] = set()
    result = []
    for choice in choices:
        storage = db.get(Storage, choice.storage_id)
        if storage is None or storage.user_id != user.id:
            raise NotFound("a bucket you chose to mount does not exist (any more): reload the page and choose again")
        path = _validate_mount_path(choice.mount_path)
        if path in seen_paths or choice.storage_id in seen_storages:
            raise InvalidRequest("each bucket and each mount path may be used once")
        seen_paths.add(path)
        seen_storages.add(choice.storage_id)
        result.append((storage, MountChoice(choice.storage_id, path, choice.read_only)))
    return result


# -- starting ----------------------------------------------------------------------------------
def reserve_start(db: Session, context: AppContext, user: User, env: Environment) -> None:
    """Check the user's limit, take a server-wide start slot and mark the environment pending.

    A new environment (``create``: pending in ``db`` with its mounts and audit event) is inserted
    once, already pending, with its slot; a refusal leaves nothing. The reservations of concurrent
    starts are written together (:class:`~cmbcluster.db.engine.GroupCommit`, by
    :func:`write_reservations`): one transaction for several starts, serialised with every other
    replica's by the database's one writer (SQLite) or an advisory lock (PostgreSQL). ``db``'s
    transaction ends here; ``env`` is then as the database has it."""
    if env.status not in STARTABLE_STATUSES:
        if env.desired_state == "stopped":
            raise Conflict(f"{env.name!r} is stopping: start it again once it has stopped")
        raise Conflict(f"{env.name!r} is already {env.status}")
    if db.dirty or db.deleted:  # they would be lost below: a caller's mistake, not a user's
        raise RuntimeError("reserve_start() needs a session without unsaved changes but the new environment's")
    now = utcnow()
    changes = {
        "desired_state": "running", "status": "pending", "status_message": "waiting to start", "started_at": now,
        "stopped_at": None, "warned_at": None, "url": None, "last_activity_at": now,
        "shutdown_at": _shutdown_at(context, user, now),
    }  # fmt: skip
    created = list(db.new) if env in db.new else []
    for name, value in changes.items() if created else ():
        setattr(env, name, value)
    reservation = Reservation(
        user_id=user.id, environment_id=env.id, name=env.name, changes=changes,
        new_rows=[(type(row).__table__, _column_values(row)) for row in created],
        expires_at=now + dt.timedelta(seconds=context.config.core.start_timeout_seconds),
    )  # fmt: skip
    # No transaction held while waiting; what was pending is written by the batch. A new
    # environment's rows leave the session and its read ends: what it loaded (the user, the
    # application) stays loaded for the launch, where a rollback expired it and the launch read it
    # again. An existing environment's record is expired: the batch changes it.
    if created:
        for row in created:
            if row in db:  # not expunged already with its environment (its mounts are)
                db.expunge(row)
        db.commit()
    else:
        db.rollback()
    context.start_reservations.submit(reservation, functools.partial(write_reservations, context))
    if reservation.refusal is not None:
        raise reservation.refusal
    # Written: this session's again, as if loaded (what the database filled in loads on use); all
    # first, as adding the environment adds its mounts (pending, were they still new).
    written = [row for row in created if None not in inspect(row).mapper.primary_key_from_instance(row)]
    for row in written:
        make_transient_to_detached(row)
    db.add_all(written)


@dataclass(eq=False)
class Reservation:
    """A start to reserve (see :func:`write_reservations`)."""

    user_id: str
    environment_id: str
    name: str
    changes: dict[str, Any]  #: the environment's columns a start sets
    new_rows: list[tuple[Table, dict[str, Any]]]  #: a new environment's rows to insert; empty: it exists
    expires_at: dt.datetime  #: of its start slot
    refusal: Exception | None = None  #: why it was not reserved (a limit, or the database's refusal)


def _column_values(row: Any) -> dict[str, Any]:
    """The columns set on a new ORM object, by column key (the database's defaults fill the rest)."""
    state = inspect(row)
    return {prop.columns[0].key: state.dict[prop.key] for prop in state.mapper.column_attrs if prop.key in state.dict}


def write_reservations(context: AppContext, batch: list[Reservation]) -> None:
    """Reserve the starts of ``batch`` in one transaction, in order: each takes a slot unless its
    environment is already starting, its user has ``max_environments_per_user`` active, or
    ``max_concurrent_starts`` slots are taken (expired ones, of a crashed server's starts, freed
    first); a refused one gets its ``refusal`` and writes nothing. When the database refuses the
    batch's rows (a bucket to mount deleted meanwhile), each start is written alone, so that only
    its own fails."""
    try:
        _write_reservations(context, batch)
    except IntegrityError:
        if len(batch) == 1:
            raise
        for reservation in batch:
            reservation.refusal = None
            try:
                _write_reservations(context, [reservation])
            except IntegrityError as exc:
                reservation.refusal = exc


def _write_reservations(context: AppContext, batch: list[Reservation]) -> None:
    core = context.config.core
    now = utcnow()
    ids = [r.environment_id for r in batch]
    with context.sessions() as db, one_writer(db):
        begin_serialised(db, START_LOCK)  # the counts read below stay true until the commit
        existing = [r.environment_id for r in batch if not r.new_rows]
        if existing:  # a new one has no slot; these may, expired, from a crashed server
            db.execute(_DELETE_EXPIRED_SLOTS_OF, {"environment_ids": existing, "now": now})
        taken = set(db.execute(_SLOTS_OF, {"environment_ids": ids}).scalars())
        users = sorted({r.user_id for r in batch})
        active: dict[str, int] = dict(db.execute(_ACTIVE_OF_OTHERS, {"user_ids": users, "environment_ids": ids}).all())
        slots = db.execute(_SLOTS_TAKEN).scalar_one()
        rows: dict[Table, list[dict[str, Any]]] = {}
        reserved = 0
        swept, wait = False, None  # expired slots freed; the Retry-After of a full server
        for r in batch:
            if r.environment_id in taken:
                r.refusal = Conflict(f"{r.name!r} is already starting")
                continue
            if active.get(r.user_id, 0) >= core.max_environments_per_user:
                r.refusal = Conflict(
                    f"you already have {active[r.user_id]} running or starting environments (the limit is "
                    f"{core.max_environments_per_user}); stop one first"
                )
                continue
            if (
                slots >= core.max_concurrent_starts and not swept
            ):  # full, unless with the slots of starts that never ended
                delete_expired_slots(db, now)
                slots = db.execute(_SLOTS_TAKEN).scalar_one() + reserved  # this batch's are not written yet
                swept = True
            if slots >= core.max_concurrent_starts:
                if wait is None:
                    oldest = db.execute(select(func.min(StartSlot.acquired_at))).scalar_one()
                    wait = 5 if oldest is None else max(1, min(60, int(30 - (now - oldest).total_seconds())))
                r.refusal = LimitExceeded(
                    f"{core.max_concurrent_starts} environments are starting on this server; try again shortly",
                    retry_after=wait,
                )
                continue
            if not r.new_rows:
                changed = db.execute(
                    update_statement(Environment)
                    .where(Environment.id == r.environment_id, Environment.status.in_(STARTABLE_STATUSES))
                    .values(**r.changes)
                )
                if changed.rowcount == 0:  # type: ignore[attr-defined]  # a CursorResult
                    status = db.execute(select(Environment.status).where(Environment.id == r.environment_id))
                    found = status.scalar_one_or_none()
                    r.refusal = (NotFound(f"environment {r.environment_id} not found") if found is None
                                 else Conflict(f"{r.name!r} is already {found}"))  # fmt: skip
                    continue
            for table, values in r.new_rows:
                rows.setdefault(table, []).append(values)
            slot = {"environment_id": r.environment_id, "acquired_at": now, "expires_at": r.expires_at}
            rows.setdefault(StartSlot.__table__, []).append(slot)  # type: ignore[arg-type]
            taken.add(r.environment_id)
            active[r.user_id] = active.get(r.user_id, 0) + 1
            slots += 1
            reserved += 1
        # parents before children (of these few tables: sorting the whole schema cost more)
        for table in sort_tables(rows):
            by_keys: dict[frozenset[str], list[dict[str, Any]]] = {}
            for values in rows.get(table, []):  # one INSERT of many rows per set of columns
                by_keys.setdefault(frozenset(values), []).append(values)
            for same in by_keys.values():
                db.execute(insert(table), same)
        db.commit()


#: The PostgreSQL advisory lock that serialises start reservations (new accounts take 4242002)
START_LOCK = 4242001


# Built once: a burst of starts runs these for every batch (building a statement costs more than
# running it on SQLite).
_ACTIVE_BY_USER = (
    select(Environment.user_id, func.count())
    .where(Environment.status.in_(ACTIVE_STATUSES))
    .group_by(Environment.user_id)
)
_SLOTS_TAKEN = select(func.count()).select_from(StartSlot)
_ACTIVE_OF_OTHERS = _ACTIVE_BY_USER.where(
    Environment.user_id.in_(bindparam("user_ids", expanding=True)),
    Environment.id.not_in(bindparam("environment_ids", expanding=True)),
)
_SLOTS_OF = select(StartSlot.environment_id).where(
    StartSlot.environment_id.in_(bindparam("environment_ids", expanding=True))
)
_DELETE_EXPIRED_SLOTS_OF = delete(StartSlot).where(
    StartSlot.environment_id.in_(bindparam("environment_ids", expanding=True)), StartSlot.expires_at < bindparam("now")
)


def _shutdown_at(context: AppContext, user: User, started: dt.datetime) -> dt.datetime | None:
    minutes = user.max_uptime_minutes
    if minutes is None:
        minutes = int(context.config.core.max_uptime_hours * 60)
    return started + dt.timedelta(minutes=minutes) if minutes else None


#: A user's variables and secret files as a start gets them (user_settings.settings_at_start), or
#: why they could not be read, raised where build_spec would have read them.
Settings = tuple[dict[str, str], dict[str, bytes]] | CmbclusterError


def _read_settings(db: Session, context: AppContext, user_id: str) -> Settings:
    try:
        return user_settings.settings_at_start(
            db, user_id, variables_sealer=context.sealer(user_settings.ENV_VAR_PURPOSE),
            files_sealer=context.sealer(user_settings.SECRET_FILE_PURPOSE),
        )  # fmt: skip
    except CmbclusterError as exc:  # the start fails with it, as when read in build_spec
        return exc


def build_spec(
    db: Session, context: AppContext, env: Environment, *, settings: Settings | None = None
) -> EnvironmentSpec:
    """Everything the compute backend needs (blocking: buckets and identities are cloud calls);
    ``settings``: the user's, read already (else read here)."""
    user = db.get(User, env.user_id)
    assert user is not None
    owner = UserRef(id=user.id, email=user.email)
    identity = context.infra.ensure_user_identity(owner, namespace=context.namespace)
    if identity is not None:
        storages.sync_identity_access(db, context, user)
    volumes = []
    for mount in env.mounts:
        storage = db.get(Storage, mount.storage_id)
        if storage is None:
            raise NotFound(
                "a bucket this environment mounts was deleted: edit the environment's buckets, then start it again"
            )
        if storage.status != "active":
            raise Conflict(f"bucket {storage.display_name!r} is {storage.status} and cannot be mounted")
        if identity is not None:
            context.storage.ensure_bucket_access(storage.bucket_name, identity)
        volumes.append(
            mount_bucket(
                context.storage, bucket=storage.bucket_name, mount_path=mount.mount_path, user=owner,
                environment_id=env.id, identity=identity, namespace=context.namespace, read_only=mount.read_only,
            )
        )  # fmt: skip
    application = env.application_row
    if settings is None:
        settings = _read_settings(db, context, user.id)
    if isinstance(settings, CmbclusterError):
        raise settings
    variables, secret_files = settings
    variables.update(env.env)  # the environment's own variables win over the user's defaults
    return EnvironmentSpec(
        environment_id=env.id,
        user=owner,
        image=application.image,
        command=tuple(application.command),
        port=application.port,
        working_dir=application.working_dir,
        env=variables,
        secret_files=secret_files,
        resources=Resources(cpu=env.cpu, memory_mib=env.memory_mib),
        volumes=tuple(volumes),
        identity=identity,
        labels={"cmbcluster.io/application": application.slug},
    )


def launch(
    db: Session, context: AppContext, env: Environment, *, earlier_status: str | None = None,
    settings: Settings | None = None,
) -> None:  # fmt: skip
    """Hand a reserved environment to the compute backend (blocking). Failures become status
    ``failed`` with the reason, and free the start slot. ``earlier_status``: what an environment
    started again was (None for a new one); what its earlier run left is removed first.
    ``settings``: the user's, read already (see build_spec)."""
    try:
        spec = build_spec(db, context, env, settings=settings)
        db.commit()  # no connection held during the cluster calls, which may take seconds
        if earlier_status is not None:
            _remove_earlier_run(context, env.id, earlier_status)
        status = context.compute.start(spec)
    except CmbclusterError as exc:
        mark_failed(db, env, exc.message)
        context.progress.notify(env.id)
        return
    except Exception as exc:  # a provider bug must not leave the environment pending forever
        log.exception("starting environment %s failed", env.id)
        mark_failed(db, env, f"the compute backend failed: {type(exc).__name__}")
        context.progress.notify(env.id)
        return
    # A stop or delete sent meanwhile (another request) made its backend call perhaps before there
    # was anything to stop: what was just started is stopped or deleted here, once it exists.
    intent = db.execute(_DESIRED_STATE, {"environment_id": env.id}).scalar_one_or_none()
    if intent != "running":
        _undo_start(db, context, env, deleted=intent is None)
        return
    if status.phase == EnvironmentPhase.PENDING and env.status == "pending":
        # Still waiting for the cluster, as recorded: the progress hub shows what the backend says
        # and records the next change. Skipping this write spares a burst of starts one turn each
        # at the database's write lock.
        context.progress.notify(env.id)
        return
    environment_id = env.id  # a rollback expires the object, and its row may be gone
    try:
        apply_status(db, env, status)
        db.commit()
    except CHANGED_MEANWHILE:  # deleted since the check above
        db.rollback()
        # Its delete's backend call may have come before this start's: what was started goes too.
        if db.execute(_DESIRED_STATE, {"environment_id": environment_id}).scalar_one_or_none() is None:
            context.compute.delete(environment_id)
        db.rollback()
    context.progress.notify(environment_id)


def _remove_earlier_run(context: AppContext, environment_id: str, earlier_status: str) -> None:
    """Stop what an earlier run left, which a backend's start would otherwise take as its own (its
    starts adopt what exists, so that one interrupted can be sent again): a failed start's objects
    (on Kubernetes, the Secret made before the cluster refused the pod, with the variables of then),
    or an application that ended by itself (its exited pod: the start would be over at once). Kept
    until now, they show the user why it failed or ended (its logs). A stop already under way is
    left to finish: the backend's start waits for it."""
    if earlier_status == "failed" or context.compute.status(environment_id).phase not in (
        EnvironmentPhase.MISSING,
        EnvironmentPhase.STOPPING,
    ):
        context.compute.stop(environment_id)


_DESIRED_STATE = select(Environment.desired_state).where(Environment.id == bindparam("environment_id"))


def _undo_start(db: Session, context: AppContext, env: Environment, *, deleted: bool) -> None:
    """Take back a start that a stop or delete overtook while the backend was starting it. The
    stop's own record wins: it is completed here only when not written yet."""
    environment_id = env.id  # read once: the object may be expired and detached below
    if not deleted:
        context.compute.stop(environment_id)
        deleted = db.get(Environment, environment_id, populate_existing=True) is None  # deleted since the check
    if not deleted:
        if env.status != "stopped":
            env.status, env.status_message, env.url = "stopped", "stopped before it finished starting", None
            env.stopped_at = utcnow()
        release_start_slot(db, environment_id)
        try:
            db.commit()
        except StaleDataError:  # deleted in the meantime after all
            deleted = True
    if deleted:
        if env in db:
            db.expunge(env)  # its row is gone: nothing of it may be written
        db.rollback()
        context.compute.delete(environment_id)
    context.progress.notify(environment_id)


def mark_failed(db: Session, env: Environment, message: str) -> None:
    env.status = "failed"
    env.status_message = message
    env.stopped_at = utcnow()
    release_start_slot(db, env.id)
    activity(db, user_id=env.user_id, kind="environment_failed", environment_id=env.id, message=message)
    db.commit()


# -- stopping and deleting -----------------------------------------------------------------------
def stop(db: Session, context: AppContext, env: Environment, *, actor_id: str | None, reason: str) -> None:
    """Stop (blocking). The choices stay; ``start`` runs the same environment again.

    The intent is recorded first: while the backend stops it, nothing reads its going away as a
    failure, and a stop that a crash interrupts is finished by the reconcile loop.

    A start reserved after the intent was recorded (another request: possible when the environment
    was stopped or failed already) came later and wins: the stop then writes nothing over the
    start's record (no "stopped" message, stop time or released start slot on a starting
    environment), and ``env`` shows the start. Its backend call, if it came after the start's,
    stopped what the start began: the backend's report is then recorded as for any other exit."""
    _record_stop_intent(db, env)
    context.compute.stop(env.id)
    environment_id = env.id
    if not _locked_as_recorded(db, environment_id):  # deleted meanwhile (another request): nothing of it runs
        context.progress.notify(environment_id)
        raise NotFound(f"environment {environment_id} was deleted while it was being stopped")
    overtaken = env.desired_state != "stopped"
    if not overtaken:
        env.status = "stopped"
        env.status_message = reason
        env.url = None
        env.stopped_at = utcnow()
        release_start_slot(db, env.id)
        activity(db, user_id=env.user_id, kind="environment_stopped", environment_id=env.id, reason=reason)
    extra = {"overtaken_by_a_start": True} if overtaken else {}
    audit(db, actor_id=actor_id, action="environment.stopped", target_type="environment", target_id=env.id,
          name=env.name, owner_id=env.user_id, reason=reason, **extra)  # fmt: skip
    db.commit()
    context.progress.notify(environment_id)


#: The environment as recorded now, read again into the session's object (which the caller then changes).
_CURRENT = (
    select(Environment).where(Environment.id == bindparam("environment_id")).execution_options(populate_existing=True)
)


def _locked_as_recorded(db: Session, environment_id: str) -> bool:
    """End the read transaction, begin a locked one (SQLite: the whole database; elsewhere the row,
    FOR UPDATE, which SQLite's dialect omits) and read the environment again into the session's
    object: a check made on it then holds until the commit. False, rolled back, when it was deleted."""
    db.commit()
    begin_locked(db)
    if db.execute(_CURRENT.with_for_update(), {"environment_id": environment_id}).scalar_one_or_none() is None:
        db.rollback()
        return False
    return True


_STOP_INTENT = (
    update_statement(Environment)
    .where(Environment.id == bindparam("environment_id"))
    .values(desired_state="stopped")
    .execution_options(synchronize_session=False)
)


def _record_stop_intent(db: Session, env: Environment) -> None:
    """Record that the environment must not run, before any backend call: a start being handed to
    the backend meanwhile then takes itself back (see :func:`launch`).

    Written whatever this session read: a start reserved since then (another request) set it to
    running, and the ORM skips assigning a value it believes is already there. Read back after,
    so that what follows is compared with the record as it is."""
    environment_id = env.id
    if db.execute(_STOP_INTENT, {"environment_id": environment_id}).rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        raise NotFound(f"environment {environment_id} not found")
    db.commit()
    if db.get(Environment, environment_id, populate_existing=True) is None:  # deleted since (another request)
        raise NotFound(f"environment {environment_id} not found")


def remove(db: Session, context: AppContext, env: Environment, *, actor_id: str | None) -> None:
    """Delete everything the backend keeps for the environment, then the record (blocking)."""
    _record_stop_intent(db, env)
    context.compute.delete(env.id)
    audit(db, actor_id=actor_id, action="environment.deleted", target_type="environment", target_id=env.id,
          name=env.name, owner_id=env.user_id)  # fmt: skip
    db.delete(env)
    db.commit()
    context.progress.notify(env.id)


def stop_with_control_plane(context: AppContext) -> list[str]:
    """When the control plane shuts down, stop the environments of a backend whose environments
    run only while it does (the embedded default's processes); their records say why, and every
    choice is kept for the next start. Idempotent; returns the ids stopped."""
    if not context.compute.stops_with_control_plane:
        return []
    reason = "stopped with the server; start it again"
    stopped: list[str] = []
    with context.sessions() as db:
        active = db.execute(
            select(Environment).where(
                Environment.backend == context.config.compute.name, Environment.status.in_(ACTIVE_STATUSES)
            )
        ).scalars()
        envs = list(active)
        # Their intents first (a crash meanwhile leaves stops the next start-up finishes), then every
        # process stopped at once: one by one, applications slow to exit took the grace of each
        # (5 s) in turn, 48 s for nine, past a container runtime's patience (an outsider's trial).
        for env in envs:
            db.execute(_STOP_INTENT, {"environment_id": env.id})
        db.commit()
        stop_in_backend(context, [env.id for env in envs])
        for env in envs:  # recorded, each: its backend call now finds it stopped already
            try:
                stop(db, context, env, actor_id=None, reason=reason)
                stopped.append(env.id)
            except Exception:  # one that cannot be stopped must not keep the others running
                db.rollback()
                log.exception("stopping environment %s at shutdown failed", env.id)
    running = (EnvironmentPhase.PENDING, EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
    # and anything the records do not know of
    unknown = [status.environment_id for status in context.compute.list_managed() if status.phase in running]
    stop_in_backend(context, unknown)
    stopped += unknown
    if stopped:
        log.info("stopped %d environments with the server", len(stopped), extra={"environments": stopped})
    return stopped


def stop_in_backend(context: AppContext, environment_ids: Sequence[str]) -> None:
    """Stop these environments in the backend at once, each in a thread (a failure is logged): an
    application slow to exit holds up only its own stop (at shutdown, and the reconcile loop's)."""
    if not environment_ids:
        return

    def one(environment_id: str) -> None:
        try:
            context.compute.stop(environment_id)
        except Exception:
            log.exception("stopping environment %s failed", environment_id)

    with concurrent.futures.ThreadPoolExecutor(min(len(environment_ids), _STOPS_AT_ONCE)) as pool:
        list(pool.map(one, environment_ids))


#: Environments :func:`stop_in_backend` stops at once.
_STOPS_AT_ONCE = 32


#: How much later one "extend" moves an environment's automatic stop.
EXTENSION_STEP = dt.timedelta(hours=1)


def extend(db: Session, context: AppContext, user: User, env: Environment) -> None:
    """Postpone the automatic stop of a running environment: its idle timer starts again, and its
    maximum-uptime stop moves an hour later, never past its maximum uptime plus the operator's
    CMBCLUSTER_MAX_EXTENSION_HOURS. Conflict when it is not running, or when only the uptime
    stop is near and it is already as late as allowed."""
    if env.status not in ACTIVE_STATUSES:
        raise Conflict(f"{env.name!r} is {env.status}: only a running environment can be extended")
    now = utcnow()
    limit = extension_limit(context, env.started_at, user.max_uptime_minutes)
    extended_to = env.shutdown_at
    if env.shutdown_at is not None and limit is not None:
        extended_to = min(max(env.shutdown_at, now) + EXTENSION_STEP, limit)
        idle_at = idle_shutdown_at(context, env)
        if extended_to <= env.shutdown_at and (idle_at is None or env.shutdown_at <= idle_at):
            hours = context.config.core.max_extension_hours
            raise Conflict(
                f"{env.name!r} already runs as long as this server allows ({_hours(hours)} past its maximum "
                "uptime): save your work; it stops at the time shown"
            )
    env.shutdown_at = extended_to
    env.last_activity_at = now
    env.warned_at = None
    activity(db, user_id=env.user_id, kind="environment_extended", environment_id=env.id,
             shutdown_at=extended_to.isoformat() if extended_to else None)  # fmt: skip
    db.commit()


def _hours(hours: float) -> str:
    return f"{hours:g} hour{'' if hours == 1 else 's'}"


@dataclass(frozen=True)
class EnvironmentChange:
    """What may change on a stopped environment; None keeps a field as it is."""

    name: str | None = None
    preset: str | None = None
    cpu: float | None = None
    memory_mib: int | None = None
    mounts: Sequence[MountChoice] | None = None
    env: dict[str, str] | None = None


def update(db: Session, context: AppContext, user: User, env: Environment, change: EnvironmentChange) -> None:
    """Change a stopped (or failed) environment's name, size, buckets or variables: its next start
    uses them. Conflict while it runs (stop it first).

    Checked and written in one locked transaction, as a start's reservation is: an edit sent while
    the environment started was answered 200 and shown, while the start ran the choices of before
    (found by an outsider's trial: a notebook writing into the bucket the page said it had left)."""
    environment_id = env.id
    if not _locked_as_recorded(db, environment_id):
        raise NotFound(f"environment {environment_id} not found")
    if env.status not in STARTABLE_STATUSES:
        db.rollback()
        raise Conflict(f"{env.name!r} is {env.status}: stop it before changing its name, size, buckets or variables")
    core = context.config.core
    changed: dict[str, Any] = {}
    if change.name is not None:
        changed["name"] = env.name = check_display_name(change.name, what="an environment name", limit=MAX_NAME)
    if change.preset is not None or change.cpu is not None or change.memory_mib is not None:
        preset, cpu, memory = resolve_resources(
            change.preset, change.cpu, change.memory_mib, max_cpu=core.max_cpu, max_memory_mib=core.max_memory_mib
        )
        env.preset, env.cpu, env.memory_mib = preset, cpu, memory
        changed.update(preset=preset, cpu=cpu, memory_mib=memory)
    if change.env is not None:
        env.env = _validate_env(change.env)
        changed["env"] = sorted(env.env)
    if change.mounts is not None:
        mounts = _validate_mounts(db, user, change.mounts)
        env.mounts.clear()
        db.flush()
        for storage, choice in mounts:
            env.mounts.append(
                EnvironmentStorage(
                    environment_id=env.id, storage_id=storage.id, mount_path=choice.mount_path,
                    read_only=choice.read_only,
                )
            )  # fmt: skip
        changed["mounts"] = [storage.display_name for storage, _ in mounts]
    if changed:
        detail = {"name": env.name, **changed}
        audit(db, actor_id=user.id, action="environment.changed", target_type="environment", target_id=env.id,
              **detail)  # fmt: skip
    db.commit()


def open_for_traffic(db: Session, user: Owner, environment_id: str) -> Row[str, str, str | None, dt.datetime | None]:
    """The caller's own running environment (its id, status and url), before any traffic reaches
    it: the ingress's ``authorize`` check on Kubernetes and the control plane's own proxy ask the
    same question. NotFound for anyone else's environment and for one that is not running; counts
    as activity.

    Asked for every request of an application's traffic (a JupyterLab page makes a hundred): one
    indexed read of plain columns. The environment is loaded as an object only to record activity,
    at most every :data:`ACTIVITY_WRITE_INTERVAL` (it was loaded with its application and mounts
    for every request: three queries, half the proxy's CPU per request)."""
    found = db.connection().execute(_FOR_TRAFFIC, {"environment_id": environment_id, "user_id": user.id}).one_or_none()
    if found is None:
        raise NotFound(f"environment {environment_id} not found")
    if found.status != "running":
        raise NotFound(f"environment {environment_id} is not running")
    if _activity_due(found.last_activity_at, utcnow()):
        env = db.get(Environment, environment_id)
        if env is not None:  # deleted since the read: its traffic ends with it
            touch(db, env, kind="traffic")
    return found


_FOR_TRAFFIC = select(Environment.id, Environment.status, Environment.url, Environment.last_activity_at).where(
    Environment.id == bindparam("environment_id"), Environment.user_id == bindparam("user_id")
)


def _activity_due(last_activity_at: dt.datetime | None, now: dt.datetime) -> bool:
    return last_activity_at is None or now - last_activity_at >= ACTIVITY_WRITE_INTERVAL


def touch(db: Session, env: Environment, *, kind: str = "heartbeat") -> None:
    """Record activity (heartbeats, traffic) so idle culling spares the environment."""
    now = utcnow()
    if _activity_due(env.last_activity_at, now):
        env.last_activity_at = now
        env.warned_at = (
            None if env.shutdown_at is None or env.shutdown_at - now > dt.timedelta(hours=1) else env.warned_at
        )
        activity(db, user_id=env.user_id, kind=kind, environment_id=env.id)
        db.commit()


class _Timing(Protocol):
    status: str
    shutdown_at: dt.datetime | None
    last_activity_at: dt.datetime | None
    started_at: dt.datetime | None


def idle_shutdown_at(context: AppContext, env: _Timing) -> dt.datetime | None:
    minutes = context.config.core.idle_timeout_minutes
    if not minutes or env.status not in ACTIVE_STATUSES:
        return None
    since = env.last_activity_at or env.started_at
    return since + dt.timedelta(minutes=minutes) if since else None


def next_shutdown(context: AppContext, env: _Timing) -> dt.datetime | None:
    """The earlier of the maximum-uptime and the idle deadlines, for running environments."""
    if env.status not in ACTIVE_STATUSES:
        return None
    deadlines = [d for d in (env.shutdown_at, idle_shutdown_at(context, env)) if d is not None]
    return min(deadlines) if deadlines else None


# -- the read model ------------------------------------------------------------------------------
_VIEW_COLUMNS = (
    Environment.id, Environment.name, Environment.status, Environment.status_message, Environment.desired_state,
    Environment.url, Environment.preset, Environment.cpu, Environment.memory_mib, Environment.env,
    Environment.created_at, Environment.started_at, Environment.stopped_at, Environment.last_activity_at,
    Environment.shutdown_at, Environment.warned_at,
    Application.id.label("app_id"), Application.slug.label("app_slug"), Application.name.label("app_name"),
    User.id.label("owner_id"), User.email.label("owner_email"), User.name.label("owner_name"),
    User.max_uptime_minutes.label("owner_max_uptime"),
)  # fmt: skip


# Built once: constructing the statement costs as much as running it on SQLite.
_VIEW_BASE = (
    select(*_VIEW_COLUMNS, EnvironmentStorage.storage_id, EnvironmentStorage.mount_path,
           EnvironmentStorage.read_only, Storage.display_name.label("storage_name"))
    .join(Application, Application.id == Environment.application_id)
    .join(User, User.id == Environment.user_id)
    .outerjoin(EnvironmentStorage, EnvironmentStorage.environment_id == Environment.id)
    .outerjoin(Storage, Storage.id == EnvironmentStorage.storage_id)
)  # fmt: skip
# The rows as named tuples: a Row finds a column by name only after a failed attribute lookup (about
# 0.4 us each, 250 a list: most of the time the list spent building its answer); a named tuple's
# fields are plain descriptors.
_view_row: Callable[[Iterable[Any]], Any] = namedtuple(  # type: ignore[attr-defined]  # fields from the query
    "ViewRow", _VIEW_BASE.selected_columns.keys()
)._make
_VIEW_QUERY = _VIEW_BASE.where(Environment.user_id == bindparam("user_id")).order_by(
    Environment.created_at, Environment.id, EnvironmentStorage.mount_path
)
_VIEW_ONE_QUERY = _VIEW_QUERY.where(Environment.id == bindparam("environment_id"))


def uptime_minutes(context: AppContext, user_max_uptime: int | None) -> int:
    """The maximum uptime of a user's environments in minutes (0: never): theirs, or the server's."""
    if user_max_uptime is not None:
        return user_max_uptime
    return int(context.config.core.max_uptime_hours * 60)


def extension_limit(
    context: AppContext, started_at: dt.datetime | None, user_max_uptime: int | None
) -> dt.datetime | None:
    """The latest an environment started at ``started_at`` may run once extended: its maximum
    uptime plus the operator's CMBCLUSTER_MAX_EXTENSION_HOURS. None without a maximum uptime."""
    minutes = uptime_minutes(context, user_max_uptime)
    if not minutes or started_at is None:
        return None
    return started_at + dt.timedelta(minutes=minutes) + dt.timedelta(hours=context.config.core.max_extension_hours)


def _view(context: AppContext, row: Any) -> dict[str, Any]:
    active = row.status in ACTIVE_STATUSES
    # A stop under way (its application may take seconds to exit) shows as such, not as running.
    shown = "stopping" if active and row.desired_state == "stopped" else row.status
    idle_at = idle_shutdown_at(context, row)
    uptime_at = row.shutdown_at if active else None
    limit = extension_limit(context, row.started_at, row.owner_max_uptime) if active else None
    return {
        "id": row.id, "name": row.name, "status": shown, "status_message": row.status_message,
        "desired_state": row.desired_state, "url": row.url, "preset": row.preset, "cpu": row.cpu,
        "memory_mib": row.memory_mib, "env": row.env,
        "application": {"id": row.app_id, "slug": row.app_slug, "name": row.app_name},
        "owner": {"id": row.owner_id, "email": row.owner_email, "name": row.owner_name},
        "mounts": [],
        "created_at": row.created_at, "started_at": row.started_at, "stopped_at": row.stopped_at,
        "last_activity_at": row.last_activity_at, "shutdown_at": next_shutdown(context, row),
        "idle_shutdown_at": idle_at, "uptime_shutdown_at": uptime_at,
        "extendable": bool(active and (idle_at is not None or (uptime_at is not None and limit is not None
                                                               and uptime_at < limit))),
        "shutdown_warning": active and row.warned_at is not None,
    }  # fmt: skip


def _collect(context: AppContext, rows: Iterable[Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for row in map(_view_row, rows):  # Core rows: no identity map, no ORM instances
        if not result or result[-1]["id"] != row.id:
            result.append(_view(context, row))
        if row.storage_id is not None:
            result[-1]["mounts"].append(
                {"storage_id": row.storage_id, "display_name": row.storage_name, "mount_path": row.mount_path,
                 "read_only": row.read_only}
            )  # fmt: skip
    return result


def views(
    connection: Connection, context: AppContext, user_id: str, environment_id: str | None = None
) -> list[dict[str, Any]]:
    """A user's environments as the API shows them, from one plain query (no ORM objects).

    The list is the most requested page of the control plane, so it is built from rows
    directly; every route that answers with an environment uses this same function.
    """
    query = _VIEW_QUERY if environment_id is None else _VIEW_ONE_QUERY
    params = {"user_id": user_id, "environment_id": environment_id}
    return _collect(context, connection.execute(query, params))


def view(db: Session, context: AppContext, user_id: str, environment_id: str) -> dict[str, Any]:
    found = views(db.connection(), context, user_id, environment_id)
    if not found:
        raise NotFound(f"environment {environment_id} not found")
    return found[0]


def limits(context: AppContext, user: Owner, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a user may run, for the page that launches (shown before a launch is refused)."""
    core = context.config.core
    return {
        "max_active": core.max_environments_per_user,
        "active": sum(1 for item in items if item["status"] in ACTIVE_STATUSES),
        "idle_timeout_minutes": core.idle_timeout_minutes,
        "max_uptime_minutes": uptime_minutes(context, user.max_uptime_minutes),
        "max_extension_minutes": int(core.max_extension_hours * 60),
        "shutdown_warning_minutes": core.shutdown_warning_minutes,
    }


# -- administrators' view ------------------------------------------------------------------------
def admin_views(
    db: Session, context: AppContext, *, status: str | None = None, query: str | None = None,
    page: int = 1, page_size: int = 50,
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Every user's environments, newest first (with their owners), a page at a time; and the total."""
    ids = select(Environment.id).join(User, User.id == Environment.user_id)
    if status:
        ids = ids.where(Environment.status == status)
    if query and query.strip():
        escaped = query.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        ids = ids.where(
            Environment.name.ilike(pattern, escape="\\")
            | User.email.ilike(pattern, escape="\\")
            | User.name.ilike(pattern, escape="\\")
        )
    total = db.execute(select(func.count()).select_from(ids.subquery())).scalar_one()
    chosen = list(
        db.execute(
            ids.order_by(Environment.created_at.desc(), Environment.id).limit(page_size).offset((page - 1) * page_size)
        ).scalars()
    )
    if not chosen:
        return [], total
    rows = db.connection().execute(
        _VIEW_BASE.where(Environment.id.in_(chosen)).order_by(
            Environment.created_at.desc(), Environment.id, EnvironmentStorage.mount_path
        )
    )
    return _without_variables(_collect(context, rows)), total


def _without_variables(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Environments as administrators see them: without their variables, the owner's secrets (API
    keys), which no administrator's page shows, as it shows no user's Settings variables."""
    return [{**item, "env": {}} for item in items]


def get_any(db: Session, environment_id: str) -> Environment:
    """Any user's environment (administrators), or NotFound."""
    env = db.execute(
        select(Environment)
        .where(Environment.id == environment_id)
        .options(selectinload(Environment.application_row), selectinload(Environment.mounts))
    ).scalar_one_or_none()
    if env is None:
        raise NotFound(f"environment {environment_id} not found")
    return env


def admin_view(db: Session, context: AppContext, environment_id: str) -> dict[str, Any]:
    rows = db.connection().execute(_VIEW_BASE.where(Environment.id == environment_id))
    found = _without_variables(_collect(context, rows))
    if not found:
        raise NotFound(f"environment {environment_id} not found")
    return found[0]
