"""The application catalog (what users can start) and the resource presets environments use.

Admins manage the catalog through the API; :func:`seed_catalog` fills an empty catalog with
defaults that work on a fresh machine. :func:`resolve_resources` turns what a user asked for
(a preset, or custom CPU and memory) into checked numbers.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StringConstraints, model_validator
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cmbcluster.bodies import RequestBody
from cmbcluster.db.models import Application, Environment
from cmbcluster.errors import AlreadyExists, Conflict, InvalidRequest, NotFound
from cmbcluster.interfaces import ComputeBackend
from cmbcluster.services.audit import audit

log = logging.getLogger(__name__)


# -- resource presets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    name: str
    cpu: float
    memory_mib: int
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("light", 0.5, 1024, "Half a CPU and 1 GiB: browsing files, small scripts, light notebooks."),
        Preset("standard", 1.0, 2048, "One CPU and 2 GiB: everyday notebooks and apps."),
        Preset("heavy", 2.0, 8192, "Two CPUs and 8 GiB: larger data sets and heavier computations."),
    )
}
DEFAULT_PRESET = "standard"
#: The preset name reported for resources chosen by hand.
CUSTOM = "custom"
MIN_MEMORY_MIB = 128
#: CPU is requested in tenths of a core.
CPU_STEP = 0.1


def _format_cpu(cpu: float) -> str:
    return f"{cpu:g} CPU"


def resolve_resources(
    preset: str | None, cpu: float | None, memory_mib: int | None, *, max_cpu: float, max_memory_mib: int
) -> tuple[str, float, int]:
    """The checked ``(preset name or "custom", cpu, memory_mib)`` for what a user asked for.

    - a preset alone gives that preset's resources; with ``cpu`` and/or ``memory_mib`` as well,
      they must equal the preset's (otherwise ask for the ``custom`` preset);
    - ``cpu`` and ``memory_mib`` together (with no preset, or the ``custom`` preset) are custom
      resources: CPU a positive multiple of 0.1 core, memory at least 128 MiB, both within the
      server's limits;
    - nothing at all gives the default preset (``standard``).

    Raises :class:`~cmbcluster.errors.InvalidRequest` saying what is wrong.
    """
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float)):
        raise InvalidRequest("cpu must be a number of cores")
    if memory_mib is not None and (isinstance(memory_mib, bool) or not isinstance(memory_mib, int)):
        raise InvalidRequest("memory_mib must be a whole number of MiB")
    limits = f"this server allows at most {_format_cpu(max_cpu)} and {max_memory_mib} MiB"

    if preset is not None and preset != CUSTOM:
        chosen = PRESETS.get(preset)
        if chosen is None:
            known = ", ".join([*PRESETS, CUSTOM])
            raise InvalidRequest(f"unknown resource preset {preset!r}; choose one of: {known}")
        if (cpu is not None and not math.isclose(cpu, chosen.cpu)) or (
            memory_mib is not None and memory_mib != chosen.memory_mib
        ):
            raise InvalidRequest(
                f"the {chosen.name!r} preset means {_format_cpu(chosen.cpu)} and {chosen.memory_mib} MiB; "
                f"leave cpu and memory_mib out, or choose the {CUSTOM!r} preset to set them yourself"
            )
        if chosen.cpu > max_cpu or chosen.memory_mib > max_memory_mib:
            raise InvalidRequest(f"the {chosen.name!r} preset is too large: {limits}")
        return chosen.name, chosen.cpu, chosen.memory_mib

    if cpu is None and memory_mib is None:
        if preset == CUSTOM:
            raise InvalidRequest(f"the {CUSTOM!r} preset needs both cpu and memory_mib")
        return resolve_resources(DEFAULT_PRESET, None, None, max_cpu=max_cpu, max_memory_mib=max_memory_mib)
    if cpu is None or memory_mib is None:
        raise InvalidRequest("custom resources need both cpu and memory_mib (or choose a preset)")
    if not math.isfinite(cpu) or cpu <= 0:
        raise InvalidRequest("cpu must be a positive number of cores")
    tenths = cpu / CPU_STEP
    if abs(tenths - round(tenths)) > 1e-6:
        raise InvalidRequest(f"cpu must be a multiple of {CPU_STEP:g} core, not {cpu:g}")
    cpu = round(round(tenths) * CPU_STEP, 1)
    if cpu > max_cpu:
        raise InvalidRequest(f"{_format_cpu(cpu)} is too many: {limits}")
    if memory_mib < MIN_MEMORY_MIB:
        raise InvalidRequest(f"memory_mib must be at least {MIN_MEMORY_MIB} MiB")
    if memory_mib > max_memory_mib:
        raise InvalidRequest(f"{memory_mib} MiB is too much memory: {limits}")
    return CUSTOM, cpu, memory_mib


# -- validated application fields ------------------------------------------------------------------
SLUG_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: Slugs that would be mistaken for a route or an id.
RESERVED_SLUGS = frozenset({"presets"})
MAX_ICON_BYTES = 64 * 1024
MAX_ICON_URL_CHARS = 2048
ICON_DATA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml")
_ID_LIKE = re.compile(r"^[0-9a-f]{32}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_slug(value: str) -> str:
    if value in RESERVED_SLUGS:
        raise ValueError(f"{value!r} is reserved; choose another slug")
    if _ID_LIKE.match(value):
        raise ValueError("a slug must not look like an application id (32 hexadecimal characters)")
    return value


def _single_line(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must be a single line without control characters")
    return value


def _check_image(value: str) -> str:
    if any(char.isspace() for char in value):
        raise ValueError("an image reference contains no spaces (for example quay.io/jupyter/scipy-notebook:latest)")
    return value


def _check_argument(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a command argument cannot contain NUL characters")
    return value


def _check_working_dir(value: str) -> str:
    if value and (not value.startswith("/") or "\x00" in value):
        raise ValueError("the working directory is an absolute path inside the container, or empty")
    return value


def _check_tags(value: list[str]) -> list[str]:
    return list(dict.fromkeys(value))  # drop repeats, keep the order


def _check_icon(value: str) -> str:
    if not value:
        return value
    lowered = value[:40].lower()
    if lowered.startswith("data:"):
        if len(value.encode()) > MAX_ICON_BYTES:
            raise ValueError(f"an icon data: URL is limited to {MAX_ICON_BYTES // 1024} KiB; link a file instead")
        media_type = lowered[5:].split(";", 1)[0].split(",", 1)[0]
        if media_type not in ICON_DATA_TYPES or "," not in value:
            raise ValueError(f"an icon data: URL must hold an image ({', '.join(ICON_DATA_TYPES)})")
        return value
    if len(value) > MAX_ICON_URL_CHARS:
        raise ValueError(f"an icon URL is limited to {MAX_ICON_URL_CHARS} characters")
    if any(char.isspace() for char in value) or _CONTROL.search(value):
        raise ValueError("an icon URL contains no spaces or control characters")
    if lowered.startswith(("https://", "http://")) or (value.startswith("/") and not value.startswith("//")):
        return value
    raise ValueError("an icon is an http(s) URL, a path on this site (/...) or a data:image/... URL")


def _check_preset(value: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown preset {value!r}; choose one of: {', '.join(PRESETS)}")
    return value


Slug = Annotated[
    str, StringConstraints(pattern=SLUG_PATTERN, max_length=63), AfterValidator(_check_slug),
    Field(description="Unique, DNS-safe: lowercase letters, digits and inner hyphens", examples=["jupyterlab"]),
]  # fmt: skip
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(_single_line)
]
Summary = Annotated[str, StringConstraints(strip_whitespace=True, max_length=4000)]
Image = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=400), AfterValidator(_check_image),
    Field(description="Container image for Kubernetes", examples=["quay.io/jupyter/scipy-notebook"]),
]  # fmt: skip
Argument = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_check_argument)]
Command = Annotated[
    list[Argument],
    Field(
        max_length=64,
        description="Program and arguments. Substituted: {host}, {port}, {base_url} (the path it is served "
        "under), {token} (only the control plane's proxy sends it), {socket} (a Unix socket, where the backend "
        "offers one), {environment_id}",
    ),
]  # fmt: skip
Port = Annotated[int, Field(ge=1, le=65535, description="The port the application listens on")]
WorkingDir = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=400), AfterValidator(_check_working_dir)
]
Icon = Annotated[
    str, StringConstraints(strip_whitespace=True), AfterValidator(_check_icon),
    Field(description="An http(s) URL, a site path, or a data:image/... URL of at most 64 KiB"),
]  # fmt: skip
Category = Annotated[str, StringConstraints(strip_whitespace=True, max_length=60), AfterValidator(_single_line)]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40), AfterValidator(_single_line)
]
Tags = Annotated[list[Tag], Field(max_length=20), AfterValidator(_check_tags)]
PresetName = Annotated[str, AfterValidator(_check_preset), Field(description="One of the resource presets")]


class ApplicationCreate(RequestBody):
    """A new catalog entry."""

    slug: Slug
    name: Name
    summary: Summary = ""
    image: Image
    command: Command = Field(default_factory=list)
    port: Port = 8080
    working_dir: WorkingDir = ""
    icon: Icon = ""
    category: Category = ""
    tags: Tags = Field(default_factory=list)
    default_preset: PresetName = DEFAULT_PRESET
    active: bool = True


class ApplicationUpdate(RequestBody):
    """A partial change: only the fields sent change; none of them may be null."""

    slug: Slug | None = None
    name: Name | None = None
    summary: Summary | None = None
    image: Image | None = None
    command: Command | None = None
    port: Port | None = None
    working_dir: WorkingDir | None = None
    icon: Icon | None = None
    category: Category | None = None
    tags: Tags | None = None
    default_preset: PresetName | None = None
    active: bool | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> ApplicationUpdate:
        nulls = sorted(name for name in self.model_fields_set if getattr(self, name) is None)
        if nulls:
            raise ValueError(f"cannot be null: {', '.join(nulls)} (leave a field out to keep it)")
        return self

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


# -- catalog operations ----------------------------------------------------------------------------
def list_applications(db: Session, *, include_inactive: bool = False) -> list[Application]:
    query = select(Application).order_by(Application.name, Application.slug)
    if not include_inactive:
        query = query.where(Application.active.is_(True))
    return list(db.execute(query).scalars())


def get_application(db: Session, id_or_slug: str, *, include_inactive: bool = False) -> Application:
    """The application with that id or slug; NotFound (also for inactive ones unless included)."""
    app = db.execute(
        select(Application).where(or_(Application.id == id_or_slug, Application.slug == id_or_slug))
        # an id match wins over a slug match (slugs cannot look like ids, so this is a safeguard)
        .order_by((Application.id == id_or_slug).desc())
    ).scalars().first()  # fmt: skip
    if app is None or (not app.active and not include_inactive):
        raise NotFound(f"no application {id_or_slug!r} in the catalog")
    return app


def _slug_taken(db: Session, slug: str, *, except_id: str | None = None) -> bool:
    query = select(Application.id).where(Application.slug == slug)
    if except_id is not None:
        query = query.where(Application.id != except_id)
    return db.execute(query).first() is not None


def _audit_value(name: str, value: Any) -> Any:
    if name == "icon" and isinstance(value, str) and len(value) > 200:
        return f"<{len(value)} characters>"
    return value


def create_application(db: Session, data: ApplicationCreate, *, actor_id: str | None) -> Application:
    if _slug_taken(db, data.slug):
        raise AlreadyExists(f"an application with slug {data.slug!r} exists already")
    app = Application(**data.model_dump())
    db.add(app)
    _flush_unique_slug(db, data.slug)
    _audit_created(db, app, actor_id=actor_id)
    db.commit()
    return app


def _flush_unique_slug(db: Session, slug: str | None) -> None:
    """Flush; a slug taken meanwhile (a concurrent request) is AlreadyExists, not a 500."""
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise AlreadyExists(f"an application with slug {slug!r} exists already") from None


def _audit_created(db: Session, app: Application, *, actor_id: str | None, **detail: Any) -> None:
    audit(
        db, actor_id=actor_id, action="application.created", target_type="application", target_id=app.id,
        slug=app.slug, name=app.name, image=app.image, active=app.active, **detail,
    )  # fmt: skip


def update_application(db: Session, app: Application, data: ApplicationUpdate, *, actor_id: str | None) -> Application:
    changes = {name: value for name, value in data.changes().items() if getattr(app, name) != value}
    if not changes:
        return app
    if "slug" in changes and _slug_taken(db, changes["slug"], except_id=app.id):
        raise AlreadyExists(f"an application with slug {changes['slug']!r} exists already")
    before = {name: _audit_value(name, getattr(app, name)) for name in changes}
    for name, value in changes.items():
        setattr(app, name, value)
    _flush_unique_slug(db, changes.get("slug"))
    audit(
        db,
        actor_id=actor_id,
        action="application.updated",
        target_type="application",
        target_id=app.id,
        slug=app.slug,
        before=before,
        after={name: _audit_value(name, value) for name, value in changes.items()},
    )
    db.commit()
    return app


def environments_using(db: Session, application_id: str) -> int:
    count: int = db.execute(
        select(func.count()).select_from(Environment).where(Environment.application_id == application_id)
    ).scalar_one()
    return count


def delete_application(db: Session, app: Application, *, actor_id: str | None) -> None:
    """Delete an application no environment uses; Conflict (suggesting deactivation) otherwise."""
    in_use = environments_using(db, app.id)
    message = (
        f"application {app.slug!r} is used by {{n}} environment(s) and cannot be deleted; "
        'deactivate it instead (PATCH {{"active": false}}): existing environments keep working, '
        "no new ones can be created from it"
    )
    if in_use:
        raise Conflict(message.format(n=in_use), detail={"environments": in_use})
    app_id, slug, name = app.id, app.slug, app.name
    db.delete(app)
    audit(db, actor_id=actor_id, action="application.deleted", target_type="application", target_id=app_id,
          slug=slug, name=name)  # fmt: skip
    try:
        db.commit()
    except IntegrityError:  # an environment was created from it meanwhile
        db.rollback()
        raise Conflict(message.format(n="some")) from None


# -- the embedded default catalog ------------------------------------------------------------------
_FILES_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'%3E%3Cpath fill='%23f2b63c' "
    "d='M2 5a2 2 0 0 1 2-2h5l2 2h9a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H4a2 2 0 0 1-2-2z'/%3E%3C/svg%3E"
)
_JUPYTER_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'%3E%3Ccircle cx='12' cy='12' "
    "r='10' fill='none' stroke='%23f37726' stroke-width='2'/%3E%3Cpath fill='%23f37726' d='M4 10c4 4 12 4 16 0"
    "c-2 6-14 6-16 0z'/%3E%3C/svg%3E"
)


_STREAMLIT_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'%3E%3Cpath fill='%23ff4b4b' "
    "d='M12 3 2 20h20z'/%3E%3Cpath fill='%23fff' d='M12 9l-4 8h8z'/%3E%3C/svg%3E"
)
#: The example Streamlit application the embedded default's catalog runs.
STREAMLIT_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "streamlit_app.py"

#: JupyterLab on every backend: served under its base path (the control plane's proxy, or path
#: routing on Kubernetes), its token (JUPYTER_TOKEN, from the command's rules) sent by the proxy
#: only, on the port it was given and no other, accepting the proxy's or ingress's host name.
JUPYTER_COMMAND = (
    "jupyter-lab", "--no-browser", "--ip={host}", "--port={port}", "--ServerApp.port_retries=0",
    "--ServerApp.base_url={base_url}", "--ServerApp.allow_remote_access=True",
)  # fmt: skip
#: What earlier versions seeded: served at / whatever the routing, which path routing breaks.
EARLIER_JUPYTER_COMMAND = (
    "jupyter-lab", "--no-browser", "--ip={host}", "--port={port}", "--ServerApp.token=", "--ServerApp.base_url=/",
)  # fmt: skip
#: The image earlier versions seeded for JupyterLab (not one the project builds).
EARLIER_JUPYTER_IMAGE = "quay.io/jupyter/scipy-notebook"
#: Files in an image: the image's Python, on a port.
IMAGE_FILES_COMMAND = ("python", "-m", "http.server", "{port}", "--bind", "{host}")


def _earlier_default(slug: str, command: list[str], compute_backend: str) -> bool:
    """Whether ``command`` is what an earlier version seeded for ``slug`` (a catalog that still
    has it gets today's, see :func:`seed_catalog`)."""
    if slug == "jupyterlab":
        return tuple(command) == EARLIER_JUPYTER_COMMAND
    if slug == "files" and compute_backend == "local":  # a loopback port, the server's interpreter of the time
        return len(command) == 6 and command[1:] == list(IMAGE_FILES_COMMAND[1:])
    return False


def default_applications(compute_backend: str, environment_image: str) -> list[ApplicationCreate]:
    """The catalog a fresh server starts with; every entry works with the ``local`` backend as is,
    and in a cluster runs ``environment_image``, the image the project builds and `cmbcluster
    images push` pushes (:mod:`cmbcluster.images`).

    With the local backend the Files application runs this very Python interpreter, which is
    known to exist, on a Unix socket; in a container image (Kubernetes) it runs the image's
    ``python`` on a port. Streamlit has no token of its own and no longer listens on Unix
    sockets (1.50 and later): it listens on loopback. Every entry
    is active: where its program is missing, the catalog says so with the fix (the compute
    backend's ``check_command``) instead of hiding it. The Streamlit example runs on the local
    backend only (it needs the example's file, which no image has).
    """
    local = compute_backend == "local"
    python = sys.executable or "python"
    applications = [
        ApplicationCreate(
            slug="files",
            name="Files",
            summary="Browse and download your home folder and mounted buckets in the browser "
            "(Python's built-in web server).",
            image=environment_image,
            command=[python, "-m", "cmbcluster.examples.files", "{socket}"] if local else list(IMAGE_FILES_COMMAND),
            port=8080,
            icon=_FILES_ICON,
            category="Tools",
            tags=["files", "storage"],
            default_preset="light",
            active=True,
        ),
        ApplicationCreate(
            slug="jupyterlab",
            name="JupyterLab",
            # The image has the scientific stack; the local backend runs the server's own Python
            # environment, which has what its operator installed there (JupyterLab, perhaps no NumPy).
            summary="Notebooks, a terminal and a file browser, with the scientific Python stack "
            "(NumPy, SciPy, pandas, matplotlib...)."
            if not local
            else "Notebooks, a terminal and a file browser, in this server's own Python environment: "
            "its packages are those installed there.",
            image=environment_image,
            command=list(JUPYTER_COMMAND),
            port=8888,
            icon=_JUPYTER_ICON,
            category="Notebooks",
            tags=["python", "notebook", "jupyter"],
            default_preset=DEFAULT_PRESET,
            active=True,
        ),
    ]
    if local:
        applications.append(
            ApplicationCreate(
                slug="streamlit",
                name="Streamlit example",
                summary="A small Streamlit app: browse the files of your mounted buckets and plot a CSV file. "
                "Copy it to start your own.",
                image="python:3.11-slim",
                command=[
                    "streamlit",
                    "run",
                    str(STREAMLIT_EXAMPLE),
                    "--server.address={host}",
                    "--server.port={port}",
                    "--server.baseUrlPath={base_url}",
                    "--server.headless=true",
                    "--browser.gatherUsageStats=false",
                    "--server.fileWatcherType=none",
                ],
                port=8501,
                icon=_STREAMLIT_ICON,
                category="Apps",
                tags=["python", "streamlit", "dashboard"],
                default_preset="light",
                active=True,
            )
        )
    return applications


def seed_catalog(db: Session, compute_backend: str, environment_image: str) -> None:
    """Fill an empty catalog with :func:`default_applications`; in a catalog that has entries,
    only bring an entry still holding an earlier default command, never changed since, up to date.

    Idempotent, and safe when several replicas start at once (the loser of the race rolls back).
    """
    if db.execute(select(Application.id).limit(1)).first() is not None:
        _upgrade_defaults(db, compute_backend, environment_image)
        return
    added = []
    for data in default_applications(compute_backend, environment_image):
        app = Application(**data.model_dump())
        db.add(app)
        added.append(app)
    try:
        db.flush()
        for app in added:
            _audit_created(db, app, actor_id=None, reason="default catalog")
        db.commit()
    except IntegrityError:
        db.rollback()  # another replica seeded meanwhile
        return
    log.info("application catalog seeded: %s", ", ".join(app.slug for app in added))


def _upgrade_defaults(db: Session, compute_backend: str, environment_image: str) -> None:
    defaults = {app.slug: app for app in default_applications(compute_backend, environment_image)}
    for slug in ("files", "jupyterlab"):
        app = db.execute(select(Application).where(Application.slug == slug)).scalar_one_or_none()
        if app is None or not _earlier_default(slug, app.command, compute_backend):
            continue
        changes: dict[str, Any] = {"command": defaults[slug].command}
        if app.image == EARLIER_JUPYTER_IMAGE:
            changes["image"] = environment_image
        untouched = abs((app.updated_at - app.created_at).total_seconds()) < 1  # both set when seeded
        if not app.active and untouched:
            changes["active"] = True  # seeded inactive because its program was missing then
        before = {name: getattr(app, name) for name in changes}
        for name, value in changes.items():
            setattr(app, name, value)
        audit(db, actor_id=None, action="application.updated", target_type="application", target_id=app.id,
              slug=app.slug, before=before, after=changes, reason="default catalog upgrade")  # fmt: skip
        log.info("application %s: its default command was brought up to date", slug)
    db.commit()


def availability(compute: ComputeBackend, app: Application) -> str | None:
    """Why the application cannot start on this server, with the fix; None when it can."""
    return compute.check_command(app.command)
