"""The tags CMBCluster puts on what it makes in AWS, and the encoding of text in tag values.

S3 tag values allow only letters, digits, spaces and ``+ - . _ : / @``, at most 256 characters
each: a bucket's display name is stored reversibly (other characters as ``=HH`` per UTF-8 byte),
split over continuation tags when long (:func:`display_name_tags`, :func:`display_name_of`).
"""

from __future__ import annotations

import re

from cmbcluster.errors import InvalidRequest

__all__ = [
    "MANAGED_BY",
    "TAG_DEPLOYMENT",
    "TAG_MANAGED_BY",
    "TAG_OWNER",
    "TAG_STORAGE_CLASS",
    "decode_tag_value",
    "display_name_of",
    "display_name_tags",
    "encode_tag_value",
    "is_display_name_tag",
]

TAG_OWNER = "owner"
#: The deployment's name on everything the plugin makes (infra and per-user alike).
TAG_DEPLOYMENT = "cmbcluster:deployment"
TAG_MANAGED_BY = "managed-by"
TAG_DISPLAY_NAME = "cmbcluster-display-name"
TAG_STORAGE_CLASS = "cmbcluster-storage-class"
MANAGED_BY = "cmbcluster"
TAG_VALUE_MAX = 256
DISPLAY_NAME_MAX_TAGS = 8  # continuation tags: cmbcluster-display-name-2 ... -8

_TAG_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-._:/@")
_ESCAPE = re.compile(r"=([0-9A-F]{2})")


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


def display_name_tags(display_name: str) -> dict[str, str]:
    """The tags that hold ``display_name``; InvalidRequest when it needs more than 8 of them."""
    pieces = _split_tag_value(display_name)
    if len(pieces) > DISPLAY_NAME_MAX_TAGS:
        raise InvalidRequest("the bucket's display name is too long")
    return {_display_name_key(index): piece for index, piece in enumerate(pieces)}


def display_name_of(tags: dict[str, str]) -> str:
    """The display name stored by :func:`display_name_tags` (empty when there is none)."""
    pieces = []
    for index in range(DISPLAY_NAME_MAX_TAGS):
        piece = tags.get(_display_name_key(index))
        if piece is None:
            break
        pieces.append(piece)
    return "".join(decode_tag_value(p) for p in pieces)


def is_display_name_tag(key: str) -> bool:
    return key.startswith(TAG_DISPLAY_NAME)
