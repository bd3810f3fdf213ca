"""Uploads to Cloud Storage, in constant memory.

An object of up to 8 MiB (:data:`SINGLE_REQUEST_MAX`) goes in a single multipart request
(:func:`upload_whole`), streamed from its spool (in memory up to 1 MiB, then a temporary file),
its MD5 in the metadata for GCS to check. A larger one goes as a resumable upload session fed in
pieces of 16 MiB (the first of 2 MiB), each spooled to a temporary file and streamed from it, so
memory holds a source chunk or two whatever the size. A reading thread fills the next piece's
spool while the current piece is sent, so a stream copied from another cloud keeps both
connections busy (GCS answers each piece only once it is stored: without the overlap, a copy takes
the download's time plus the upload's). A failed or partly stored piece is resumed from where GCS
says the upload stands; on any failure the session is cancelled, so no object (and no loss of the
previous version) results.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, BinaryIO

import requests

from cmbcluster.errors import ProviderUnavailable
from cmbcluster_gcp.errors import GCS, error_for_status, translate_error

__all__ = ["SINGLE_REQUEST_MAX", "SPOOL_IN_MEMORY", "UPLOAD_PIECE_SIZE", "upload_in_pieces", "upload_whole"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Objects up to this size go up in one request (what google-cloud-storage sends in one, too):
#: one round trip instead of opening a session, sending pieces and reading the object back.
SINGLE_REQUEST_MAX = 8 * MiB
#: An upload's first bytes are gathered in memory up to this, then in a temporary file: every
#: upload in progress holds its spool (a migration runs several), so memory stays small.
SPOOL_IN_MEMORY = 1 * MiB
#: A multiple of 256 KiB, as GCS requires of every piece but the last. Pieces this size keep the
#: reading and the sending of a large object overlapped; much smaller ones cost a round trip each
#: (and the emulator copies the whole upload so far at every piece).
UPLOAD_PIECE_SIZE = 16 * MiB
#: The first piece is smaller, so that sending starts sooner when the source is slow (another
#: cloud, measured in tests/benchmarks/bench_migrate.py); a source that fails within it leaves no
#: upload session behind.
FIRST_PIECE_SIZE = 2 * MiB
UPLOAD_PIECE_ATTEMPTS = 5
UPLOAD_PIECE_TIMEOUT = (10.0, 300.0)  # connect, then read: GCS answers once the whole piece is stored
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def upload_whole(
    http: Any, url: str, spool: IO[bytes], size: int, md5: bytes, *, name: str, content_type: str, what: str
) -> dict[str, Any]:
    """Store the ``size`` bytes of ``spool`` as the object ``name`` in one multipart request to
    ``url`` (the bucket's upload URL), streamed from the spool; ``md5`` goes in the metadata, so
    GCS refuses bytes that are not those. The object is stored whole or not at all; a failed
    request is sent again as a piece is. Returns the object resource GCS answers."""
    boundary = f"==={secrets.token_hex(16)}=="  # 128 random bits: no file holds it by chance
    metadata = json.dumps({"name": name, "contentType": content_type, "md5Hash": base64.b64encode(md5).decode()})
    head = (
        f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n"
        f"--{boundary}\r\ncontent-type: {content_type}\r\n\r\n"
    ).encode()
    body = _Framed(head, _SpoolBody(spool, 0, size), f"\r\n--{boundary}--".encode())
    headers = {"Content-Type": f'multipart/related; boundary="{boundary}"'}
    attempts = 0
    while True:
        try:
            response = http.post(url, params={"uploadType": "multipart"}, data=body, headers=headers,
                                 timeout=UPLOAD_PIECE_TIMEOUT)  # fmt: skip
            status = response.status_code
            if status in (200, 201):
                resource: dict[str, Any] = response.json()
                return resource
            failure: BaseException = _retryable_failure(response, what)
        except requests.RequestException as exc:
            failure = exc
        attempts += 1
        _wait_or_give_up(failure, attempts, what)


def upload_in_pieces(
    http: Any, start_session: Callable[[], str], head: bytes, source: Iterator[bytes], what: str
) -> None:
    """Send ``head`` then the rest of ``source`` to a resumable upload session, with ``http``, the
    storage client's authorized session. ``start_session`` opens it (returns its URL) once the
    first piece is spooled: a source that fails before has left nothing behind. The session is
    cancelled on any later failure."""
    session: list[str] = []
    try:
        with (
            tempfile.TemporaryFile(prefix="cmbcluster-gcs-upload-") as first,
            tempfile.TemporaryFile(prefix="cmbcluster-gcs-upload-") as second,
        ):
            _upload_pieces(http, start_session, session, (first, second), _Pieces(head, source), what)
    except BaseException:
        if session:
            _cancel_session(http, session[0], what)
        raise


class _Pieces:
    """``head`` then ``source``, cut into spooled pieces of UPLOAD_PIECE_SIZE. One source chunk is
    read ahead, so that the last piece is known as such when it is sent."""

    def __init__(self, head: bytes, source: Iterator[bytes]) -> None:
        self._source = source
        self._pending: bytes | None = head or _next_bytes(source)
        self.stop = threading.Event()

    def fill(self, spool: BinaryIO, limit: int) -> tuple[int, bool]:
        """Spool the next piece, of ``limit`` bytes unless the source ends first; its size, and
        whether it is the last."""
        spool.seek(0)
        spool.truncate()
        size = 0
        while self._pending is not None and size < limit and not self.stop.is_set():
            taken = self._pending[: limit - size]
            spool.write(taken)
            size += len(taken)
            self._pending = self._pending[len(taken) :] or _next_bytes(self._source)
        spool.flush()
        return size, self._pending is None


def _upload_pieces(
    http: Any,
    start_session: Callable[[], str],
    session: list[str],
    spools: tuple[BinaryIO, BinaryIO],
    pieces: _Pieces,
    what: str,
) -> None:
    """Send the pieces to a resumable session (its URL appended to ``session`` once started); the
    next piece is spooled (by a reading thread, into the other spool) while one is sent."""
    offset = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gcs-upload-read") as reader:
        try:
            filling = reader.submit(pieces.fill, spools[0], FIRST_PIECE_SIZE)
            index = 0
            while True:
                size, last = filling.result()
                if not session:
                    session.append(start_session())
                spool = spools[index % 2]
                if not last:
                    filling = reader.submit(pieces.fill, spools[(index + 1) % 2], UPLOAD_PIECE_SIZE)
                _put_piece(http, session[0], spool, offset, size, offset + size if last else None, what)
                if last:
                    return
                offset += size
                index += 1
        finally:
            pieces.stop.set()  # a failed send: the reading thread stops at its next chunk


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
            failure: BaseException = _retryable_failure(response, what, also=308)  # 308: nothing more stored
        except requests.RequestException as exc:
            failure = exc
        attempts += 1
        _wait_or_give_up(failure, attempts, what)
        start = max(start, _stored_bytes(http, session, offset))


def _retryable_failure(response: Any, what: str, *, also: int | None = None) -> BaseException:
    """What a request or piece that did not succeed failed with, to retry; raised at once (typed)
    when its status is not worth retrying (``also``: one more status that is)."""
    status = response.status_code
    if status not in _RETRYABLE_STATUSES and status != also:
        raise error_for_status(status, what, service=GCS, detail=response.text[:500], response=response)
    return ProviderUnavailable(f"{GCS} answered {status} for {what}")


def _wait_or_give_up(failure: BaseException, attempts: int, what: str) -> None:
    """After a failed attempt of a request or piece: wait before the next one, or raise the
    failure as a typed error once UPLOAD_PIECE_ATTEMPTS have failed."""
    if attempts >= UPLOAD_PIECE_ATTEMPTS:
        mapped = translate_error(failure, what) or failure
        raise mapped from failure
    time.sleep(min(2**attempts * 0.5, 10))


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

    def __init__(self, spool: IO[bytes], start: int, length: int) -> None:
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


class _Framed:
    """A request body: ``head``, the bytes of ``body``, then ``tail``, streamed (with its length)."""

    def __init__(self, head: bytes, body: _SpoolBody, tail: bytes) -> None:
        self._head, self._body, self._tail = head, body, tail

    def __len__(self) -> int:
        return len(self._head) + len(self._body) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        yield from self._body
        yield self._tail


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
