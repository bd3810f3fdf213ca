"""Amazon S3 storage: one private, encrypted, tagged bucket per user bucket, mounted with Mountpoint.

Every botocore failure passes through :func:`map_aws_error`, the one place that turns AWS error
codes into CMBCluster's typed errors. boto3 is imported here only (the plugin imports this module
lazily), so installing the plugin costs nothing until S3 is the configured storage backend.

S3 has no bucket-level storage class: the class a user chooses is recorded in the bucket's
``cmbcluster-storage-class`` tag and applied to every object uploaded through CMBCluster.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import io
import json
import logging
import mimetypes
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from cmbcluster.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
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
from cmbcluster.naming import bucket_name, dns_label, short_id, validate_object_key
from cmbcluster_aws.errors import aws_errors, error_code, map_aws_error
from cmbcluster_aws.settings import AwsSettings

__all__ = ["S3Storage", "map_aws_error"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
SPOOL_IN_MEMORY = MiB  # a part being filled moves from memory to a temporary file past this
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
UPLOAD_PARTS_IN_FLIGHT = 4  # parts of one upload sent at once (boto3's transfer manager sends 10)
PART_GROWTH_EVERY = 1_000  # parts; see S3Storage._part_size
DELETE_BATCH = 1_000  # DeleteObjects takes at most 1000 keys
MAX_LIST_KEYS = 1_000  # ListObjectsV2 returns at most 1000 keys per page
CREATE_ATTEMPTS = 5

TAG_OWNER = "owner"
TAG_MANAGED_BY = "managed-by"
TAG_DISPLAY_NAME = "cmbcluster-display-name"
TAG_STORAGE_CLASS = "cmbcluster-storage-class"
MANAGED_BY = "cmbcluster"
TAG_VALUE_MAX = 256
DISPLAY_NAME_MAX_TAGS = 8  # continuation tags: cmbcluster-display-name-2 ... -8

#: The portable classes S3 offers and the S3 StorageClass each maps to.
S3_STORAGE_CLASSES: dict[StorageClass, str] = {
    StorageClass.STANDARD: "STANDARD",
    StorageClass.INFREQUENT: "STANDARD_IA",
    StorageClass.AUTO: "INTELLIGENT_TIERING",
    StorageClass.COLD: "GLACIER_IR",
}
_PORTABLE_CLASSES = {v: k for k, v in S3_STORAGE_CLASSES.items()}

CSI_DRIVER = "s3.csi.aws.com"
NOMINAL_CAPACITY = "1200Gi"  # ignored by Mountpoint; Kubernetes requires a value

_S3_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IAM_ROLE_ARN = re.compile(r"^arn:(aws[a-z-]*):iam::\d{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")
_TAG_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-._:/@")
_ESCAPE = re.compile(r"=([0-9A-F]{2})")


# -- tag values ----------------------------------------------------------------------------------
def _encode_char(ch: str) -> str:
    return ch if ch in _TAG_SAFE else "".join(f"={b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def encode_tag_value(text: str) -> str:
    """``text`` in the S3 tag character set, reversibly: other characters (and '=') become ``=HH``
    per UTF-8 byte, so "Maps & spectra" is stored as "Maps =26 spectra". Spaces at either end
    are escaped too, as services trim them."""
    parts = [_encode_char(ch) for ch in text]
    if parts and parts[0] == " ":
        parts[0] = "=20"
    if parts and parts[-1] == " ":
        parts[-1] = "=20"
    return "".join(parts)


def decode_tag_value(value: str) -> str:
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(value):
        raw += value[pos : match.start()].encode("utf-8")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += value[pos:].encode("utf-8")
    return raw.decode("utf-8", "surrogatepass")


def _split_tag_value(text: str) -> list[str]:
    """``text`` encoded as tag values of at most 256 characters each (each decodes on its own)."""
    pieces: list[str] = []
    current: list[str] = []
    budget = 0
    for ch in text:
        cost = 3 if ch == " " else len(_encode_char(ch))  # a space may end up escaped at an edge
        if current and budget + cost > TAG_VALUE_MAX:
            pieces.append(encode_tag_value("".join(current)))
            current, budget = [], 0
        current.append(ch)
        budget += cost
    if current or not pieces:
        pieces.append(encode_tag_value("".join(current)))
    return pieces


def _display_name_key(index: int) -> str:
    return TAG_DISPLAY_NAME if index == 0 else f"{TAG_DISPLAY_NAME}-{index + 1}"


def _version_id(entry: dict[str, Any]) -> dict[str, str]:
    ident = {"Key": str(entry["Key"])}
    if entry.get("VersionId"):
        ident["VersionId"] = str(entry["VersionId"])
    return ident


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _guess_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


class S3Storage(StorageBackend):
    """:class:`~cmbcluster.interfaces.StorageBackend` on Amazon S3 (or an S3-compatible endpoint).

    ``client`` replaces the boto3 client (tests); the other keyword arguments tune the client
    built from ``settings`` and the multipart part size.
    """

    def __init__(
        self,
        settings: AwsSettings,
        *,
        client: Any | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 32,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes")
        self.settings = settings
        self.region = settings.aws_region
        self.part_size = part_size
        self._class_cache: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        if client is None:
            config = Config(
                region_name=settings.aws_region,
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max_pool_connections,
                # S3-compatible endpoints (moto, MinIO) rarely resolve <bucket>.<host>.
                s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
                user_agent_extra="cmbcluster",
            )
            client = boto3.session.Session().client(
                "s3", region_name=settings.aws_region, endpoint_url=settings.endpoint_url, config=config
            )
        self._client: Any = client

    # -- buckets -----------------------------------------------------------------------------
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        s3_class = self._s3_class(options.storage_class)
        versioning = self.settings.s3_versioning if options.versioning is None else options.versioning
        tags = self._bucket_tags(owner, options, s3_class)
        name = self._create_unique_bucket(owner)
        try:
            self._configure_bucket(name, versioning=versioning, tags=tags)
        except BaseException as exc:
            self._discard_bucket(name)
            if isinstance(exc, (ClientError, BotoCoreError)):
                raise map_aws_error(exc, f"configuring bucket {name}") from exc
            raise
        self._remember_class(name, s3_class)
        return BucketInfo(
            name=name,
            owner_id=owner.id,
            display_name=options.display_name,
            storage_class=options.storage_class,
            created_at=dt.datetime.now(dt.UTC),
            location=self.region,
            versioning=versioning,
            labels=self._labels(tags),
        )

    def _create_unique_bucket(self, owner: UserRef) -> str:
        kwargs: dict[str, Any] = {"ObjectOwnership": "BucketOwnerEnforced"}  # ACLs disabled
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        for _ in range(CREATE_ATTEMPTS):
            name = bucket_name(self.settings.s3_user_bucket_prefix, owner.id)
            try:
                self._client.create_bucket(Bucket=name, **kwargs)
            except ClientError as exc:
                if error_code(exc) in (
                    "BucketAlreadyExists",
                    "BucketAlreadyOwnedByYou",
                ):  # a name collision: pick another
                    continue
                raise map_aws_error(exc, f"creating bucket {name}") from exc
            except BotoCoreError as exc:
                raise map_aws_error(exc, f"creating bucket {name}") from exc
            return name
        raise Conflict(f"could not find a free bucket name after {CREATE_ATTEMPTS} attempts")

    def _configure_bucket(self, name: str, *, versioning: bool, tags: dict[str, str]) -> None:
        client = self._client
        client.put_public_access_block(
            Bucket=name,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
        if self.settings.s3_kms_key_id:
            rule: dict[str, Any] = {
                "ApplyServerSideEncryptionByDefault": {
                    "SSEAlgorithm": "aws:kms",
                    "KMSMasterKeyID": self.settings.s3_kms_key_id,
                },
                "BucketKeyEnabled": True,
            }
        else:
            rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
        client.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": [rule]})
        if versioning:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        client.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})

    def _discard_bucket(self, name: str) -> None:
        """Remove a bucket that could not be configured; it is new, so it holds nothing."""
        try:
            self._client.delete_bucket(Bucket=name)
        except (ClientError, BotoCoreError):
            log.exception("could not delete the half-configured bucket %s; delete it by hand", name)

    def _bucket_tags(self, owner: UserRef, options: BucketOptions, s3_class: str) -> dict[str, str]:
        pieces = _split_tag_value(options.display_name)
        if len(pieces) > DISPLAY_NAME_MAX_TAGS:
            raise InvalidRequest("the bucket's display name is too long")
        tags = {
            TAG_OWNER: encode_tag_value(owner.id),
            TAG_MANAGED_BY: MANAGED_BY,
            TAG_STORAGE_CLASS: s3_class,
        }
        for index, piece in enumerate(pieces):
            tags[_display_name_key(index)] = piece
        return tags

    @staticmethod
    def _labels(tags: dict[str, str]) -> dict[str, str]:
        labels = {k: v for k, v in tags.items() if not k.startswith(TAG_DISPLAY_NAME)}
        if TAG_OWNER in labels:
            labels[TAG_OWNER] = decode_tag_value(labels[TAG_OWNER])
        return labels

    @staticmethod
    def _s3_class(storage_class: StorageClass) -> str:
        try:
            return S3_STORAGE_CLASSES[storage_class]
        except KeyError:
            offered = ", ".join(str(c) for c in S3_STORAGE_CLASSES)
            raise InvalidRequest(
                f"S3 does not offer the {storage_class} storage class; choose one of {offered}"
            ) from None

    def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
        self._check_bucket_name(bucket)
        tags = self._read_tags(bucket)
        if tags.get(TAG_MANAGED_BY) != MANAGED_BY:
            raise PermissionDenied(f"bucket {bucket} is not managed by CMBCluster; it is left untouched")
        with aws_errors(f"bucket {bucket}"):
            if not force:
                listing = self._client.list_objects_v2(Bucket=bucket, MaxKeys=1)
                if listing.get("KeyCount", 0) or listing.get("Contents"):
                    raise Conflict(f"bucket {bucket} is not empty; delete its objects first or use force")
                # What is left is invisible to the user: earlier versions and delete markers.
                self._purge_versions(bucket, current_too=False)
            else:
                self._purge_versions(bucket, current_too=True)
                self._abort_multipart_uploads(bucket)
            try:
                self._client.delete_bucket(Bucket=bucket)
            except ClientError as exc:
                if error_code(exc) != "BucketNotEmpty":
                    raise
                raise Conflict(f"bucket {bucket} is not empty (objects were written while it was deleted)") from exc
        self._forget_class(bucket)

    def _purge_versions(self, bucket: str, *, current_too: bool) -> None:
        """Delete every version and delete marker (``current_too``), or only what the user no
        longer sees: non-current versions, then delete markers.

        Markers go last so that no older version becomes current again (a deleted object would
        reappear) while the purge is under way.
        """
        if current_too:
            self._delete_listed(bucket, lambda page: [*page.get("Versions", []), *page.get("DeleteMarkers", [])])
        else:
            self._delete_listed(bucket, lambda page: [v for v in page.get("Versions", []) if not v.get("IsLatest")])
            self._delete_listed(bucket, lambda page: list(page.get("DeleteMarkers", [])))

    def _delete_listed(self, bucket: str, select: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        """Page through the bucket's versions, deleting what ``select`` picks from each page.

        A page is deleted only once the next one has been fetched: the page marker names the
        last entry listed, which must still exist (S3 does not mind, moto does).
        """
        paginator = self._client.get_paginator("list_object_versions")
        pending: list[dict[str, str]] = []
        for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": DELETE_BATCH}):
            if pending:
                self._delete_batch(bucket, pending)
            pending = [_version_id(entry) for entry in select(page)]
        if pending:
            self._delete_batch(bucket, pending)

    def _abort_multipart_uploads(self, bucket: str) -> None:
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                try:
                    self._client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                except ClientError as exc:
                    if error_code(exc) != "NoSuchUpload":
                        raise

    def get_bucket(self, bucket: str) -> BucketInfo:
        self._check_bucket_name(bucket)
        tags = self._read_tags(bucket)
        if tags.get(TAG_MANAGED_BY) != MANAGED_BY:
            raise NotFound(f"bucket {bucket} not found")
        listed = None
        for entry in self._listed_buckets(bucket):
            if entry["Name"] == bucket:
                listed = entry
                break
        if listed is None:
            raise NotFound(f"bucket {bucket} not found")
        return self._bucket_info(bucket, tags, listed)

    def _bucket_info(self, bucket: str, tags: dict[str, str], listed: dict[str, Any]) -> BucketInfo:
        with aws_errors(f"bucket {bucket}"):
            status = self._client.get_bucket_versioning(Bucket=bucket).get("Status")
        s3_class = tags.get(TAG_STORAGE_CLASS, "STANDARD")
        self._remember_class(bucket, s3_class)
        pieces = []
        for index in range(DISPLAY_NAME_MAX_TAGS):
            piece = tags.get(_display_name_key(index))
            if piece is None:
                break
            pieces.append(piece)
        created = listed.get("CreationDate")
        if not isinstance(created, dt.datetime):
            created = dt.datetime.fromtimestamp(0, dt.UTC)
        return BucketInfo(
            name=bucket,
            owner_id=decode_tag_value(tags.get(TAG_OWNER, "")),
            display_name="".join(decode_tag_value(p) for p in pieces),
            storage_class=_PORTABLE_CLASSES.get(s3_class, StorageClass.STANDARD),
            created_at=created.astimezone(dt.UTC),
            location=str(listed.get("BucketRegion") or self.region),
            versioning=status == "Enabled",
            labels=self._labels(tags),
        )

    def list_buckets(self, owner: UserRef) -> list[BucketInfo]:
        # Names embed the owner (see cmbcluster.naming.bucket_name): filter by name first, then
        # trust only the owner tag.
        name_prefix = f"{self.settings.s3_user_bucket_prefix.rstrip('-')}-{short_id(owner.id)}-"
        owner_tag = encode_tag_value(owner.id)
        infos: list[BucketInfo] = []
        for entry in self._listed_buckets(name_prefix):
            name = entry["Name"]
            try:
                tags = self._read_tags(name)
                if tags.get(TAG_MANAGED_BY) != MANAGED_BY or tags.get(TAG_OWNER) != owner_tag:
                    continue
                infos.append(self._bucket_info(name, tags, entry))
            except NotFound:  # deleted while we listed
                continue
        return sorted(infos, key=lambda i: (i.created_at, i.name))

    def _listed_buckets(self, prefix: str) -> Iterator[dict[str, Any]]:
        """ListBuckets entries whose name starts with ``prefix`` (filtered here as well, for
        S3-compatible services that ignore the Prefix parameter)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, "MaxBuckets": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            with aws_errors("listing buckets"):
                page = self._client.list_buckets(**kwargs)
            for entry in page.get("Buckets", []):
                if str(entry.get("Name", "")).startswith(prefix):
                    yield entry
            token = page.get("ContinuationToken")
            if not token:
                return

    def _read_tags(self, bucket: str) -> dict[str, str]:
        try:
            response = self._client.get_bucket_tagging(Bucket=bucket)
        except ClientError as exc:
            if error_code(exc) == "NoSuchTagSet":
                return {}
            raise map_aws_error(exc, f"bucket {bucket}") from exc
        except BotoCoreError as exc:
            raise map_aws_error(exc, f"bucket {bucket}") from exc
        return {tag["Key"]: tag["Value"] for tag in response.get("TagSet", [])}

    def bucket_usage(self, bucket: str) -> BucketUsage:
        self._check_bucket_name(bucket)
        size = count = 0
        with aws_errors(f"bucket {bucket}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    size += int(obj.get("Size", 0))
                    count += 1
        return BucketUsage(size_bytes=size, object_count=count)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        """A static PersistentVolume and its claim: Mountpoint for S3 has no inline volumes.

        The claim carries no namespace: the compute backend creates it in the environment's
        namespace and sets ``spec.claimRef.namespace`` of the volume to the same.
        """
        self._check_bucket_name(request.bucket)
        subpath = request.subpath.strip("/")
        if subpath:
            validate_object_key(subpath)
        digest = hashlib.sha256(
            "\0".join((request.bucket, request.environment_id, request.mount_path, subpath)).encode()
        ).hexdigest()[:16]
        env = short_id(request.environment_id, 12)
        name = dns_label("cmbcluster-s3", env, digest)
        labels = {
            "app.kubernetes.io/managed-by": "cmbcluster",
            "cmbcluster.io/user-id": dns_label(request.user.id),
            "cmbcluster.io/environment-id": dns_label(request.environment_id),
        }
        mount_options = ["read-only"] if request.read_only else ["allow-delete"]
        mount_options += [
            f"region {self.region}",
            f"uid={request.uid}",
            f"gid={request.gid}",
            "allow-other",
        ]
        if subpath:
            mount_options.append(f"prefix {subpath}/")
        access_mode = "ReadOnlyMany" if request.read_only else "ReadWriteMany"
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": dict(labels)},
            "spec": {
                "capacity": {"storage": NOMINAL_CAPACITY},
                "accessModes": [access_mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "mountOptions": mount_options,
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": name},
                "csi": {
                    "driver": CSI_DRIVER,
                    "volumeHandle": f"{request.bucket}-{env}-{digest}",
                    "volumeAttributes": {"bucketName": request.bucket},
                },
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": dict(labels)},
            "spec": {
                "accessModes": [access_mode],
                "storageClassName": "",
                "volumeName": name,
                "resources": {"requests": {"storage": NOMINAL_CAPACITY}},
            },
        }
        return VolumeSpec(
            volume={"name": name, "persistentVolumeClaim": {"claimName": name}},
            mount={"name": name, "mountPath": request.mount_path, "readOnly": request.read_only},
            objects=[pv, pvc],
        )

    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        self._check_bucket_name(bucket)
        if not _IAM_ROLE_ARN.match(identity.principal):
            raise InvalidRequest(f"{identity.principal!r} is not an IAM role ARN")
        policy = json.dumps(bucket_policy(bucket, identity.principal))
        with aws_errors(f"bucket {bucket}"):
            self._client.put_bucket_policy(Bucket=bucket, Policy=policy)

    # -- objects -----------------------------------------------------------------------------
    def list_objects(
        self,
        bucket: str,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        page_token: str | None = None,
        page_size: int = 1000,
    ) -> ObjectPage:
        self._check_bucket_name(bucket)
        check_listing(prefix, delimiter, page_size)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": min(page_size, MAX_LIST_KEYS)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if page_token:
            kwargs["ContinuationToken"] = page_token
        with aws_errors(f"bucket {bucket}"):
            page = self._client.list_objects_v2(**kwargs)
        objects = [
            ObjectInfo(
                key=obj["Key"],
                size=int(obj.get("Size", 0)),
                last_modified=obj["LastModified"],
                etag=_strip_etag(obj.get("ETag")),
                content_type=_guess_type(obj["Key"]),
            )
            for obj in page.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        next_token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return ObjectPage(objects=objects, prefixes=prefixes, next_token=next_token or None)

    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return self._head(bucket, key)[0]

    def _head(self, bucket: str, key: str) -> tuple[ObjectInfo, dict[str, Any]]:
        self._check_bucket_name(bucket)
        validate_object_key(key)
        with aws_errors(f"object {key}"):
            head = self._client.head_object(Bucket=bucket, Key=key)
        info = ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", 0)),
            last_modified=head["LastModified"],
            etag=_strip_etag(head.get("ETag")),
            content_type=head.get("ContentType") or "application/octet-stream",
        )
        return info, head

    def upload_object(
        self,
        bucket: str,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str | None = None,
    ) -> ObjectInfo:
        self._check_bucket_name(bucket)
        validate_object_key(key)
        params = {
            "Bucket": bucket,
            "Key": key,
            "ContentType": content_type or _guess_type(key),
            "StorageClass": self._upload_class(bucket),
        }
        upload_id: str | None = None
        # Each full part waits in its own temporary file while it goes up, so the server's memory
        # stays flat (one source chunk) whatever the part size. Up to UPLOAD_PARTS_IN_FLIGHT parts
        # go up at once, as boto3's transfer manager does (one at a time, S3 and moto alike give
        # half the bandwidth); the source waits while that many are in flight, so disk use stays
        # bounded too.
        in_flight: list[tuple[_PartSpool, concurrent.futures.Future[dict[str, Any]]]] = []
        parts: list[dict[str, Any]] = []
        number = 0
        spool = _PartSpool()
        pool = concurrent.futures.ThreadPoolExecutor(UPLOAD_PARTS_IN_FLIGHT, thread_name_prefix="cmbcluster-s3-part")

        def settle(limit: int) -> None:
            while len(in_flight) > limit:
                done_spool, future = in_flight.pop(0)
                try:
                    parts.append(future.result())
                finally:
                    done_spool.close()

        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    size = self._part_size(number + 1)
                    if spool.size == size:
                        # Strictly more than a part: the last part is never empty, and an object
                        # of exactly one part goes up in a single PutObject.
                        if upload_id is None:
                            upload_id = self._client.create_multipart_upload(**params)["UploadId"]
                        number += 1
                        settle(UPLOAD_PARTS_IN_FLIGHT - 1)
                        future = pool.submit(self._upload_part, bucket, key, upload_id, number, spool.body())
                        in_flight.append((spool, future))
                        spool = _PartSpool()
                    view = view[spool.write(view[: size - spool.size]) :]
            if upload_id is None:
                self._client.put_object(Body=spool.body(), **params)
            else:
                number += 1
                parts_done = self._upload_part(bucket, key, upload_id, number, spool.body())
                settle(0)
                parts.append(parts_done)
                self._client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as exc:
            for _, future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)  # nothing may still be sending when the upload is aborted
            if upload_id is not None:
                self._abort_upload(bucket, key, upload_id)
            if isinstance(exc, (ClientError, BotoCoreError)):
                raise map_aws_error(exc, f"object {key}") from exc
            raise  # the caller's own error (a broken stream): re-raised as it is
        finally:
            pool.shutdown(wait=True)
            spool.close()
            for leftover, _ in in_flight:
                leftover.close()
        return self.head_object(bucket, key)

    def _part_size(self, part_number: int) -> int:
        """Parts grow by one base size every 1000 parts, so 10,000 parts of an 8 MiB base hold
        430 GiB while the buffer stays bounded (at most 10 base parts)."""
        if part_number > MAX_PARTS:
            raise PayloadTooLarge(f"object exceeds the {MAX_PARTS} parts S3 allows")
        return min(self.part_size * (1 + (part_number - 1) // PART_GROWTH_EVERY), MAX_PART_SIZE)

    def _upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: IO[bytes]) -> dict[str, Any]:
        response = self._client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        for checksum in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"):
            if response.get(checksum):
                part[checksum] = response[checksum]
        return part

    def _abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            # The bucket's lifecycle (or a later force delete) cleans it up; the caller gets the
            # original error, which matters more.
            log.warning("could not abort multipart upload %s of %s/%s", upload_id, bucket, key, exc_info=True)

    def download_object(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        chunk_size: int = 1024 * 1024,
    ) -> Iterator[bytes]:
        if chunk_size < 1:
            raise InvalidRequest("chunk_size must be at least 1")
        info, head = self._head(bucket, key)  # NotFound here, before any chunk
        start, end = resolve_byte_range(byte_range, info.size)
        if end <= start:
            return iter(())
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if head.get("ETag"):
            kwargs["IfMatch"] = head["ETag"]  # the object we measured, not one written since
        if (start, end) != (0, info.size):
            kwargs["Range"] = f"bytes={start}-{end - 1}"
        with aws_errors(f"object {key}"):
            body = self._client.get_object(**kwargs)["Body"]
        return _stream(body, chunk_size, f"object {key}")

    def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        self._check_bucket_name(bucket)
        unique = list(dict.fromkeys(validate_object_key(k) for k in keys))
        if not unique:
            return
        with aws_errors(f"bucket {bucket}"):
            self._delete_batch(bucket, [{"Key": k} for k in unique])

    def _delete_batch(self, bucket: str, identifiers: list[dict[str, str]]) -> None:
        for i in range(0, len(identifiers), DELETE_BATCH):
            response = self._client.delete_objects(
                Bucket=bucket, Delete={"Objects": identifiers[i : i + DELETE_BATCH], "Quiet": True}
            )
            errors = [e for e in response.get("Errors", []) if e.get("Code") not in ("NoSuchKey", "NoSuchVersion")]
            if errors:
                first = errors[0]
                fake = ClientError(
                    {"Error": {"Code": first.get("Code", ""), "Message": first.get("Message", "")}}, "DeleteObjects"
                )
                error = map_aws_error(fake, f"object {first.get('Key', '')}")
                error.detail = {"errors": errors}
                raise error

    # -- operations --------------------------------------------------------------------------
    def check_ready(self) -> None:
        try:
            self._client.list_buckets(MaxBuckets=1, Prefix=self.settings.s3_user_bucket_prefix)
        except (ClientError, BotoCoreError) as exc:
            error = map_aws_error(exc, "S3")
            raise ProviderUnavailable(f"S3 is not ready: {error.message}", detail=error.detail) from exc

    def close(self) -> None:
        self._client.close()

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _check_bucket_name(bucket: str) -> None:
        """Names S3 cannot hold do not exist (and must not reach botocore as a path)."""
        if not _S3_BUCKET_NAME.match(bucket or ""):
            raise NotFound(f"bucket {bucket} not found")

    def _upload_class(self, bucket: str) -> str:
        with self._cache_lock:
            cached = self._class_cache.get(bucket)
        if cached is None:
            cached = self._read_tags(bucket).get(TAG_STORAGE_CLASS, "STANDARD")
            if cached not in _PORTABLE_CLASSES:
                cached = "STANDARD"
            self._remember_class(bucket, cached)
        return cached

    def _remember_class(self, bucket: str, s3_class: str) -> None:
        with self._cache_lock:
            if len(self._class_cache) >= 10_000:
                self._class_cache.clear()
            self._class_cache[bucket] = s3_class

    def _forget_class(self, bucket: str) -> None:
        with self._cache_lock:
            self._class_cache.pop(bucket, None)


class _PartSpool:
    """The part being filled: in memory while small (most objects), in an anonymous temporary
    file past :data:`SPOOL_IN_MEMORY`."""

    def __init__(self) -> None:
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None
        self.size = 0

    def write(self, data: memoryview) -> int:
        if self._file is None:  # closed by close()
            self._file = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, prefix="cmbcluster-s3-part-")  # noqa: SIM115
        written = self._file.write(data)
        self.size += written
        return written

    def body(self) -> IO[bytes]:
        """The part, from its start (botocore reads it to the end and seeks back to retry)."""
        if self._file is None:
            return io.BytesIO(b"")
        self._file.flush()
        self._file.seek(0)
        return self._file

    def clear(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self.size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def bucket_policy(bucket: str, principal: str) -> dict[str, Any]:
    """TLS only; read/write on the objects (and listing) for ``principal`` (a role ARN) alone."""
    match = _IAM_ROLE_ARN.match(principal)
    partition = match.group(1) if match else "aws"  # aws-cn, aws-us-gov: the role's partition
    bucket_arn = f"arn:{partition}:s3:::{bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [bucket_arn, f"{bucket_arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "CmbclusterUserList",
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": "s3:ListBucket",
                "Resource": bucket_arn,
            },
            {
                "Sid": "CmbclusterUserObjects",
                "Effect": "Allow",
                "Principal": {"AWS": principal},
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": f"{bucket_arn}/*",
            },
        ],
    }


def _stream(body: Any, chunk_size: int, what: str) -> Iterator[bytes]:
    try:
        with aws_errors(what):
            for chunk in body.iter_chunks(chunk_size):
                if chunk:
                    yield chunk
    finally:
        body.close()
