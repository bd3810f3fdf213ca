"""The labels CMBCluster puts on Cloud Storage buckets, and a display name stored in them.

Bucket metadata that the control plane needs back (owner, display name, storage class) lives in
bucket labels. Labels allow only lower-case letters, digits, '-' and '_' (63 characters each), so
the display name is stored base32-encoded, split over several labels when long, and round-trips
exactly.
"""

from __future__ import annotations

import base64
import binascii
import re

from cmbcluster.errors import InvalidRequest

__all__ = [
    "LABEL_DEPLOYMENT",
    "LABEL_MANAGED_BY",
    "LABEL_OWNER",
    "LABEL_STORAGE_CLASS",
    "MANAGED_BY",
    "decode_display_name",
    "encode_display_name",
    "is_display_name_label",
]

LABEL_OWNER = "owner"
#: The deployment's name, on everything the plugin makes (infra and users' buckets alike).
LABEL_DEPLOYMENT = "cmbcluster-deployment"
LABEL_MANAGED_BY = "managed-by"
LABEL_STORAGE_CLASS = "storage-class"
LABEL_DISPLAY_NAME = "display-name"
MANAGED_BY = "cmbcluster"
MAX_DISPLAY_NAME_LABELS = 12  # 12 x 63 base32 characters: 472 bytes of UTF-8


def encode_display_name(display_name: str) -> dict[str, str]:
    """Labels holding ``display_name`` exactly: lower-case base32, 63 characters per label."""
    encoded = base64.b32encode(display_name.encode("utf-8")).decode("ascii").rstrip("=").lower()
    parts = [encoded[i : i + 63] for i in range(0, len(encoded), 63)] or [""]
    if len(parts) > MAX_DISPLAY_NAME_LABELS:
        raise InvalidRequest("the display name is too long")
    return {(LABEL_DISPLAY_NAME if i == 0 else f"{LABEL_DISPLAY_NAME}-{i}"): part for i, part in enumerate(parts)}


def decode_display_name(labels: dict[str, str]) -> str | None:
    """The display name stored by :func:`encode_display_name`, or None if absent or damaged."""
    if LABEL_DISPLAY_NAME not in labels:
        return None
    parts = [labels[LABEL_DISPLAY_NAME]]
    while f"{LABEL_DISPLAY_NAME}-{len(parts)}" in labels:
        parts.append(labels[f"{LABEL_DISPLAY_NAME}-{len(parts)}"])
    encoded = "".join(parts).upper()
    try:
        return base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def is_display_name_label(key: str) -> bool:
    return key == LABEL_DISPLAY_NAME or re.fullmatch(rf"{LABEL_DISPLAY_NAME}-\d+", key) is not None
