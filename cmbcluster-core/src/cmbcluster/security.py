"""Secrets of the control plane itself: the key that signs sessions and encrypts secret files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cmbcluster.settings import CoreSettings

SECRET_FILE = "secret_key"  # noqa: S105 - a file name, not a secret


def secret_key(settings: CoreSettings) -> bytes:
    """The configured key, or one generated once into the data directory (mode 0600).

    Generating it keeps the embedded default zero-configuration without ever falling back to
    a well-known default; multi-replica deployments set CMBCLUSTER_SECRET_KEY instead.
    """
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its key
        return Path(path).read_bytes().strip()
    with os.fdopen(fd, "wb") as out:
        out.write(value)
    return value
