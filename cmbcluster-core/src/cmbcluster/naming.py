"""Safe, unique names for cloud and Kubernetes resources, built from opaque ids.

One place for these rules so every provider derives names the same way: lower-case,
DNS-safe, length-bounded, never containing an e-mail address or other personal data.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass

from cmbcluster.errors import InvalidRequest
from cmbcluster.text import describe_character, first_control_or_bidi, first_hidden_in_name

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
#: A deployment's name (CMBCLUSTER_DEPLOYMENT_NAME): in every cloud name a plugin builds (IAM paths,
#: roles, service accounts, bucket prefixes), so at most 17 characters: every such name then fits
#: AWS's and Google's limits (a Google service account id has 30 characters at most).
DEPLOYMENT_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,15}[a-z0-9])?$")


def deployment_name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a deployment, or None when it can."""
    if DEPLOYMENT_NAME.match(value):
        return None
    return (
        f"{value!r} cannot name the deployment: 1-17 lower-case letters, digits or '-', starting with a letter "
        "(it goes into every cloud name the deployment makes)"
    )


def check_deployment_name(value: str, variable: str) -> str:
    """``value`` if it can name a deployment; for a settings validator, a clear error naming
    ``variable`` otherwise (a cloud's cluster name names the deployment when
    CMBCLUSTER_DEPLOYMENT_NAME is unset)."""
    from pydantic_core import PydanticCustomError

    problem = deployment_name_problem(value)
    if problem is not None:
        hint = "" if variable == "CMBCLUSTER_DEPLOYMENT_NAME" else "; or set CMBCLUSTER_DEPLOYMENT_NAME"
        raise PydanticCustomError("deployment_name", "{problem}{hint}", {"problem": problem, "hint": hint})
    return value


def dns_label(*parts: str, max_length: int = 63) -> str:
    """Join ``parts`` into one RFC 1123 label (lower-case alphanumerics and '-')."""
    raw = "-".join(p for p in parts if p)
    label = _NOT_DNS.sub("-", raw.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)[:max_length].rstrip("-")
    if not label:
        raise InvalidRequest(f"cannot build a DNS label from {parts!r}")
    return label


def short_id(user_id: str, length: int = 10) -> str:
    """A short, DNS-safe form of an opaque id (our ids are hex uuids)."""
    cleaned = _NOT_DNS.sub("", user_id.lower())
    if not cleaned:
        raise InvalidRequest("empty id")
    return cleaned[:length]


@dataclass(frozen=True, kw_only=True)
class BucketNameRules:
    """The bucket names a storage service accepts, and how CMBCluster makes new ones with them.

    A storage backend declares its service's rules (``StorageBackend.bucket_names``); every new
    bucket name is made through them (:meth:`new_name`) and every configured one is checked against
    them (:meth:`problem`: the database bucket), so a service with stricter rules than S3's (Azure
    Blob containers refuse ``--``) gets names it accepts and clear errors for those it would refuse.
    """

    #: A regular expression every whole name matches (:func:`re.fullmatch`), lengths apart.
    pattern: str
    #: The rules in words, for error messages: "3-63 lower-case letters, digits and '-', ...".
    description: str
    min_length: int = 3
    max_length: int = 63

    def problem(self, name: str) -> str | None:
        """Why the service would refuse ``name``; None when it accepts it."""
        if self.min_length <= len(name) <= self.max_length and re.fullmatch(self.pattern, name):
            return None
        return f"{name!r} is not a valid bucket name: {self.description}"

    def database_bucket_problems(self, bucket: str | None, setting: str = "CMBCLUSTER_DATABASE_BUCKET") -> list[str]:
        """Why the service would refuse the configured database bucket (named by ``setting`` in the
        message): ``serve`` and ``config check`` say it, and a cloud's ``infra`` before it makes
        anything."""
        problem = self.problem(bucket) if bucket else None
        return [f"{setting}: {problem}"] if problem else []

    def check(self, name: str) -> str:
        """``name``, or InvalidRequest saying why the service would refuse it."""
        problem = self.problem(name)
        if problem is not None:
            raise InvalidRequest(problem)
        return name

    def prefix_problem(self, prefix: str) -> str | None:
        """Why the names :meth:`new_name` makes with ``prefix`` would be refused; None when they are valid.

        A name is ``<prefix>-<user>-<random>`` with 1-10 and 8 lower-case letters or digits in the
        last two parts: the shortest and the longest such names are checked.
        """
        for user, suffix in (("0", "0" * _SUFFIX_CHARS), ("z" * _USER_CHARS, "f" * _SUFFIX_CHARS)):
            if self.problem(_join(prefix, user, suffix)) is not None:
                return f"bucket prefix {prefix!r} makes bucket names the storage service refuses: {self.description}"
        return None

    def new_name(self, prefix: str, user_id: str) -> str:
        """A new bucket name for a user, ``<prefix>-<user>-<random>``, valid under these rules.

        The random part keeps names unique across deployments that share a prefix and across a
        user's buckets (a backend tries another on the rare collision); the user part is a short
        form of the opaque id, never an e-mail address. InvalidRequest when ``prefix`` cannot make
        valid names (:meth:`prefix_problem`).
        """
        problem = self.prefix_problem(prefix)
        if problem is not None:
            raise InvalidRequest(problem)
        return self.check(owner_name_prefix(prefix, user_id) + secrets.token_hex(_SUFFIX_CHARS // 2))


_USER_CHARS = 10
_SUFFIX_CHARS = 8


def _join(prefix: str, user: str, suffix: str) -> str:
    return f"{prefix.rstrip('-')}-{user}-{suffix}"


def owner_name_prefix(prefix: str, user_id: str) -> str:
    """How every name :meth:`BucketNameRules.new_name` makes for ``user_id`` with ``prefix`` starts
    (a backend listing a user's buckets filters by it before it trusts their tags or labels)."""
    return _join(prefix, short_id(user_id, _USER_CHARS), "")


#: What S3 and Cloud Storage both accept: the default of ``StorageBackend.bucket_names``.
DEFAULT_BUCKET_NAMES = BucketNameRules(
    pattern=r"[a-z0-9][a-z0-9-]*[a-z0-9]",
    description="3-63 lower-case letters, digits and '-', starting and ending with a letter or digit",
)


MAX_OBJECT_KEY_BYTES = 1024
#: One path segment of a key: a file or folder name in the mounted bucket (Linux's NAME_MAX).
MAX_KEY_SEGMENT_BYTES = 255


def validate_object_key(key: str) -> str:
    """Refuse object keys that are unsafe as paths in a mounted bucket.

    Every backend mounts buckets as folders, so keys must be relative paths without ``.`` or
    ``..`` segments, empty segments, backslashes or control characters, each segment a valid
    file name (at most 255 bytes).
    """
    if not key:
        raise InvalidRequest("object key must not be empty")
    if len(key.encode("utf-8")) > MAX_OBJECT_KEY_BYTES:
        raise InvalidRequest(f"object key is longer than {MAX_OBJECT_KEY_BYTES} bytes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key) or "\\" in key:
        raise InvalidRequest("object key must not contain control characters or backslashes")
    if "\ufffd" in key or any(0xD800 <= ord(ch) <= 0xDFFF for ch in key):
        # what undecodable bytes in a URL become: two different keys would land on one name
        raise InvalidRequest("object key must be valid UTF-8 text")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidRequest("object key must not start or end with '/'")
    parts = key.split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise InvalidRequest("object key must not contain empty, '.' or '..' path segments")
    if any(len(part.encode("utf-8")) > MAX_KEY_SEGMENT_BYTES for part in parts):
        raise InvalidRequest(
            f"each file or folder name in an object key may be at most {MAX_KEY_SEGMENT_BYTES} bytes "
            "(it becomes a file name in the mounted bucket)"
        )
    return key


#: The start of a file or folder name reserved for the product's own temporary objects (none is
#: written in a bucket today: the local backend keeps uploads in progress outside its buckets, S3
#: and GCS assemble theirs server-side), so a user's file can never pass for one, nor be one.
RESERVED_KEY_PREFIX = ".cmbcluster-tmp-"


def validate_new_object_key(key: str) -> str:
    """A key a new object may be written at through the API (upload, move, rename): the rules of
    :func:`validate_object_key`, and no name that would be shown as another one in a listing: no
    bidirectional control (``invoice\u202efdp.exe`` shows as ``invoiceexe.pdf``), no character shown as
    nothing or as a plain space (a zero-width space, a no-break space: :func:`first_hidden_in_name`), no
    file or folder name ending with whitespace or starting with :data:`RESERVED_KEY_PREFIX`.

    Reading, moving away and deleting use :func:`validate_object_key` alone: a file an environment
    wrote into its mounted bucket under such a name stays reachable."""
    validate_object_key(key)
    bad = first_control_or_bidi(key)
    if bad is not None and unicodedata.category(bad) == "Cc":  # the C1 controls too (U+0085 breaks lines)
        raise InvalidRequest("object key must not contain control characters")
    if bad is not None:
        raise InvalidRequest(
            f"object key must not contain {describe_character(bad)}: a bidirectional control changes how "
            "the name is shown, so it could pass for another file"
        )
    hidden = first_hidden_in_name(key)
    if hidden is not None:
        raise InvalidRequest(
            f"object key must not contain {describe_character(hidden)}: it is shown as nothing or as a plain "
            "space, so the name could pass for another file"
        )
    for part in key.split("/"):
        if part.startswith(RESERVED_KEY_PREFIX):
            raise InvalidRequest(
                f"a file or folder name starting with {RESERVED_KEY_PREFIX!r} is reserved for CMBCluster"
            )
        if part != part.rstrip():
            raise InvalidRequest(
                f"a file or folder name in an object key must not end with a space ({part!r} ends with a space): "
                "it would look like the name without it"
            )
    return key


def validate_object_prefix(prefix: str) -> str:
    """A listing prefix: empty, or the start of some key that :func:`validate_object_key` accepts,
    refused in its words otherwise (a NUL, a backslash, an empty or ``..`` segment...).

    A prefix may stop anywhere in a name: after a folder's ``/`` (``maps/``), inside a name
    (``ma``), or inside one that starts with dots (``.`` of ``.config``, ``maps/..`` of
    ``maps/..old``), where the name so far is not a valid one yet, but the next character makes it."""
    if prefix:
        last = prefix.rpartition("/")[2]
        validate_object_key(prefix + "x" if last in {"", ".", ".."} else prefix)
    return prefix
