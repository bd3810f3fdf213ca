"""Secrets of the control plane itself: the key that signs sessions and encrypts secret files."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmbcluster.settings import CoreSettings

#: Response headers whose effect reaches past an environment's own path, to the whole origin (the web
#: UI, the API, other environments), dropped from what environments answer (the control plane's proxy;
#: the ingress controller `infra up` installs): ``Service-Worker-Allowed: /`` let an environment's page
#: register a service worker over every path, which outlived its owner's sign-out and read the next
#: user's answers in that browser (an outsider's trial); ``Clear-Site-Data`` signs the owner out.
ORIGIN_WIDE_HEADERS = ("service-worker-allowed", "clear-site-data")


if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SECRET_FILE = "secret_key"  # noqa: S105 - a file name, not a secret


def previous_secret_keys(settings: CoreSettings) -> tuple[bytes, ...]:
    """Keys replaced by a rotation (CMBCLUSTER_SECRET_KEY_PREVIOUS): they still decrypt, never encrypt."""
    return tuple(item.get_secret_value().encode() for item in settings.secret_key_previous)


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


class Sealer:
    """Authenticated encryption (AES-256-GCM) with a key derived for one purpose.

    Used for secret files and environment variables at rest and for the short-lived sign-in
    state cookie; separate purposes get separate keys (HKDF), so one can never be replayed as
    the other. ``previous`` keys (CMBCLUSTER_SECRET_KEY_PREVIOUS, during a key rotation) still
    unseal; :meth:`seal` always uses ``key``, and :meth:`needs_reseal` tells what to re-encrypt.
    """

    def __init__(self, key: bytes, purpose: str, *, previous: Sequence[bytes] = ()) -> None:
        self._purpose = purpose.encode()
        self._aeads: list[AESGCM] = [_aead(k, purpose) for k in (key, *previous)]

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aeads[0].encrypt(nonce, plaintext, self._purpose)

    def unseal(self, sealed: bytes) -> bytes:
        """The plaintext, or ValueError when the data was tampered with or sealed with another key."""
        return self._unseal(sealed)[0]

    def needs_reseal(self, sealed: bytes) -> bool:
        """Whether ``sealed`` was sealed with a previous key (ValueError when with none of ours)."""
        return self._unseal(sealed)[1] > 0

    def _unseal(self, sealed: bytes) -> tuple[bytes, int]:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < 13:
            raise ValueError("sealed data is too short")
        for index, aead in enumerate(self._aeads):
            try:
                return aead.decrypt(sealed[:12], sealed[12:], self._purpose), index
            except InvalidTag:
                continue
        raise ValueError("sealed data was tampered with or sealed with another key")


def _aead(key: bytes, purpose: str) -> AESGCM:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"cmbcluster:{purpose}".encode()).derive(key)
    return AESGCM(derived)


def token_hash(token: str) -> str:
    """How tokens are stored: SHA-256 (tokens are 256-bit random, so no salt or slow hash is needed)."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    """A random bearer token whose prefix says what it is (``cmbs_`` session, ``cmbt_`` API token...)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def pkce_challenge(verifier: str) -> str:
    """The PKCE S256 code challenge for ``verifier`` (RFC 7636)."""
    import base64
    import hashlib

    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
