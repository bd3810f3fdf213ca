"""Google Cloud Storage buckets as CMBCluster storage, mounted in pods by the gcsfuse CSI driver.

Every bucket is private: uniform bucket-level access, public access prevention enforced, and
access granted per user through bucket IAM (:meth:`GcsStorage.ensure_bucket_access`).
Bucket metadata that the control plane needs back (owner, display name, storage class) lives
in bucket labels (:mod:`cmbcluster_gcp.labels`). Objects up to 8 MiB go up in one request,
larger ones in spooled pieces of a resumable upload (:mod:`cmbcluster_gcp.uploads`).

This module is imported only when the ``gcp`` storage backend is selected, so google-cloud-*
stays out of the control plane's import path otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import mimetypes
import queue
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any
from urllib.parse import quote

import google.auth.exceptions as auth_exceptions
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from cmbcluster.errors import (
    CmbclusterError,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    ProviderUnavailable,
)
from cmbcluster.interfaces import (
    BucketInfo,
    BucketOptions,
    BucketUsage,
    CloudIdentity,
    MountRequest,
    ObjectInfo,
    ObjectPage,
    StorageBackend,
    StorageClass,
    UserRef,
    VolumeSpec,
    check_listing,
    resolve_byte_range,
)
from cmbcluster.naming import BucketNameRules, dns_label, validate_object_key
from cmbcluster_gcp.errors import GCS, error_for_status, gcs_errors, translate_error
from cmbcluster_gcp.labels import (
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    LABEL_STORAGE_CLASS,
    MANAGED_BY,
    decode_display_name,
    encode_display_name,
    is_display_name_label,
)
from cmbcluster_gcp.lifecycle import lifecycle_rules
from cmbcluster_gcp.rest import IAM_PROPAGATION_SECONDS, until_propagated
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.uploads import SINGLE_REQUEST_MAX, SPOOL_IN_MEMORY, upload_in_pieces, upload_whole

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Chunks a download reads ahead of its consumer (each the caller's ``chunk_size``).
DOWNLOAD_READ_AHEAD = 4
#: How long a stopped download waits for its reading thread (which ends at its next write).
DOWNLOAD_JOIN_SECONDS = 5.0
#: Objects per batch request (the JSON API's limit is 100 calls per batch).
BATCH_SIZE = 100
#: The largest page the JSON API returns.
MAX_SERVER_PAGE = 1000
CREATE_ATTEMPTS = 5

CSI_DRIVER = "gcsfuse.csi.storage.gke.io"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
#: Read and write objects (list, get, create, delete; no IAM or bucket administration).
OBJECT_USER_ROLE = "roles/storage.objectUser"
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})
#: Member forms ensure_bucket_access grants to: one identity, never a set of principals.
GRANTABLE_MEMBER_PREFIXES = ("principal://", "serviceAccount:")


_TO_GCS_CLASS = {
    StorageClass.STANDARD: "STANDARD",
    StorageClass.INFREQUENT: "NEARLINE",
    StorageClass.COLD: "COLDLINE",
    StorageClass.ARCHIVE: "ARCHIVE",
}
_FROM_GCS_CLASS = {
    **{gcs: portable for portable, gcs in _TO_GCS_CLASS.items()},
    # Legacy classes behave like STANDARD.
    "MULTI_REGIONAL": StorageClass.STANDARD,
    "REGIONAL": StorageClass.STANDARD,
    "DURABLE_REDUCED_AVAILABILITY": StorageClass.STANDARD,
}

#: Cloud Storage's rules for bucket names (``GcsStorage.bucket_names``). A name outside them cannot
#: exist, and must not reach a request path.
GCS_BUCKET_NAMES = BucketNameRules(
    pattern=r"(?!goog)(?!.*g[o0][o0]gle)(?!\d+\.\d+\.\d+\.\d+$)(?!.*[^.]{64})[a-z0-9][a-z0-9._-]*[a-z0-9]",
    description=(
        "3-63 lower-case letters, digits, '-' and '_' (up to 222 with '.' between parts of 63 at most), starting "
        "and ending with a letter or digit, not an IP address, not starting with 'goog' nor containing 'google' "
        "(Cloud Storage's rules)"
    ),
    max_length=222,
)
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# -- the backend ----------------------------------------------------------------------------------
class GcsStorage(StorageBackend):
    """Buckets of one Google Cloud project.

    ``retry_timeout`` bounds how long a call keeps retrying transient failures (5xx, 429,
    connection errors) before it raises :class:`~cmbcluster.errors.ProviderUnavailable`.
    """

    bucket_names = GCS_BUCKET_NAMES

    def __init__(
        self,
        settings: GcpSettings,
        *,
        retry_timeout: float = 30.0,
        propagation_seconds: float = IAM_PROPAGATION_SECONDS,
    ) -> None:
        problem = self.bucket_names.prefix_problem(settings.user_bucket_prefix)
        if problem is not None:  # refused here, by `config check` too, not at a user's first bucket
            raise ConfigurationError([f"GCS_USER_BUCKET_PREFIX: {problem}"])
        self.propagation_seconds = propagation_seconds
        self.settings = settings
        self._prefix = settings.user_bucket_prefix.rstrip("-") + "-"
        self._location = settings.storage_location or settings.region
        self._retry: Retry = DEFAULT_RETRY.with_timeout(retry_timeout)
        try:
            if settings.storage_emulator_host:
                # A custom endpoint without auth: the client uses anonymous credentials.
                self._client = storage.Client(
                    project=settings.project_id,
                    client_options={"api_endpoint": settings.storage_emulator_host},
                    use_auth_w_custom_endpoint=False,
                )
            else:
                self._client = storage.Client(project=settings.project_id)
        except auth_exceptions.DefaultCredentialsError as exc:
            raise ConfigurationError(
                [
                    f"no Google Cloud credentials found for the gcp storage backend ({exc}); "
                    "run on GKE with Workload Identity or set GOOGLE_APPLICATION_CREDENTIALS"
                ]
            ) from exc

    # -- buckets -------------------------------------------------------------------------------
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        gcs_class = _TO_GCS_CLASS.get(options.storage_class)
        if gcs_class is None:
            raise InvalidRequest(f"Google Cloud Storage has no {options.storage_class} storage class")
        if not owner.id or not _LABEL_VALUE.match(owner.id):
            raise InvalidRequest("the owner id must be 1-63 lower-case letters, digits, '-' or '_'")
        versioning = self.settings.noncurrent_version_days > 0 if options.versioning is None else options.versioning
        labels = {
            LABEL_OWNER: owner.id,
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_DEPLOYMENT: self.settings.deployment,
            LABEL_STORAGE_CLASS: str(options.storage_class),
            **encode_display_name(options.display_name),
        }

        created = None
        for _attempt in range(CREATE_ATTEMPTS):
            name = self.bucket_names.new_name(self.settings.user_bucket_prefix, owner.id)
            bucket = self._client.bucket(name)
            self._configure(bucket, gcs_class, versioning, labels)
            try:
                with gcs_errors(f"new bucket {name}"):
                    # No retry: a create whose answer was lost would come back as 409 and leave
                    # a bucket behind under a name we then abandon.
                    created = self._client.create_bucket(bucket, location=self._location, retry=None)
                break
            except Conflict:
                log.info("bucket name %s is taken; trying another", name)
        if created is None:
            raise Conflict("could not find a free bucket name; try again")

        # Configuration is sent with the create, and again as a PATCH: some GCS emulators
        # ignore everything but the name on create, and the PATCH is harmless on GCS itself.
        patch = self._client.bucket(created.name)
        try:
            with gcs_errors(f"bucket {created.name}"):
                self._configure(patch, gcs_class, versioning, labels)
                patch.patch(retry=self._retry)
        except BaseException:
            log.warning("configuring new bucket %s failed; deleting it", created.name)
            with contextlib.suppress(Exception):
                created.delete(retry=self._retry)
            raise
        return self._bucket_info(patch)

    def _configure(self, bucket: Any, gcs_class: str, versioning: bool, labels: dict[str, str]) -> None:
        bucket.storage_class = gcs_class
        bucket.iam_configuration.uniform_bucket_level_access_enabled = True
        bucket.iam_configuration.public_access_prevention = "enforced"
        bucket.versioning_enabled = versioning
        bucket.lifecycle_rules = (
            lifecycle_rules(self.settings.noncurrent_version_days, self.settings.noncurrent_versions_kept)
            if versioning
            else []
        )
        bucket.labels = dict(labels)

    def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
        ref = self._bucket_ref(bucket)
        what = f"bucket {bucket}"
        if not force:
            try:
                with gcs_errors(what):
                    ref.delete(retry=self._retry)
            except Conflict:
                raise Conflict(f"bucket {bucket} is not empty; delete its objects first or use force") from None
            return
        for _round in range(3):
            self._delete_every_version(ref)
            try:
                with gcs_errors(what):
                    ref.delete(retry=self._retry)
                return
            except Conflict:
                # Something wrote to the bucket meanwhile (a running environment): go again.
                continue
        raise Conflict(f"bucket {bucket} keeps receiving objects; stop what writes to it and try again")

    def _delete_every_version(self, ref: Any) -> None:
        with gcs_errors(f"bucket {ref.name}"):
            blobs = self._client.list_blobs(
                ref, versions=True, fields="items(name,generation),nextPageToken", retry=self._retry
            )
            pending: list[tuple[str, int | None]] = []
            for blob in blobs:
                pending.append((blob.name, blob.generation))
                if len(pending) >= BATCH_SIZE:
                    self._delete_in_batch(ref, pending)
                    pending = []
            if pending:
                self._delete_in_batch(ref, pending)

    def _delete_in_batch(self, ref: Any, items: Sequence[tuple[str, int | None]]) -> None:
        """Delete up to BATCH_SIZE objects (or object versions) in one request; missing ones are fine."""
        what = f"objects of bucket {ref.name}"
        with gcs_errors(what):
            batch = self._client.batch(raise_exception=False)
            with batch:
                for name, generation in items:
                    ref.delete_blob(name, generation=generation)
        # google-cloud-storage keeps the per-call answers of a batch only in this attribute.
        for response in getattr(batch, "_responses", None) or []:
            status = int(response.status_code)
            if not (200 <= status < 300 or status == 404):
                raise error_for_status(status, what, service=GCS, detail=response.text[:500], response=response)

    def get_bucket(self, bucket: str) -> BucketInfo:
        ref = self._bucket_ref(bucket)
        with gcs_errors(f"bucket {bucket}"):
            ref.reload(retry=self._retry)
        return self._bucket_info(ref)

    def list_buckets(self, owner: UserRef) -> list[BucketInfo]:
        infos = []
        with gcs_errors("the project's buckets"):
            # The prefix is only a hint: some emulators ignore it, so filter here as well.
            for bucket in self._client.list_buckets(prefix=self._prefix, retry=self._retry):
                labels = bucket.labels or {}
                if (
                    bucket.name.startswith(self._prefix)
                    and labels.get(LABEL_OWNER) == owner.id
                    and labels.get(LABEL_MANAGED_BY) == MANAGED_BY
                ):
                    infos.append(self._bucket_info(bucket))
        return sorted(infos, key=lambda i: (i.created_at, i.name))

    def bucket_usage(self, bucket: str) -> BucketUsage:
        """Live objects and noncurrent versions, from one listing of every generation: a
        noncurrent one carries the time it stopped being live (``timeDeleted``)."""
        ref = self._bucket_ref(bucket)
        size = count = old_size = old_count = 0
        with gcs_errors(f"bucket {bucket}"):
            for blob in self._client.list_blobs(
                ref, versions=True, fields="items(size,timeDeleted),nextPageToken", retry=self._retry
            ):
                if blob.time_deleted is None:
                    size += int(blob.size or 0)
                    count += 1
                else:
                    old_size += int(blob.size or 0)
                    old_count += 1
        return BucketUsage(size_bytes=size, object_count=count, noncurrent_bytes=old_size, noncurrent_count=old_count)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        GCS_BUCKET_NAMES.check(request.bucket)
        if not request.mount_path.startswith("/") or ".." in request.mount_path.split("/"):
            raise InvalidRequest("the mount path must be absolute, without '..'")
        for label, value in (("uid", request.uid), ("gid", request.gid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"{label} must be a non-negative integer")
        options = [
            "implicit-dirs",
            f"uid={request.uid}",
            f"gid={request.gid}",
            "file-mode=0664",
            "dir-mode=0775",
        ]
        if request.subpath:
            subpath = validate_object_key(request.subpath.strip("/"))
            if "," in subpath or "=" in subpath:
                # They would end or inject gcsfuse mount options.
                raise InvalidRequest("the subpath must not contain ',' or '='")
            options.append(f"only-dir={subpath}")
        name = _volume_name(request.bucket, request.subpath)
        return VolumeSpec(
            volume={
                "name": name,
                "csi": {
                    "driver": CSI_DRIVER,
                    "readOnly": request.read_only,
                    "volumeAttributes": {"bucketName": request.bucket, "mountOptions": ",".join(options)},
                },
            },
            mount={"name": name, "mountPath": request.mount_path, "readOnly": request.read_only},
            pod_annotations={GCSFUSE_ANNOTATION: "true"},
        )

    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        member = identity.principal
        if member in PUBLIC_MEMBERS or not member.startswith(GRANTABLE_MEMBER_PREFIXES) or len(member) < 16:
            raise InvalidRequest(
                f"bucket access is granted to one identity ({' or '.join(GRANTABLE_MEMBER_PREFIXES)}...), "
                f"not {member!r}"
            )
        if member.startswith("serviceAccount:"):
            # a user's Google service account made moments ago (service-account mode): Cloud Storage
            # refuses it as a member until IAM has propagated it
            until_propagated(
                lambda: self._grant(bucket, member), what=f"bucket {bucket}", window=self.propagation_seconds,
                pending=_member_unknown,
            )  # fmt: skip
        else:
            self._grant(bucket, member)

    def _grant(self, bucket: str, member: str) -> None:
        ref = self._bucket_ref(bucket)
        what = f"IAM policy of bucket {bucket}"
        for _attempt in range(3):
            with gcs_errors(what):
                policy = ref.get_iam_policy(requested_policy_version=3, retry=self._retry)
            bindings = [dict(b) for b in policy.bindings]
            # Bindings on other roles keep their members, except public ones.
            wanted: list[dict[str, Any]] = []
            for b in bindings:
                if b.get("role") == OBJECT_USER_ROLE:
                    continue
                members = {m for m in (b.get("members") or ()) if m not in PUBLIC_MEMBERS}
                if members:
                    wanted.append({**b, "members": members})
            wanted.append({"role": OBJECT_USER_ROLE, "members": {member}})
            if _canonical_bindings(wanted) == _canonical_bindings(bindings):
                return
            policy.bindings = wanted
            if any("condition" in b for b in wanted):
                policy.version = 3
            try:
                with gcs_errors(what):
                    # The policy carries the etag we read: a concurrent change answers 412.
                    ref.set_iam_policy(policy, retry=None)
                return
            except Conflict:
                continue
        raise Conflict(f"the IAM policy of bucket {bucket} keeps changing; try again")

    # -- objects -------------------------------------------------------------------------------
    def list_objects(
        self,
        bucket: str,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        page_token: str | None = None,
        page_size: int = 1000,
    ) -> ObjectPage:
        ref = self._bucket_ref(bucket)
        check_listing(prefix, delimiter, page_size)
        server_token, after = _decode_page_token(page_token)

        with gcs_errors(f"bucket {bucket}"):
            iterator = self._client.list_blobs(
                ref,
                prefix=prefix or None,
                delimiter=delimiter,
                max_results=min(page_size, MAX_SERVER_PAGE),
                page_token=server_token,
                retry=self._retry,
            )
            page = next(iterator.pages, None)
            blobs = list(page) if page is not None else []
            prefixes = list(page.prefixes) if page is not None else []
            server_next = iterator.next_page_token

        entries: list[tuple[str, Any]] = sorted(
            [(blob.name, blob) for blob in blobs] + [(p, None) for p in prefixes], key=lambda e: e[0]
        )
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        taken = entries[:page_size]
        if len(entries) > page_size:
            # The server sent more than asked for (emulators ignore maxResults): carry on from
            # the last entry returned, within the same server page.
            next_token: str | None = _encode_page_token(server_token, taken[-1][0])
        elif server_next:
            next_token = _encode_page_token(server_next, None)
        else:
            next_token = None
        return ObjectPage(
            objects=[_object_info(blob) for _key, blob in taken if blob is not None],
            prefixes=[key for key, blob in taken if blob is None],
            next_token=next_token,
        )

    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return _object_info(self._get_blob(bucket, key))

    def upload_object(
        self,
        bucket: str,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str | None = None,
    ) -> ObjectInfo:
        ref = self._bucket_ref(bucket)
        validate_object_key(key)
        what = f"object {key} in bucket {bucket}"
        content_type = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        blob = ref.blob(key)

        # Up to SINGLE_REQUEST_MAX is gathered first (in a spool: memory holds 1 MiB of it at most):
        # an object that fits is sent in a single request, which creates it whole or not at all. A
        # failing source raises from here with nothing sent.
        source = iter(chunks)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="cmbcluster-gcs-upload-") as spool:
            digest, size = hashlib.md5(usedforsecurity=False), 0
            for chunk in source:
                spool.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if size > SINGLE_REQUEST_MAX:
                    break
            else:
                resource = upload_whole(
                    self._client._http, self._upload_url(ref.name), spool, size, digest.digest(), name=key,
                    content_type=content_type, what=what,
                )  # fmt: skip
                blob._set_properties(resource)
                info = _object_info(blob)
                if info.md5 != digest.hexdigest():  # GCS checks the MD5 it was given; an emulator may not
                    raise ProviderUnavailable(f"{GCS} stored other bytes than were sent for {what}; try again")
                return info

            # Larger objects go as a resumable upload in UPLOAD_PIECE_SIZE pieces, each spooled to a
            # temporary file and streamed from it: memory holds a source chunk or two whatever the
            # piece size. The object exists only once the final piece lands, so on any failure the
            # session is cancelled instead, and the previous version of the object (if any) stays.
            def start_session() -> str:
                with gcs_errors(what):
                    url: str = blob.create_resumable_upload_session(content_type=content_type, retry=self._retry)
                return url

            upload_in_pieces(self._client._http, start_session, b"", itertools.chain(_spooled(spool, size), source),
                             what)  # fmt: skip
        with gcs_errors(what):
            blob.reload(retry=self._retry)
        return _object_info(blob)

    def _upload_url(self, bucket: str) -> str:
        """Where objects are uploaded into ``bucket`` (Cloud Storage's, or an emulator's)."""
        return f"{self._client._connection.API_BASE_URL}/upload/storage/v1/b/{quote(bucket, safe='')}/o"

    def download_object(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        chunk_size: int = 1024 * 1024,
    ) -> Iterator[bytes]:
        if isinstance(chunk_size, bool) or chunk_size < 1:
            raise InvalidRequest("chunk_size must be positive")
        blob = self._get_blob(bucket, key)  # NotFound here, before any byte is produced
        size = int(blob.size or 0)
        start, end = resolve_byte_range(byte_range, size)
        # Pin the generation we looked at, so a concurrent overwrite cannot splice two versions.
        pinned = blob.bucket.blob(blob.name, generation=blob.generation)
        return self._stream(pinned, start, end, chunk_size, f"object {key} in bucket {bucket}")

    def _stream(self, blob: Any, start: int, end: int, chunk_size: int, what: str) -> Iterator[bytes]:
        """One streamed GET for the whole range, read by a thread into a pipe of a few chunks.

        One request instead of one per fetch is what makes large downloads fast, and the pipe
        keeps memory constant. A connection that breaks is resumed by the client library's retry
        from the byte it reached, pinned to the blob's generation, so no byte is written twice.
        """
        pipe = _ChunkPipe(chunk_size)

        def download() -> None:
            try:
                with gcs_errors(what):
                    blob.download_to_file(
                        pipe, start=start, end=end - 1, raw_download=True, checksum=None, retry=self._retry
                    )
                pipe.close()
            except Exception as exc:  # noqa: BLE001 - handed to the reading side, which raises it
                pipe.fail(exc)

        reader = threading.Thread(target=download, name="gcs-download", daemon=True)
        reader.start()
        received = 0
        try:
            for chunk in pipe:
                received += len(chunk)
                yield chunk
        finally:
            pipe.cancel()  # the consumer went away: the reading thread stops at its next write
            reader.join(timeout=DOWNLOAD_JOIN_SECONDS)
        if received != end - start:
            raise ProviderUnavailable(f"{what} ended early at byte {start + received} of {end}")

    def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        ref = self._bucket_ref(bucket)
        unique = list(dict.fromkeys(validate_object_key(key) for key in keys))
        if not unique:
            return
        with gcs_errors(f"bucket {bucket}"):
            ref.reload(retry=self._retry)  # a missing bucket is NotFound, not silently "deleted"
        for start in range(0, len(unique), BATCH_SIZE):
            self._delete_in_batch(ref, [(key, None) for key in unique[start : start + BATCH_SIZE]])

    # -- operations ------------------------------------------------------------------------------
    def check_ready(self) -> None:
        try:
            pages = self._client.list_buckets(max_results=1, retry=None, timeout=5.0).pages
            next(pages, None)
        except Exception as exc:
            mapped = translate_error(exc, "a bucket listing")
            if mapped is None:
                raise
            raise ProviderUnavailable(f"Google Cloud Storage is not ready: {mapped.message}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _bucket_ref(self, bucket: str) -> Any:
        if not isinstance(bucket, str) or GCS_BUCKET_NAMES.problem(bucket) is not None:
            raise NotFound(f"bucket {bucket} not found")
        return self._client.bucket(bucket)

    def _get_blob(self, bucket: str, key: str) -> Any:
        ref = self._bucket_ref(bucket)
        validate_object_key(key)
        with gcs_errors(f"object {key} in bucket {bucket}"):
            blob = ref.get_blob(key, retry=self._retry)
        if blob is None:  # get_blob answers None for a missing object or bucket
            raise NotFound(f"object {key} in bucket {bucket} not found")
        return blob

    def _bucket_info(self, bucket: Any) -> BucketInfo:
        labels: dict[str, str] = dict(bucket.labels or {})
        storage_class = _FROM_GCS_CLASS.get(str(bucket.storage_class or "STANDARD").upper())
        if storage_class is None:
            recorded = labels.get(LABEL_STORAGE_CLASS, "")
            storage_class = StorageClass(recorded) if recorded in set(StorageClass) else StorageClass.STANDARD
        display_name = decode_display_name(labels)
        return BucketInfo(
            name=bucket.name,
            owner_id=labels.get(LABEL_OWNER, ""),
            display_name=display_name if display_name is not None else bucket.name,
            storage_class=storage_class,
            created_at=bucket.time_created or _EPOCH,
            location=bucket.location or "",
            versioning=bool(bucket.versioning_enabled),
            labels={k: v for k, v in labels.items() if not is_display_name_label(k)},
        )


# -- module helpers ---------------------------------------------------------------------------------
class _PipeCancelled(Exception):
    """Raised in the reading thread of a download whose consumer stopped."""


_END = object()


class _ChunkPipe:
    """A write-only file (what ``download_to_file`` writes to) whose bytes come out, regrouped in
    ``chunk_size`` pieces, of an iterator in another thread; at most a few pieces in between."""

    def __init__(self, chunk_size: int, depth: int = DOWNLOAD_READ_AHEAD) -> None:
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._cancelled = threading.Event()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) == self._chunk_size:  # the usual case (8 KiB writes): one copy, no slice
            self._put(bytes(self._buffer))
            self._buffer.clear()
        while len(self._buffer) >= self._chunk_size:
            self._put(bytes(self._buffer[: self._chunk_size]))
            del self._buffer[: self._chunk_size]
        return len(data)

    def close(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(_END)

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(_PipeCancelled):  # nobody is reading any more
            self._put(exc)

    def cancel(self) -> None:
        self._cancelled.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def _put(self, item: object) -> None:
        while not self._cancelled.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return
        raise _PipeCancelled

    def __iter__(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item


def _spooled(spool: IO[bytes], size: int) -> Iterator[bytes]:
    """The ``size`` bytes of ``spool``, from its start, 1 MiB at a time."""
    spool.seek(0)
    remaining = size
    while remaining > 0:
        block = spool.read(min(MiB, remaining))
        if not block:
            raise OSError("the upload's spool ended early")
        remaining -= len(block)
        yield block


def _object_info(blob: Any) -> ObjectInfo:
    return ObjectInfo(
        key=blob.name,
        size=int(blob.size or 0),
        last_modified=blob.updated or blob.time_created or _EPOCH,
        etag=blob.etag or "",
        content_type=blob.content_type or "application/octet-stream",
        md5=_md5_hex(blob.md5_hash),
    )


def _md5_hex(md5_hash: str | None) -> str | None:
    """GCS's ``md5Hash`` (base64) as hex; None for objects that have none (composed objects)."""
    if not md5_hash:
        return None
    try:
        digest = base64.b64decode(md5_hash, validate=True)
    except (ValueError, binascii.Error):
        return None
    return digest.hex() if len(digest) == 16 else None


def _encode_page_token(server_token: str | None, after: str | None) -> str:
    raw = json.dumps({"s": server_token, "a": after}, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_page_token(token: str | None) -> tuple[str | None, str | None]:
    if not token:
        return None, None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        server, after = data["s"], data["a"]
        if not (server is None or isinstance(server, str)) or not (after is None or isinstance(after, str)):
            raise ValueError(token)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidRequest("invalid page token") from None
    return server, after


def _canonical_bindings(bindings: Iterable[dict[str, Any]]) -> list[tuple[str, tuple[str, ...], str]]:
    return sorted(
        (
            str(b.get("role")),
            tuple(sorted(b.get("members") or ())),
            json.dumps(b.get("condition"), sort_keys=True) if b.get("condition") else "",
        )
        for b in bindings
    )


def _volume_name(bucket: str, subpath: str) -> str:
    """A pod-unique volume name: one per bucket and subpath, at most 63 characters."""
    raw = f"gcs-{bucket}"
    if subpath:
        raw += "-" + hashlib.sha256(subpath.encode("utf-8")).hexdigest()[:8]
    if len(raw) > 63:
        raw = raw[:54] + "-" + hashlib.sha256(f"{bucket}/{subpath}".encode()).hexdigest()[:8]
    return dns_label(raw)


def _member_unknown(error: CmbclusterError) -> bool:
    """Cloud Storage's answer to a policy naming a service account IAM has not propagated yet."""
    text = f"{error.message} {error.detail or ''}".lower()
    return isinstance(error, InvalidRequest) and ("does not exist" in text or "invalid argument" in text)
