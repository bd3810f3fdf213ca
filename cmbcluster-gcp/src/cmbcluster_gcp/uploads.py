"""Large uploads to Cloud Storage: a resumable upload session fed in pieces of 128 MiB, each
spooled to a temporary file and streamed from it, so memory holds one source chunk whatever the
size. Few, large requests are what makes a resumable upload fast (GCS answers each piece only once
it is stored; the emulator even copies the whole upload so far at every piece). A failed or partly
stored piece is resumed from where GCS says the upload stands; on any failure the session is
cancelled, so no object (and no loss of the previous version) results.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import requests

from cmbcluster.errors import ProviderUnavailable
from cmbcluster_gcp.errors import GCS, error_for_status, translate_error

__all__ = ["UPLOAD_PIECE_SIZE", "upload_in_pieces"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: A multiple of 256 KiB, as GCS requires of every piece but the last.
UPLOAD_PIECE_SIZE = 128 * MiB
UPLOAD_PIECE_ATTEMPTS = 5
UPLOAD_PIECE_TIMEOUT = (10.0, 300.0)  # connect, then read: GCS answers once the whole piece is stored
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def upload_in_pieces(http: Any, session: str, head: bytes, source: Iterator[bytes], what: str) -> None:
    """Send ``head`` then the rest of ``source`` to the resumable upload ``session`` (its URL), with
    ``http``, the storage client's authorized session; the session is cancelled on any failure."""
    try:
        with tempfile.TemporaryFile(prefix="cmbcluster-gcs-upload-") as spool:
            _upload_pieces(http, session, spool, head, source, what)
    except BaseException:
        _cancel_session(http, session, what)
        raise


def _upload_pieces(http: Any, session: str, spool: BinaryIO, head: bytes, source: Iterator[bytes], what: str) -> None:
    """Send ``head`` then ``source`` to the resumable ``session``, one spooled piece at a time.

    One source chunk is read ahead, so that the last piece is known as such when it is sent.
    """
    offset = 0
    pending: bytes | None = head or _next_bytes(source)
    while True:
        spool.seek(0)
        spool.truncate()
        size = 0
        while pending is not None and size < UPLOAD_PIECE_SIZE:
            taken = pending[: UPLOAD_PIECE_SIZE - size]
            spool.write(taken)
            size += len(taken)
            pending = pending[len(taken) :] or _next_bytes(source)
        spool.flush()
        last = pending is None
        _put_piece(http, session, spool, offset, size, offset + size if last else None, what)
        if last:
            return
        offset += size


def _put_piece(http: Any, session: str, spool: BinaryIO, offset: int, size: int, total: int | None, what: str) -> None:
    """PUT ``size`` spooled bytes at ``offset`` (the final piece when ``total`` is given).

    A failed or partly stored request is resumed from where GCS says the upload stands.
    """
    url = session
    start = offset
    end = offset + size
    attempts = 0
    while True:
        length = end - start
        size_said = "*" if total is None else str(total)
        # with everything stored, only the total is left to say
        content_range = f"bytes {start}-{end - 1}/{size_said}" if length else f"bytes */{total}"
        try:
            response = http.put(
                url, data=_SpoolBody(spool, start - offset, length),
                headers={"Content-Range": content_range}, timeout=UPLOAD_PIECE_TIMEOUT,
            )  # fmt: skip
            status = response.status_code
            if status in (200, 201):
                return
            if status == 308:
                stored = _resumed_offset(response)
                if stored >= end and total is None:
                    return
                if stored > start:  # partly stored: send the rest
                    start = stored
                    continue
            if status not in _RETRYABLE_STATUSES and status != 308:
                raise error_for_status(status, what, service=GCS, detail=response.text[:500], response=response)
            failure: BaseException = ProviderUnavailable(f"{GCS} answered {status} for {what}")
        except requests.RequestException as exc:
            failure = exc
        attempts += 1
        if attempts >= UPLOAD_PIECE_ATTEMPTS:
            mapped = translate_error(failure, what) or failure
            raise mapped from failure
        time.sleep(min(2**attempts * 0.5, 10))
        start = max(start, _stored_bytes(http, session, offset))


def _stored_bytes(http: Any, session: str, fallback: int) -> int:
    """How many bytes of the upload GCS holds (a status query), or ``fallback`` if it cannot say."""
    try:
        response = http.put(session, data=b"", headers={"Content-Range": "bytes */*"}, timeout=30)
    except requests.RequestException:
        return fallback
    return _resumed_offset(response) if response.status_code == 308 else fallback


#: Answers to a session cancel that mean it is gone: 499 (cancelled), 404 or 410 (already gone).
_CANCELLED_STATUSES = frozenset({404, 410, 499})
CANCEL_ATTEMPTS = 3


def _cancel_session(http: Any, session: str, what: str) -> bool:
    """Free an unfinished upload session at once, checking GCS's answer and retrying what may
    pass; a session that cannot be cancelled is logged with the answer (GCS reaps it after a
    week, and stores no object from it). True when the session is gone."""
    answer = ""
    for attempt in range(CANCEL_ATTEMPTS):
        if attempt:
            time.sleep(0.5 * 2**attempt)
        try:
            response = http.delete(session, timeout=30)
        except requests.RequestException as exc:
            answer = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code in _CANCELLED_STATUSES:
            return True
        answer = f"HTTP {response.status_code} {str(getattr(response, 'text', ''))[:200]}".strip()
        if response.status_code not in _RETRYABLE_STATUSES:
            break
    log.warning("could not cancel the upload session of %s (%s); Cloud Storage discards it within a week", what, answer)
    return False


class _SpoolBody:
    """``length`` bytes of a spool file from ``start``, as a request body that requests streams
    (it has a length, so it is sent with Content-Length, in 1 MiB reads)."""

    def __init__(self, spool: BinaryIO, start: int, length: int) -> None:
        self._spool, self._start, self._length = spool, start, length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        self._spool.seek(self._start)
        remaining = self._length
        while remaining > 0:
            block = self._spool.read(min(MiB, remaining))
            if not block:
                raise OSError("the upload's spool file ended early")
            remaining -= len(block)
            yield block


def _resumed_offset(response: Any) -> int:
    """The bytes a resumable upload holds, from a 308 answer's ``Range: bytes=0-LAST``."""
    match = re.fullmatch(r"bytes=0-(\d+)", response.headers.get("Range", "").strip())
    return int(match.group(1)) + 1 if match else 0


def _next_bytes(source: Iterator[bytes]) -> bytes | None:
    """The next non-empty chunk of ``source``, or None once it is exhausted."""
    for chunk in source:
        if chunk:
            return chunk
    return None
