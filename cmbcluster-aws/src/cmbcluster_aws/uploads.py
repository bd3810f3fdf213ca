"""Uploads to S3 in constant memory: one PutObject for a small object, else a multipart upload whose
parts are spooled (in memory while small, in a temporary file past 1 MiB) and sent a few at once.

All or nothing: if the source fails, or S3 does, the multipart upload is aborted and no object (and
no loss of the previous version) results.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import tempfile
from collections.abc import Iterable
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from cmbcluster.errors import PayloadTooLarge
from cmbcluster_aws.errors import map_aws_error

__all__ = ["DEFAULT_PART_SIZE", "MAX_PART_SIZE", "MIN_PART_SIZE", "part_size", "upload"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
SPOOL_IN_MEMORY = MiB  # a part being filled moves from memory to a temporary file past this
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
UPLOAD_PARTS_IN_FLIGHT = 4  # parts of one upload sent at once (boto3's transfer manager sends 10)
PART_GROWTH_EVERY = 1_000  # parts; see part_size


def part_size(base: int, part_number: int) -> int:
    """Parts grow by one ``base`` size every 1000 parts, so 10,000 parts of an 8 MiB base hold
    430 GiB while the buffer stays bounded (at most 10 base parts)."""
    if part_number > MAX_PARTS:
        raise PayloadTooLarge(f"object exceeds the {MAX_PARTS} parts S3 allows")
    return min(base * (1 + (part_number - 1) // PART_GROWTH_EVERY), MAX_PART_SIZE)


def upload(client: Any, chunks: Iterable[bytes], *, params: dict[str, Any], base_part_size: int) -> None:
    """Store the object ``params`` describe (Bucket, Key, ContentType, StorageClass) from ``chunks``.

    botocore failures become typed errors; the caller's own error (a broken stream) is re-raised
    as it is, once the upload is aborted.
    """
    upload_id: str | None = None
    # Each full part waits in its own temporary file while it goes up, so the server's memory
    # stays flat (one source chunk) whatever the part size. Up to UPLOAD_PARTS_IN_FLIGHT parts
    # go up at once, as boto3's transfer manager does (one at a time, S3 and moto alike give
    # half the bandwidth); the source waits while that many are in flight, so disk use stays
    # bounded too.
    in_flight: list[tuple[_PartSpool, concurrent.futures.Future[dict[str, Any]]]] = []
    parts: list[dict[str, Any]] = []
    number = 0
    spool = _PartSpool()
    pool = concurrent.futures.ThreadPoolExecutor(UPLOAD_PARTS_IN_FLIGHT, thread_name_prefix="cmbcluster-s3-part")

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            done_spool, future = in_flight.pop(0)
            try:
                parts.append(future.result())
            finally:
                done_spool.close()

    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                size = part_size(base_part_size, number + 1)
                if spool.size == size:
                    # Strictly more than a part: the last part is never empty, and an object
                    # of exactly one part goes up in a single PutObject.
                    if upload_id is None:
                        upload_id = client.create_multipart_upload(**params)["UploadId"]
                    number += 1
                    settle(UPLOAD_PARTS_IN_FLIGHT - 1)
                    future = pool.submit(_upload_part, client, params, upload_id, number, spool.body())
                    in_flight.append((spool, future))
                    spool = _PartSpool()
                view = view[spool.write(view[: size - spool.size]) :]
        if upload_id is None:
            client.put_object(Body=spool.body(), **params)
        else:
            number += 1
            parts_done = _upload_part(client, params, upload_id, number, spool.body())
            settle(0)
            parts.append(parts_done)
            client.complete_multipart_upload(
                Bucket=params["Bucket"], Key=params["Key"], UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
    except BaseException as exc:
        for _, future in in_flight:
            future.cancel()
        pool.shutdown(wait=True)  # nothing may still be sending when the upload is aborted
        if upload_id is not None:
            _abort_upload(client, params, upload_id)
        if isinstance(exc, (ClientError, BotoCoreError)):
            raise map_aws_error(exc, f"object {params['Key']}") from exc
        raise  # the caller's own error (a broken stream): re-raised as it is
    finally:
        pool.shutdown(wait=True)
        spool.close()
        for leftover, _ in in_flight:
            leftover.close()


def _upload_part(client: Any, params: dict[str, Any], upload_id: str, number: int, data: IO[bytes]) -> dict[str, Any]:
    response = client.upload_part(
        Bucket=params["Bucket"], Key=params["Key"], UploadId=upload_id, PartNumber=number, Body=data
    )
    part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
    for checksum in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"):
        if response.get(checksum):
            part[checksum] = response[checksum]
    return part


def _abort_upload(client: Any, params: dict[str, Any], upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=params["Bucket"], Key=params["Key"], UploadId=upload_id)
    except (ClientError, BotoCoreError):
        # The control plane's next start aborts it (it journals every upload), and the bucket's
        # lifecycle rule after a day whatever happens; the caller gets the original error.
        log.warning("could not abort multipart upload %s of %s/%s", upload_id, params["Bucket"], params["Key"],
                    exc_info=True)  # fmt: skip


class _PartSpool:
    """The part being filled: in memory while small (most objects), in an anonymous temporary
    file past :data:`SPOOL_IN_MEMORY`."""

    def __init__(self) -> None:
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None
        self.size = 0

    def write(self, data: memoryview) -> int:
        if self._file is None:  # closed by close()
            self._file = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, prefix="cmbcluster-s3-part-")  # noqa: SIM115
        written = self._file.write(data)
        self.size += written
        return written

    def body(self) -> IO[bytes]:
        """The part, from its start (botocore reads it to the end and seeks back to retry)."""
        if self._file is None:
            return io.BytesIO(b"")
        self._file.flush()
        self._file.seek(0)
        return self._file

    def clear(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self.size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
