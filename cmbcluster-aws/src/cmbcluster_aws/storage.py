"""Amazon S3 storage: one private, encrypted, tagged bucket per user bucket, mounted with Mountpoint.

Every botocore failure passes through :func:`map_aws_error`, the one place that turns AWS error
codes into CMBCluster's typed errors. boto3 comes in through this module's imports only (the plugin
imports it lazily), so installing the plugin costs nothing until S3 is the configured storage backend.

S3 has no bucket-level storage class: the class a user chooses is recorded in the bucket's
``cmbcluster-storage-class`` tag and applied to every object uploaded through CMBCluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import mimetypes
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
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
from cmbcluster.naming import dns_label, owner_name_prefix, short_id, validate_object_key
from cmbcluster_aws import uploads
from cmbcluster_aws.clients import IAM_PROPAGATION_SECONDS, invalid_principal, make_clients, retry_while_propagating
from cmbcluster_aws.errors import aws_errors, error_code, map_aws_error
from cmbcluster_aws.identity import ROLE_ANNOTATION
from cmbcluster_aws.names import S3_BUCKET_NAMES
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.tags import (
    MANAGED_BY,
    TAG_DEPLOYMENT,
    TAG_MANAGED_BY,
    TAG_OWNER,
    TAG_STORAGE_CLASS,
    decode_tag_value,
    display_name_of,
    display_name_tags,
    encode_tag_value,
    is_display_name_tag,
)

__all__ = ["S3Storage", "map_aws_error"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DELETE_BATCH = 1_000  # DeleteObjects takes at most 1000 keys
#: What a key cannot be written as in DeleteObjects' XML request: characters XML 1.0 forbids (S3 answers
#: MalformedXML), and a carriage return, which an XML parser reads as a line feed (another key). A file
#: written through a mounted bucket may have any of them in its name.
_NOT_IN_XML = re.compile("[\x00-\x08\x0b-\x1f\ufffe\uffff]")
MAX_LIST_KEYS = 1_000  # ListObjectsV2 returns at most 1000 keys per page
CREATE_ATTEMPTS = 5
#: Days after which S3 aborts a multipart upload that was never completed (its parts are billed).
ABORT_INCOMPLETE_UPLOAD_DAYS = 1


def lifecycle_rules(noncurrent_days: int) -> list[dict[str, Any]]:
    """The lifecycle of every CMBCluster bucket: unfinished multipart uploads aborted after
    :data:`ABORT_INCOMPLETE_UPLOAD_DAYS`; earlier versions of overwritten or deleted objects expired
    ``noncurrent_days`` after they stopped being current (S3's smallest period is a day, so 0, which
    creates buckets without versioning, expires any left from earlier settings after one), and delete
    markers with no version left behind them removed."""
    return [
        {
            "ID": "cmbcluster-abort-incomplete-uploads",
            "Status": "Enabled",
            "Filter": {},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_UPLOAD_DAYS},
        },
        {
            "ID": "cmbcluster-expire-noncurrent-versions",
            "Status": "Enabled",
            "Filter": {},
            "NoncurrentVersionExpiration": {"NoncurrentDays": max(noncurrent_days, 1)},
            "Expiration": {"ExpiredObjectDeleteMarker": True},
        },
    ]


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

_IAM_ROLE_ARN = re.compile(r"^arn:(aws[a-z-]*):iam::\d{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")


def _version_id(entry: dict[str, Any]) -> dict[str, str]:
    ident = {"Key": str(entry["Key"])}
    if entry.get("VersionId"):
        ident["VersionId"] = str(entry["VersionId"])
    return ident


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


def _etag_md5(etag: str, encryption: str | None) -> str | None:
    """The object's MD5 when its ETag is one: stored in one part (a multipart ETag ends in
    ``-N``) and not encrypted with KMS (whose ETags are no MD5). ``encryption`` is the object's
    ``ServerSideEncryption``, as a HEAD reports it."""
    if encryption is not None and encryption.startswith("aws:kms"):
        return None
    return etag.lower() if _PLAIN_MD5.match(etag.lower()) else None


def _guess_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


class S3Storage(StorageBackend):
    """:class:`~cmbcluster.interfaces.StorageBackend` on Amazon S3 (or an S3-compatible endpoint).

    ``client`` replaces the boto3 client (tests); the other keyword arguments tune the client
    built from ``settings`` and the multipart part size.
    """

    bucket_names = S3_BUCKET_NAMES

    def __init__(
        self,
        settings: AwsSettings,
        *,
        client: Any | None = None,
        part_size: int = uploads.DEFAULT_PART_SIZE,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 32,
        propagation_seconds: float = IAM_PROPAGATION_SECONDS,
    ) -> None:
        if not uploads.MIN_PART_SIZE <= part_size <= uploads.MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {uploads.MIN_PART_SIZE} and {uploads.MAX_PART_SIZE} bytes")
        problem = self.bucket_names.prefix_problem(settings.s3_user_bucket_prefix)
        if problem is not None:  # refused here, by `config check` too, not at a user's first bucket
            raise ConfigurationError([f"S3_USER_BUCKET_PREFIX: {problem}"])
        self.settings = settings
        self.region = settings.aws_region
        self.part_size = part_size
        self.propagation_seconds = propagation_seconds
        self._class_cache: dict[str, str] = {}
        self._kms_default: dict[str, bool] = {}  # bucket -> encrypted with KMS by default
        self._cache_lock = threading.Lock()
        if client is None:
            client = make_clients(
                settings, ["s3"], max_attempts=max_attempts, connect_timeout=connect_timeout,
                read_timeout=read_timeout, max_pool_connections=max_pool_connections,
                # S3-compatible endpoints (moto, MinIO) rarely resolve <bucket>.<host>.
                s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
            )["s3"]  # fmt: skip
        self._client: Any = client

    # -- buckets -----------------------------------------------------------------------------
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        s3_class = self._s3_class(options.storage_class)
        versioning = self.default_versioning if options.versioning is None else options.versioning
        tags = self._bucket_tags(owner, options, s3_class)
        name = self._create_unique_bucket(owner)
        try:
            self.configure_bucket(name, versioning=versioning, tags=tags)
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
            name = self.bucket_names.new_name(self.settings.s3_user_bucket_prefix, owner.id)
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

    @property
    def default_versioning(self) -> bool:
        """Versioning of new buckets: S3_VERSIONING, unless no noncurrent version is to be kept."""
        return self.settings.s3_versioning and self.settings.s3_noncurrent_version_days > 0

    def configure_bucket(self, name: str, *, versioning: bool, tags: dict[str, str]) -> None:
        """What every CMBCluster bucket gets, users' and the deployment's database bucket alike (the
        provisioner calls it too): all public access blocked, encryption (S3_KMS_KEY_ID's key, else
        AES256), versioning when asked, :func:`lifecycle_rules`, and ``tags``."""
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
        client.put_bucket_lifecycle_configuration(
            Bucket=name,
            LifecycleConfiguration={"Rules": lifecycle_rules(self.settings.s3_noncurrent_version_days)},
        )
        client.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})

    def _discard_bucket(self, name: str) -> None:
        """Remove a bucket that could not be configured; it is new, so it holds nothing."""
        try:
            self._client.delete_bucket(Bucket=name)
        except (ClientError, BotoCoreError):
            log.exception("could not delete the half-configured bucket %s; delete it by hand", name)

    def _bucket_tags(self, owner: UserRef, options: BucketOptions, s3_class: str) -> dict[str, str]:
        return {
            TAG_OWNER: encode_tag_value(owner.id),
            TAG_MANAGED_BY: MANAGED_BY,
            TAG_DEPLOYMENT: self.settings.deployment,
            TAG_STORAGE_CLASS: s3_class,
            **display_name_tags(options.display_name),
        }

    @staticmethod
    def _labels(tags: dict[str, str]) -> dict[str, str]:
        labels = {k: v for k, v in tags.items() if not is_display_name_tag(k)}
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

    def owner_of(self, bucket: str) -> str | None:
        """The user whose bucket CMBCluster made ``bucket`` for (its tags say so), else None; NotFound
        when it does not exist."""
        self._check_bucket_name(bucket)
        tags = self._read_tags(bucket)
        owner = tags.get(TAG_OWNER)
        return decode_tag_value(owner) if owner and tags.get(TAG_MANAGED_BY) == MANAGED_BY else None

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
                self.abort_unfinished_uploads(bucket, started_before=dt.datetime.max.replace(tzinfo=dt.UTC))
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

    def abort_unfinished_uploads(self, bucket: str, *, started_before: dt.datetime, key: str | None = None) -> int:
        self._check_bucket_name(bucket)
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if key is not None:
            kwargs["Prefix"] = validate_object_key(key)
        aborted = 0
        with aws_errors(f"bucket {bucket}"):
            for page in self._client.get_paginator("list_multipart_uploads").paginate(**kwargs):
                for upload in page.get("Uploads", []):
                    if (key is not None and upload["Key"] != key) or upload["Initiated"] >= started_before:
                        continue
                    try:
                        self._client.abort_multipart_upload(
                            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except ClientError as exc:
                        if error_code(exc) != "NoSuchUpload":  # finished or aborted meanwhile
                            raise
                        continue
                    aborted += 1
        return aborted

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
        created = listed.get("CreationDate")
        if not isinstance(created, dt.datetime):
            created = dt.datetime.fromtimestamp(0, dt.UTC)
        return BucketInfo(
            name=bucket,
            owner_id=decode_tag_value(tags.get(TAG_OWNER, "")),
            display_name=display_name_of(tags),
            storage_class=_PORTABLE_CLASSES.get(s3_class, StorageClass.STANDARD),
            created_at=created.astimezone(dt.UTC),
            location=str(listed.get("BucketRegion") or self.region),
            versioning=status == "Enabled",
            labels=self._labels(tags),
        )

    def list_buckets(self, owner: UserRef) -> list[BucketInfo]:
        # Names embed the owner (BucketNameRules.new_name): filter by name first, then trust only
        # the owner tag.
        name_prefix = owner_name_prefix(self.settings.s3_user_bucket_prefix, owner.id)
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
        """Current objects and noncurrent versions, from one listing of every version (delete
        markers store nothing). A bucket that was never versioned lists its objects as current
        versions, so the figures are right either way."""
        self._check_bucket_name(bucket)
        size = count = old_size = old_count = 0
        with aws_errors(f"bucket {bucket}"):
            for page in self._client.get_paginator("list_object_versions").paginate(Bucket=bucket):
                for version in page.get("Versions", []):
                    if version.get("IsLatest"):
                        size += int(version.get("Size", 0))
                        count += 1
                    else:
                        old_size += int(version.get("Size", 0))
                        old_count += 1
        return BucketUsage(size_bytes=size, object_count=count, noncurrent_bytes=old_size, noncurrent_count=old_count)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        """A static PersistentVolume and its claim: Mountpoint for S3 has no inline volumes.

        The claim carries no namespace: the compute backend creates it in the environment's
        namespace and sets ``spec.claimRef.namespace`` of the volume to the same. With
        ``S3_MOUNT_CREDENTIALS=pod`` (the default) and the user's IRSA role as
        ``request.identity``, the volume has ``authenticationSource: pod`` and ``stsRegion``: the
        driver mounts the bucket with the pod's ServiceAccount, the user's role (which reaches their
        buckets only), so its own role needs no access to users' buckets.
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
                    "volumeAttributes": {"bucketName": request.bucket, **self._mount_credentials(request)},
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
        what = f"bucket {bucket}"
        with aws_errors(what):
            # A user's role is often made just before (their first start): S3 refuses it as a principal
            # until IAM has propagated it, so that answer is retried for IAM's propagation window.
            retry_while_propagating(
                lambda: self._client.put_bucket_policy(Bucket=bucket, Policy=policy),
                pending=invalid_principal, what=what, window=self.propagation_seconds,
            )  # fmt: skip

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
        # A listing does not say how an object is encrypted: the bucket's default says.
        encryption = "aws:kms" if self._encrypts_with_kms(bucket) else None
        objects = [
            ObjectInfo(
                key=obj["Key"],
                size=int(obj.get("Size", 0)),
                last_modified=obj["LastModified"],
                etag=_strip_etag(obj.get("ETag")),
                content_type=_guess_type(obj["Key"]),
                md5=_etag_md5(_strip_etag(obj.get("ETag")), encryption),
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
            md5=None
            if head.get("SSECustomerAlgorithm")
            else _etag_md5(_strip_etag(head.get("ETag")), head.get("ServerSideEncryption")),
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
        uploads.upload(self._client, chunks, params=params, base_part_size=self.part_size)
        return self.head_object(bucket, key)

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
        batched = []
        for identifier in identifiers:
            if not _NOT_IN_XML.search(identifier["Key"]):
                batched.append(identifier)
                continue
            try:  # one request, the key in the URL
                self._client.delete_object(Bucket=bucket, **identifier)
            except ClientError as exc:
                if error_code(exc) not in ("NoSuchKey", "NoSuchVersion"):  # gone already, as a batch says
                    raise
        for i in range(0, len(batched), DELETE_BATCH):
            response = self._client.delete_objects(
                Bucket=bucket, Delete={"Objects": batched[i : i + DELETE_BATCH], "Quiet": True}
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
    def _mount_credentials(self, request: MountRequest) -> dict[str, str]:
        """The volume attributes that make Mountpoint use the pod's credentials (the user's IRSA role)."""
        if self.settings.s3_mount_credentials != "pod":
            return {}
        identity = request.identity
        if identity is None or not identity.service_account or ROLE_ANNOTATION not in identity.annotations:
            log.warning(
                "environment %s mounts S3 bucket %s with the CSI driver's credentials: the user has no IRSA role",
                request.environment_id, request.bucket,
            )  # fmt: skip
            return {}
        return {"authenticationSource": "pod", "stsRegion": self.region}

    @staticmethod
    def _check_bucket_name(bucket: str) -> None:
        """Names S3 cannot hold do not exist (and must not reach botocore as a path)."""
        if not isinstance(bucket, str) or S3_BUCKET_NAMES.problem(bucket) is not None:
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
            self._kms_default.pop(bucket, None)

    def _encrypts_with_kms(self, bucket: str) -> bool:
        """Whether the bucket encrypts new objects with KMS by default (their ETags are then no
        MD5s), as GetBucketEncryption says: whoever configured it, S3_KMS_KEY_ID or not (a bucket
        set up outside CMBCluster, one migrated from). Asked once per bucket. When S3 cannot say,
        the answer is yes, so that no listed ETag is taken for an MD5 (a migration reads such
        objects back): for good when reading it is not permitted (the database bucket's policy
        allows no more than listing), until the next listing when S3 failed."""
        with self._cache_lock:
            known = self._kms_default.get(bucket)
        if known is not None:
            return known
        try:
            rules = self._client.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
            defaults = [rule.get("ApplyServerSideEncryptionByDefault", {}) for rule in rules]
            kms = any(str(default.get("SSEAlgorithm", "")).startswith("aws:kms") for default in defaults)
        except (ClientError, BotoCoreError) as exc:
            code = error_code(exc) if isinstance(exc, ClientError) else ""
            if code == "ServerSideEncryptionConfigurationNotFoundError":
                kms = False  # no default encryption
            elif code in ("AccessDenied", "AllAccessDisabled"):
                log.info("not permitted to read the default encryption of bucket %s: its listed ETags are not "
                         "taken for MD5s", bucket)  # fmt: skip
                kms = True
            else:
                log.warning("could not read the default encryption of bucket %s (%s): its listed ETags are not "
                            "taken for MD5s this time", bucket, exc)  # fmt: skip
                return True
        with self._cache_lock:
            if len(self._kms_default) >= 10_000:
                self._kms_default.clear()
            self._kms_default[bucket] = kms
        return kms


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
