"""The HTTP side of object transfers: byte ranges (``Range``, ``If-Range``), ``ETag`` and the
headers of a download (``Content-Disposition`` and the rules that keep user content from running
as our pages). Pure functions of the request's headers and an object's metadata."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Mapping
from urllib.parse import quote

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import ObjectInfo

__all__ = [
    "RangeNotSatisfiable",
    "content_disposition",
    "content_length",
    "if_range_matches",
    "object_headers",
    "parse_range",
]


class RangeNotSatisfiable(Exception):
    """A ``Range`` that starts past the end of the object: answered 416 with ``Content-Range: bytes */size``."""


_BYTE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The ``(first, last)`` bytes (inclusive) a ``Range`` header asks for, or None to answer
    the whole object: RFC 9110 lets a server ignore a range it does not support (several
    ranges, another unit) or an invalid one. RangeNotSatisfiable when it starts past the end."""
    match = _BYTE_RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)  # bytes=-N: the last N bytes
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header.strip()!r} is not satisfiable for {size} bytes")
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(f"range {header.strip()!r} starts past the end of the object ({size} bytes)")
    return first, min(last, size - 1)


def _quoted_etag(info: ObjectInfo) -> str:
    return f'"{info.etag.strip(chr(34))}"' if info.etag else ""


def if_range_matches(if_range: str | None, info: ObjectInfo) -> bool:
    """Whether a Range may be honoured: no If-Range, or If-Range names the current version
    (a strong ETag, or the Last-Modified date); otherwise the whole object is sent."""
    if not if_range:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return bool(info.etag) and value == _quoted_etag(info)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return when.tzinfo is not None and when == info.last_modified.replace(microsecond=0)


def object_headers(info: ObjectInfo) -> dict[str, str]:
    """Headers of a download: type, version, and how a browser must treat it. User content is
    always an attachment, never sniffed, and sandboxed if opened: it must not run as our pages."""
    headers = {
        "Content-Type": _header_safe(info.content_type) or "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(info.key.rsplit("/", 1)[-1]),
        "Last-Modified": email.utils.format_datetime(info.last_modified.astimezone(dt.UTC), usegmt=True),
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if info.etag:
        headers["ETag"] = _quoted_etag(info)
    return headers


def _header_safe(value: str) -> str:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return ""
    return value if value.isprintable() else ""


def content_disposition(filename: str) -> str:
    """``attachment`` with the file's name: an ASCII fallback, plus RFC 6266 ``filename*``
    (UTF-8, percent-encoded) when the name is not plain ASCII."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in filename) or "download"
    value = f'attachment; filename="{fallback}"'
    if fallback != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


def content_length(headers: Mapping[str, str]) -> int | None:
    """The request's declared ``Content-Length`` (None without one); InvalidRequest when malformed."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidRequest("Content-Length must be a non-negative integer")
    return int(raw)
