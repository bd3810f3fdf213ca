"""User settings: environment variables and secret files, applied to environments at start.

Both are sealed (AES-256-GCM, keys derived from the control plane's secret key, one per purpose)
before they reach the database: people put API keys in variables too. Variables are shown back to
their owner; secret files are only ever decrypted to be handed to a starting environment.

The environments code calls :func:`settings_at_start` at start, and
:func:`validate_env_var_name` / :func:`validate_env_var_value` for per-environment variables.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, func, literal, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cmbcluster.compute.command import LAUNCH_VARIABLES
from cmbcluster.db.models import EnvVar, SecretFile, new_id, utcnow
from cmbcluster.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from cmbcluster.security import Sealer
from cmbcluster.services.audit import audit

log = logging.getLogger(__name__)

# -- limits --------------------------------------------------------------------------------------
MAX_ENV_VAR_NAME_LENGTH = 128
MAX_ENV_VAR_VALUE_BYTES = 32 * 1024
MAX_ENV_VARS_PER_USER = 100
MAX_SECRET_FILE_NAME_LENGTH = 128
MAX_SECRET_FILES_PER_USER = 20

#: the Sealer purposes: ``context.sealer(SECRET_FILE_PURPOSE)``
SECRET_FILE_PURPOSE = "secret-files"  # noqa: S105 - a key-derivation label, not a secret
ENV_VAR_PURPOSE = "env-vars"

ENV_VAR_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

_SET_BY_ENVIRONMENT = "the environment sets it itself"
_SET_BY_LAUNCH = (
    "it is set by the application's launch (where it listens, the path it is served under, its token), "
    "whose value would replace yours"
)
_CHANGES_CODE = "it changes which code the environment runs"
#: names users may not set, and why (compared case-insensitively)
RESERVED_ENV_VAR_NAMES: dict[str, str] = {
    **dict.fromkeys(LAUNCH_VARIABLES, _SET_BY_LAUNCH),
    "PATH": _SET_BY_ENVIRONMENT,
    "HOME": _SET_BY_ENVIRONMENT,
    "USER": _SET_BY_ENVIRONMENT,
    "SHELL": _SET_BY_ENVIRONMENT,
    "PWD": _SET_BY_ENVIRONMENT,
    "HOSTNAME": _SET_BY_ENVIRONMENT,
    "LD_PRELOAD": _CHANGES_CODE,
    "LD_LIBRARY_PATH": _CHANGES_CODE,
    "LD_AUDIT": _CHANGES_CODE,
    "PYTHONPATH": _CHANGES_CODE,
    "PYTHONHOME": _CHANGES_CODE,
    "BASH_ENV": _CHANGES_CODE,  # a script every non-interactive bash runs first
    "ENV": _CHANGES_CODE,  # the same for sh
}
_CLOUD_CREDENTIALS = (
    "cloud credentials come from your environment's per-user cloud identity, never from variables you type"
)
#: name prefixes users may not use, and why (compared case-insensitively)
RESERVED_ENV_VAR_PREFIXES: dict[str, str] = {
    "CMBCLUSTER_": "CMBCluster uses these names itself",
    "KUBERNETES_": "Kubernetes sets these names itself",
    "AWS_": _CLOUD_CREDENTIALS,
    "GOOGLE_": _CLOUD_CREDENTIALS,
    "GCE_": _CLOUD_CREDENTIALS,
}


class SecretFileUnreadable(Conflict):
    """A stored secret file cannot be decrypted: tampered with, or sealed with another secret key."""

    code = "secret_file_unreadable"


class EnvVarUnreadable(Conflict):
    """A stored environment variable cannot be decrypted (tampered with, or another secret key)."""

    code = "env_var_unreadable"


# -- validation ----------------------------------------------------------------------------------
def validate_env_var_name(name: str) -> str:
    """The name, if a user may set it; InvalidRequest (400) saying why otherwise.

    Names are shell-style identifiers (``^[A-Za-z_][A-Za-z0-9_]*$``, at most 128 characters)
    and none of the reserved names or prefixes (``PATH``, ``AWS_``..., and every variable the
    application's launch sets: ``PORT``, ``JUPYTER_TOKEN``...).
    """
    if not name:
        raise InvalidRequest("an environment variable name is required")
    if len(name) > MAX_ENV_VAR_NAME_LENGTH:
        raise InvalidRequest(f"environment variable names have at most {MAX_ENV_VAR_NAME_LENGTH} characters")
    if ENV_VAR_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            f"invalid environment variable name {name!r}: use letters, digits and underscores, "
            "not starting with a digit"
        )
    upper = name.upper()
    reason = RESERVED_ENV_VAR_NAMES.get(upper)
    if reason is not None:
        raise InvalidRequest(f"{name} is a reserved environment variable name: {reason}")
    for prefix, reason in RESERVED_ENV_VAR_PREFIXES.items():
        if upper.startswith(prefix):
            raise InvalidRequest(f"names starting with {prefix} are reserved ({name}): {reason}")
    return name


def validate_env_var_value(value: str) -> str:
    """The value, if at most 32 KiB (UTF-8) and free of NUL characters; InvalidRequest otherwise."""
    if "\x00" in value:
        raise InvalidRequest("environment variable values cannot contain NUL characters")
    if len(value.encode()) > MAX_ENV_VAR_VALUE_BYTES:
        raise InvalidRequest(f"environment variable values have at most {MAX_ENV_VAR_VALUE_BYTES // 1024} KiB")
    return value


def validate_secret_file_name(name: str) -> str:
    """The name, if safe as a file name in the environment; InvalidRequest (400) otherwise.

    1 to 128 of ``A-Z a-z 0-9 . _ -``, not ``.`` or ``..`` and not starting with ``..``
    (a single leading dot is fine: ``.netrc``, ``.pgpass``).
    """
    if not name:
        raise InvalidRequest("a secret file name is required")
    if len(name) > MAX_SECRET_FILE_NAME_LENGTH:
        raise InvalidRequest(f"secret file names have at most {MAX_SECRET_FILE_NAME_LENGTH} characters")
    if SECRET_FILE_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            f"invalid secret file name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)"
        )
    if name == "." or name.startswith(".."):
        raise InvalidRequest(f"invalid secret file name {name!r}: it may not be '.', '..' or start with '..'")
    return name


def _is_valid(validator: Callable[[str], str], name: str) -> bool:
    try:
        validator(name)
    except InvalidRequest:
        return False
    return True


# -- environment variables -----------------------------------------------------------------------
def list_env_vars(db: Session, user_id: str) -> list[EnvVar]:
    return list(db.execute(select(EnvVar).where(EnvVar.user_id == user_id).order_by(EnvVar.name)).scalars())


def _env_var(db: Session, user_id: str, name: str) -> EnvVar | None:
    return db.execute(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.name == name)).scalar_one_or_none()


def set_env_var(db: Session, user_id: str, name: str, value: str, *, sealer: Sealer) -> tuple[EnvVar, bool]:
    """Create or replace one variable (sealed); returns it and whether it was created."""
    validate_env_var_name(name)
    validate_env_var_value(value)
    ciphertext = sealer.seal(value.encode())
    row = _env_var(db, user_id, name)
    created = row is None
    if row is None:
        count = db.execute(select(func.count()).select_from(EnvVar).where(EnvVar.user_id == user_id)).scalar_one()
        if count >= MAX_ENV_VARS_PER_USER:
            raise Conflict(
                f"you already have {MAX_ENV_VARS_PER_USER} environment variables, the most allowed; delete one first"
            )
        row = EnvVar(user_id=user_id, name=name, ciphertext=ciphertext)
        db.add(row)
    else:
        row.ciphertext = ciphertext
        row.updated_at = utcnow()
    try:
        db.commit()
    except IntegrityError:  # a concurrent request created the same name: replace its value
        db.rollback()
        row = _env_var(db, user_id, name)
        if row is None:
            raise
        row.ciphertext, row.updated_at, created = ciphertext, utcnow(), False
        db.commit()
    return row, created


def env_var_value(row: EnvVar, sealer: Sealer) -> str | None:
    """The variable's value, or None when it cannot be decrypted."""
    return _unseal_text(row.ciphertext, sealer)


def _unseal_text(ciphertext: bytes, sealer: Sealer) -> str | None:
    try:
        return sealer.unseal(ciphertext).decode()
    except (ValueError, UnicodeError):
        return None


def delete_env_var(db: Session, user_id: str, name: str) -> None:
    """Delete one variable (NotFound if the user has none of that name; reserved names may be deleted)."""
    row = _env_var(db, user_id, name)
    if row is None:
        raise NotFound(f"no environment variable named {name!r}")
    db.delete(row)
    db.commit()


# -- secret files --------------------------------------------------------------------------------
def list_secret_files(db: Session, user_id: str) -> list[SecretFile]:
    return list(db.execute(select(SecretFile).where(SecretFile.user_id == user_id).order_by(SecretFile.name)).scalars())


def _secret_file(db: Session, user_id: str, name: str) -> SecretFile | None:
    return db.execute(
        select(SecretFile).where(SecretFile.user_id == user_id, SecretFile.name == name)
    ).scalar_one_or_none()


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"secret files have at most {max_bytes} bytes (CMBCLUSTER_MAX_SECRET_FILE_BYTES)")


def put_secret_file(
    db: Session, user_id: str, name: str, content: bytes, *, sealer: Sealer, max_bytes: int
) -> tuple[SecretFile, bool]:
    """Seal and store (create or replace) one secret file; returns it and whether it was created.

    Audited as ``secret_file.created`` or ``secret_file.replaced`` (name and size, never content).
    """
    validate_secret_file_name(name)
    if len(content) > max_bytes:
        raise too_large(max_bytes)
    ciphertext = sealer.seal(content)
    row = _secret_file(db, user_id, name)
    created = row is None
    if row is None:
        count = db.execute(
            select(func.count()).select_from(SecretFile).where(SecretFile.user_id == user_id)
        ).scalar_one()
        if count >= MAX_SECRET_FILES_PER_USER:
            raise Conflict(f"you already have {MAX_SECRET_FILES_PER_USER} secret files, the most allowed; delete one")
        row = SecretFile(id=new_id(), user_id=user_id, name=name, ciphertext=ciphertext, size=len(content))
        db.add(row)
    else:
        row.ciphertext, row.size, row.updated_at = ciphertext, len(content), utcnow()
    audit(
        db, actor_id=user_id, action="secret_file.created" if created else "secret_file.replaced",
        target_type="secret_file", target_id=row.id, name=name, size=len(content),
    )  # fmt: skip
    try:
        db.commit()
    except IntegrityError:  # a concurrent request created the same name: replace it instead
        db.rollback()
        row = _secret_file(db, user_id, name)
        if row is None:
            raise
        row.ciphertext, row.size, row.updated_at, created = ciphertext, len(content), utcnow(), False
        audit(db, actor_id=user_id, action="secret_file.replaced", target_type="secret_file", target_id=row.id,
              name=name, size=len(content))  # fmt: skip
        db.commit()
    return row, created


def delete_secret_file(db: Session, user_id: str, name: str) -> None:
    """Delete one secret file (NotFound if the user has none of that name). Audited."""
    row = _secret_file(db, user_id, name)
    if row is None:
        raise NotFound(f"no secret file named {name!r}")
    audit(db, actor_id=user_id, action="secret_file.deleted", target_type="secret_file", target_id=row.id, name=name)
    db.delete(row)
    db.commit()


def settings_at_start(
    db: Session, user_id: str, *, variables_sealer: Sealer, files_sealer: Sealer
) -> tuple[dict[str, str], dict[str, bytes]]:
    """The user's variables (names sorted) and secret files (mode 0600 files), decrypted, as an
    environment gets them at start: one query for both, since every start asks.

    A variable whose name has become reserved since it was saved, or a file whose name is unsafe,
    is left out, and logged. EnvVarUnreadable or SecretFileUnreadable (409) names one that cannot
    be decrypted: the control plane's secret key changed since it was saved, or it was tampered with.
    """
    variables: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for kind, name, ciphertext in sorted(db.execute(_SETTINGS_AT_START, {"user_id": user_id})):
        if kind == "file":
            if not _is_valid(validate_secret_file_name, name):
                log.warning("user %s: secret file %r has an unsafe name; not applied", user_id, name)
                continue
            try:
                files[name] = files_sealer.unseal(ciphertext)
            except ValueError:
                raise SecretFileUnreadable(
                    f"secret file {name!r} cannot be decrypted: it was tampered with, or the server's secret "
                    "key (CMBCLUSTER_SECRET_KEY) changed since it was uploaded; upload it again or delete it"
                ) from None
            continue
        if not _is_valid(validate_env_var_name, name):
            log.warning("user %s: environment variable %r is no longer allowed; not applied", user_id, name)
            continue
        value = _unseal_text(ciphertext, variables_sealer)
        if value is None:
            raise EnvVarUnreadable(
                f"environment variable {name} cannot be decrypted: the server's secret key "
                "(CMBCLUSTER_SECRET_KEY) changed since it was saved; set it again or delete it"
            )
        variables[name] = value
    return variables, files


# Built once: every start runs it.
_SETTINGS_AT_START = union_all(
    select(literal("env"), EnvVar.name, EnvVar.ciphertext).where(EnvVar.user_id == bindparam("user_id")),
    select(literal("file"), SecretFile.name, SecretFile.ciphertext).where(SecretFile.user_id == bindparam("user_id")),
)


# -- key rotation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReencryptReport:
    resealed: int  #: sealed with a previous key, now with the current one
    current: int  #: already sealed with the current key
    unreadable: list[str]  #: ``user id/name`` of values no configured key decrypts (left untouched)


def reencrypt_all(db: Session, *, env_var_sealer: Sealer, secret_file_sealer: Sealer) -> ReencryptReport:
    """Re-seal every stored variable and secret file sealed with a previous key (one transaction)."""
    resealed = current = 0
    unreadable: list[str] = []
    rows: list[tuple[EnvVar | SecretFile, Sealer]] = [
        *((row, env_var_sealer) for row in db.execute(select(EnvVar)).scalars()),
        *((row, secret_file_sealer) for row in db.execute(select(SecretFile)).scalars()),
    ]
    for row, sealer in rows:
        try:
            if not sealer.needs_reseal(row.ciphertext):
                current += 1
                continue
            row.ciphertext = sealer.seal(sealer.unseal(row.ciphertext))
            resealed += 1
        except ValueError:
            unreadable.append(f"{row.user_id}/{row.name}")
    db.commit()
    return ReencryptReport(resealed=resealed, current=current, unreadable=unreadable)
