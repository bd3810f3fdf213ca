"""The storage interface: buckets, objects as streams, and the volume that mounts a bucket.

Methods are synchronous because every cloud SDK we build on is; the control plane calls them
from worker threads. Object bodies travel as iterators of ``bytes`` chunks so that uploads and
downloads of any size run in constant memory. Implementations raise the errors of
:mod:`cmbcluster.errors`; ``cmbcluster.testing.storage.StorageContract`` checks all of this.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces.common import CloudIdentity, UserRef
from cmbcluster.naming import DEFAULT_BUCKET_NAMES, BucketNameRules, validate_object_key, validate_object_prefix


class StorageClass(StrEnum):
    """Portable storage classes; each backend maps them to its own (or refuses with InvalidRequest)."""

    STANDARD = "standard"
    INFREQUENT = "infrequent"  # S3 STANDARD_IA, GCS NEARLINE
    COLD = "cold"  # S3 GLACIER_IR, GCS COLDLINE
    ARCHIVE = "archive"  # GCS ARCHIVE
    AUTO = "auto"  # S3 INTELLIGENT_TIERING


@dataclass(frozen=True, kw_only=True)
class BucketOptions:
    """What a user chooses when creating a bucket."""

    display_name: str
    storage_class: StorageClass = StorageClass.STANDARD
    versioning: bool | None = None  # None: the backend's configured default


@dataclass(frozen=True, kw_only=True)
class BucketInfo:
    """A bucket as the backend reports it. ``name`` is the backend's real, unique name."""

    name: str
    owner_id: str
    display_name: str
    storage_class: StorageClass
    created_at: dt.datetime
    location: str = ""
    versioning: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BucketUsage:
    """What a bucket holds. ``size_bytes``/``object_count``: the current objects, those a listing
    shows. ``noncurrent_bytes``/``noncurrent_count``: earlier versions of overwritten or deleted
    objects that the service still keeps (and bills) until the bucket's lifecycle removes them;
    0 for a backend that keeps no versions."""

    size_bytes: int
    object_count: int
    noncurrent_bytes: int = 0
    noncurrent_count: int = 0

    @property
    def billed_bytes(self) -> int:
        """What the service stores and bills: current and noncurrent bytes."""
        return self.size_bytes + self.noncurrent_bytes


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    """One object as the backend reports it.

    ``md5``: the hex MD5 of the object's bytes as the *service* computed it on storing them
    (GCS's ``md5Hash``; an S3 ETag when it is one: a single-part object not encrypted with KMS),
    or None when the service keeps none. A backend that cannot vouch for it leaves it None:
    whoever must know the bytes (the migration's verification) then reads the object back.
    """

    key: str
    size: int
    last_modified: dt.datetime
    etag: str = ""
    content_type: str = "application/octet-stream"
    md5: str | None = None


@dataclass(frozen=True, kw_only=True)
class ObjectPage:
    """One page of a listing. ``prefixes`` are the "folders" directly under the prefix when
    listing with a delimiter; ``next_token`` is opaque and ``None`` on the last page."""

    objects: list[ObjectInfo]
    prefixes: list[str] = field(default_factory=list)
    next_token: str | None = None


@dataclass(frozen=True, kw_only=True)
class MountRequest:
    """Where and as whom a bucket is mounted in an environment.

    ``identity`` is the user's cloud identity that the environment runs as (what
    ``InfraProvider.ensure_user_identity`` returned, already granted this bucket), None when the
    infra provider gives users none: a volume that mounts with the pod's own credentials names it
    (Mountpoint for S3's ``authenticationSource: pod`` with the user's IRSA role; Azure Blob CSI's
    ``clientID``, the user's managed identity, read from the identity's annotations).
    """

    bucket: str
    mount_path: str
    user: UserRef
    environment_id: str
    uid: int = 1000
    gid: int = 100
    read_only: bool = False
    subpath: str = ""
    namespace: str = ""  # the Kubernetes namespace of the pod (for namespaced volume objects)
    identity: CloudIdentity | None = None

    def __post_init__(self) -> None:
        if not self.mount_path.startswith("/") or any(p in {".", ".."} for p in self.mount_path.split("/")):
            raise InvalidRequest(f"mount path {self.mount_path!r} must be absolute, without '.' or '..'")
        if self.subpath:
            validate_object_key(self.subpath)
            # mount options are comma-separated key=value lists: these would inject options
            if any(ch in self.subpath for ch in ",=\"'"):
                raise InvalidRequest("a bucket sub-folder to mount must not contain ',', '=' or quotes")


@dataclass(kw_only=True)
class VolumeSpec:
    """How to mount a bucket in an environment.

    For Kubernetes: ``volume`` (a pod ``volumes`` entry as the API's JSON), ``mount`` (a
    container ``volumeMounts`` entry), ``objects`` (manifests that must exist first, such as a
    PersistentVolume and PersistentVolumeClaim) and ``pod_annotations``. For local processes:
    ``local_path``, the folder that holds the bucket's objects.
    """

    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    pod_annotations: dict[str, str] = field(default_factory=dict)
    local_path: Path | None = None


def resolve_byte_range(byte_range: tuple[int, int | None] | None, size: int) -> tuple[int, int]:
    """The half-open ``[start, end)`` that ``download_object(byte_range=...)`` must return.

    ``byte_range`` is ``(first, last)`` with ``last`` inclusive or None (to the end), as in an
    HTTP Range header; an unsatisfiable range raises InvalidRequest. Shared by every backend
    so they agree on the edge cases.
    """
    if byte_range is None:
        return 0, size
    first, last = byte_range
    if first < 0 or first >= max(size, 1) or (last is not None and last < first):
        raise InvalidRequest(f"range {first}-{last if last is not None else ''} is not satisfiable for {size} bytes")
    return first, size if last is None else min(last + 1, size)


MAX_PAGE_SIZE = 10_000


def check_listing(prefix: str, delimiter: str | None, page_size: int) -> None:
    """The arguments of ``list_objects`` every backend accepts: a safe prefix, the delimiter
    ``/`` or none, and 1 to :data:`MAX_PAGE_SIZE` entries (a backend may return fewer)."""
    validate_object_prefix(prefix)
    if delimiter not in (None, "/"):
        raise InvalidRequest("objects are listed with the delimiter '/' or none")
    if isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size must be between 1 and {MAX_PAGE_SIZE}")


class StorageBackend(abc.ABC):
    """Buckets and objects of one storage service. Names passed in are ``BucketInfo.name``."""

    #: The bucket names this service accepts: ``create_bucket`` makes new names with
    #: ``bucket_names.new_name(prefix, owner.id)``, and core checks configured names (the database
    #: bucket) against them. The default is what S3 and Cloud Storage both accept; declare your
    #: service's own where they differ (Azure Blob containers refuse ``--``).
    bucket_names: ClassVar[BucketNameRules] = DEFAULT_BUCKET_NAMES

    # -- buckets ---------------------------------------------------------------------------
    @abc.abstractmethod
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        """Create a new bucket for ``owner`` with a unique name the backend chooses under its
        :attr:`bucket_names` (``bucket_names.new_name``). Private: never publicly readable."""

    @abc.abstractmethod
    def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
        """Delete a bucket. Non-empty without ``force``: :class:`~cmbcluster.errors.Conflict`.
        With ``force``, every object (and every version) is deleted first."""

    @abc.abstractmethod
    def get_bucket(self, bucket: str) -> BucketInfo:
        """Metadata of one bucket, or :class:`~cmbcluster.errors.NotFound`."""

    @abc.abstractmethod
    def list_buckets(self, owner: UserRef) -> list[BucketInfo]:
        """Every bucket this backend holds for ``owner``, oldest first."""

    @abc.abstractmethod
    def bucket_usage(self, bucket: str) -> BucketUsage:
        """Total size and object count of a bucket's current objects, and of the noncurrent
        versions it keeps (a backend that keeps versions must report them: they are billed)."""

    @abc.abstractmethod
    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        """How an environment mounts ``request.bucket`` at ``request.mount_path``."""

    @abc.abstractmethod
    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        """Grant ``identity`` read/write on ``bucket``'s objects, and nothing broader. Idempotent."""

    # -- objects ---------------------------------------------------------------------------
    @abc.abstractmethod
    def list_objects(
        self,
        bucket: str,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        page_token: str | None = None,
        page_size: int = 1000,
    ) -> ObjectPage:
        """One page of the objects under ``prefix``, in key order."""

    @abc.abstractmethod
    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        """Metadata of one object, or :class:`~cmbcluster.errors.NotFound`."""

    @abc.abstractmethod
    def upload_object(
        self,
        bucket: str,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str | None = None,
    ) -> ObjectInfo:
        """Write an object from a stream of chunks, holding at most a few chunks in memory.

        All or nothing: if ``chunks`` raises, no object (and no previous version's loss) results.
        """

    @abc.abstractmethod
    def download_object(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        chunk_size: int = 1024 * 1024,
    ) -> Iterator[bytes]:
        """Stream an object's bytes (``byte_range`` = (first, last inclusive or None)).

        Raises :class:`~cmbcluster.errors.NotFound` *before* the first chunk is produced, so
        callers can answer 404 instead of a broken stream: implementations check on call.
        """

    @abc.abstractmethod
    def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        """Delete objects; keys that do not exist are ignored (deleting is idempotent)."""

    def abort_unfinished_uploads(self, bucket: str, *, started_before: dt.datetime, key: str | None = None) -> int:
        """Abort uploads into ``bucket`` (only those to ``key`` when given) that were started
        before ``started_before`` and never completed, and return how many were aborted.

        The control plane calls it at start for every upload the previous run of the server began
        and never finished (a SIGKILL, an OOM kill, a redeploy), whose parts the service would
        otherwise keep and bill. The default does nothing and returns 0: right for a backend
        whose unfinished uploads leave nothing stored behind.
        """
        return 0

    # -- operations --------------------------------------------------------------------------
    def check_ready(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Raise :class:`~cmbcluster.errors.ProviderUnavailable` if the service is unreachable."""

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release connections. Called once when the control plane stops."""
