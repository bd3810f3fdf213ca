"""The compute interface: how an environment runs (Kubernetes pods, or local processes)."""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cmbcluster.interfaces.common import CloudIdentity, UserRef
from cmbcluster.interfaces.storage import VolumeSpec


class EnvironmentPhase(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    MISSING = "missing"  # the backend holds nothing for this environment


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Requests for one environment. CPU in cores, memory in MiB."""

    cpu: float = 1.0
    memory_mib: int = 2048
    cpu_limit: float | None = None
    memory_limit_mib: int | None = None
    gpu: int = 0


@dataclass(frozen=True, kw_only=True)
class MountedVolume:
    mount_path: str
    spec: VolumeSpec
    #: the bucket mounted (``BucketInfo.name``); pod decorators see them in ``PodContext.buckets``
    bucket: str = ""


@dataclass(frozen=True, kw_only=True)
class EnvironmentSpec:
    """Everything a backend needs to run one environment."""

    environment_id: str
    user: UserRef
    image: str
    command: tuple[str, ...] = ()
    port: int = 8080
    working_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    secret_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    resources: Resources = field(default_factory=Resources)
    volumes: tuple[MountedVolume, ...] = ()
    identity: CloudIdentity | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EnvironmentStatus:
    environment_id: str
    phase: EnvironmentPhase
    url: str | None = None
    message: str = ""
    started_at: dt.datetime | None = None
    user_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """Where the control plane's proxy reaches a running environment (``/environments/<id>/``),
    for backends whose environments are served through the control plane."""

    #: scheme, host and port: ``http://127.0.0.1:20345`` (for a Unix socket, ``http://localhost``)
    url: str
    #: the Unix socket the application listens on instead of a port
    unix_socket: str | None = None
    #: sent with every request and WebSocket handshake (the application's token); never shown to anyone
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: the application serves at ``/`` and knows nothing of its base path: the proxy removes
    #: ``/environments/<id>`` from request paths and puts it back in redirects
    strip_prefix: bool = False


@dataclass(frozen=True, kw_only=True)
class ResourceUse:
    """What a running environment uses now: CPU in cores (averaged over a few seconds at most),
    memory in bytes (resident)."""

    cpu: float
    memory_bytes: int


class ComputeBackend(abc.ABC):
    """Runs environments. Every method is idempotent with respect to the environment id."""

    @abc.abstractmethod
    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        """Start (or adopt an already running) environment; return promptly, not when ready.

        Core calls ``stop`` first when it starts again an environment that failed or whose
        application ended by itself (``status`` not ``MISSING``), so what ``start`` finds of the same
        id is a start of this run that was interrupted and sent again (adopt it), or what a ``stop``
        is still removing (wait for it to go)."""

    @abc.abstractmethod
    def stop(self, environment_id: str) -> None:
        """Stop the environment, keeping nothing running. Unknown ids are ignored."""

    @abc.abstractmethod
    def status(self, environment_id: str) -> EnvironmentStatus:
        """Current state; ``MISSING`` when the backend holds nothing for this id."""

    @abc.abstractmethod
    def list_managed(self) -> list[EnvironmentStatus]:
        """Every environment this backend runs for CMBCluster (for the reconcile loop)."""

    @abc.abstractmethod
    def delete(self, environment_id: str) -> None:
        """Stop and remove everything the backend keeps for the environment."""

    def remove_unrecorded(self, environment_id: str) -> None:
        """Remove an environment the database holds no record of (a create interrupted before its
        record was written, or a database restored from a backup older than the environment), for
        the reconcile loop: by default :meth:`delete`. A backend that keeps a user's own files for
        an environment keeps them, where a start of the same id finds them again should the record
        come back (the embedded default: its home folder)."""
        self.delete(environment_id)

    def forget_user(self, user_id: str) -> None:  # noqa: B027 - optional hook with a sensible default
        """Remove what the backend keeps for a deleted user beyond their environments (the
        Kubernetes backend: their ServiceAccount). Idempotent; by default there is nothing."""

    def on_status_change(self, listener: Callable[[str], None]) -> None:  # noqa: B027 - optional
        """Register ``listener(environment_id)``, to be called (from any thread, quickly, never
        raising) when an environment's status may have changed: a pod event, a process exit.

        Optional: core also polls, so a backend without change notifications works, only with a
        delay of up to half a second before a progress stream sees a change."""

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        """The last lines of the environment's output, where the backend can see them."""
        return ""

    def resource_use(self, environment_ids: Sequence[str]) -> Mapping[str, ResourceUse] | None:
        """CPU and memory used by each of these running environments (an id the backend cannot
        measure now is left out); None when this backend cannot measure at all (a cluster without
        the metrics API): the web UI then hides the figures. Blocking; by default None."""
        return None

    def upstream(self, environment_id: str) -> Upstream | None:
        """Where the control plane's proxy reaches the running environment; None when the
        environment is not running here, or when the backend serves environments another way (the
        Kubernetes backend: through an ingress)."""
        return None

    def application_headers(self, environment_id: str) -> Mapping[str, str]:
        """What a proxy other than the control plane's (an ingress, once the control plane's
        ``authorize`` check let the request through) must send the running environment's
        application with each request: its start's token, as in :attr:`Upstream.headers`. Empty by
        default, and for an environment that is not running here."""
        return {}

    def check_command(self, command: Sequence[str]) -> str | None:
        """Why an application's command cannot run on this backend, with the fix (the catalog
        shows it); None when it can, or when the backend cannot tell (a container image)."""
        return None

    @property
    def stops_with_control_plane(self) -> bool:
        """True when environments run only while the control plane does: it stops them when it
        shuts down (the embedded default's processes). False: they outlive it (pods)."""
        return False

    def check_ready(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Raise ProviderUnavailable if the backend cannot be reached."""

    @property
    def elects_leader(self) -> bool:
        """True when the control plane's replicas elect one of them, through this backend, to
        run the reconcile and culling loops (several replicas sharing a PostgreSQL database).
        Then no replica may assume at start that no other one is starting environments."""
        return False

    def leads_background_work(self) -> bool:
        """Whether this replica runs the reconcile and culling loops now; always, unless
        :attr:`elects_leader`."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release connections and watches. Called once when the control plane stops."""
