"""The async <-> blocking stream bridges the storage API transfers objects through."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from cmbcluster.streaming import (
    StreamAborted,
    consume_in_thread,
    idle_timeout,
    iterate_in_thread,
    limit_bytes,
    rechunk,
)


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await anyio.sleep(0)
        yield part


async def collect(source: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in source]


def test_rechunk_groups_small_pieces_without_losing_bytes() -> None:
    chunks = anyio.run(collect, rechunk(pieces(b"ab", b"", b"cd", b"efg", b"h"), 4))
    assert chunks == [b"abcd", b"efgh"]
    assert anyio.run(collect, rechunk(pieces(b"abcdef", b"g"), 4)) == [b"abcdef", b"g"]
    assert anyio.run(collect, rechunk(pieces(), 4)) == []


def test_limit_bytes_raises_once_past_the_limit() -> None:
    assert anyio.run(collect, limit_bytes(pieces(b"abc", b"de"), 5, OverflowError)) == [b"abc", b"de"]
    with pytest.raises(OverflowError):
        anyio.run(collect, limit_bytes(pieces(b"abc", b"def"), 5, OverflowError))


def test_idle_timeout_stops_a_source_that_stalls_not_one_that_is_slow() -> None:
    async def paced(*gaps: float) -> AsyncIterator[bytes]:
        for gap in gaps:
            await anyio.sleep(gap)
            yield b"x"

    # each piece within the timeout, all of them well past it: nothing stops
    assert anyio.run(collect, idle_timeout(paced(0.1, 0.1, 0.1, 0.1, 0.1), 0.2, TimeoutError)) == [b"x"] * 5
    got: list[bytes] = []

    async def read_until_stalled() -> None:
        async for piece in idle_timeout(paced(0, 0, 30), 0.2, TimeoutError):
            got.append(piece)

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        anyio.run(read_until_stalled)
    assert time.monotonic() - began < 5  # after 0.2 s, not after the source's 30
    assert got == [b"x", b"x"]


def test_consume_in_thread_passes_every_chunk_in_order_from_a_worker_thread() -> None:
    threads: set[int] = set()

    def consumer(chunks: Iterator[bytes]) -> bytes:
        threads.add(threading.get_ident())
        return b"".join(chunks)

    parts = [bytes([i]) * 1000 for i in range(50)]
    assert anyio.run(lambda: consume_in_thread(pieces(*parts), consumer)) == b"".join(parts)
    assert threading.get_ident() not in threads


def test_the_consumer_may_read_its_chunks_from_a_thread_of_its_own() -> None:
    # A backend may read ahead in a thread of its own while it sends (the GCS upload spools its
    # next piece so): the iterator must work there, not only in the worker thread that got it.
    def consumer(chunks: Iterator[bytes]) -> bytes:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
            return reader.submit(b"".join, chunks).result()

    parts = [bytes([i]) * 1000 for i in range(50)]
    assert anyio.run(lambda: consume_in_thread(pieces(*parts), consumer)) == b"".join(parts)


def test_a_failing_source_makes_the_consumer_abort_and_is_raised() -> None:
    seen: list[object] = []

    async def failing() -> AsyncIterator[bytes]:
        yield b"first"
        raise ConnectionResetError("client went away")

    def consumer(chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                seen.append(chunk)
        except StreamAborted as exc:
            seen.append(exc)
            raise

    with pytest.raises(ConnectionResetError):
        anyio.run(lambda: consume_in_thread(failing(), consumer))
    assert seen[:-1] in ([], [b"first"])  # buffered chunks may be skipped: the abort is noticed first
    assert isinstance(seen[-1], StreamAborted) and isinstance(seen[-1].__cause__, ConnectionResetError)


def test_a_consumer_that_fails_early_stops_a_source_that_would_wait_forever() -> None:
    never = anyio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"one"
        await never.wait()  # a client that stops sending
        yield b"two"

    def consumer(chunks: Iterator[bytes]) -> None:
        next(chunks)
        raise PermissionError("refused by the backend")

    async def main() -> None:
        with anyio.fail_after(5):
            await consume_in_thread(stalled(), consumer)

    with pytest.raises(PermissionError):
        anyio.run(main)


def test_the_source_is_read_no_further_ahead_than_the_buffer() -> None:
    produced = 0
    ahead: list[int] = []

    async def counting() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(40):
            produced += 1
            yield b"x"

    def slow_consumer(chunks: Iterator[bytes]) -> int:
        consumed = 0
        for _ in chunks:
            consumed += 1
            threading.Event().wait(0.002)
            ahead.append(produced - consumed)
        return consumed

    assert anyio.run(lambda: consume_in_thread(counting(), slow_consumer, max_buffered=3)) == 40
    assert max(ahead) <= 3 + 1  # the queue, plus the one chunk the producer holds while blocked


def test_iterate_in_thread_closes_the_iterator_when_the_reader_stops_early() -> None:
    closed = threading.Event()
    threads: set[int] = set()

    def blocking() -> Iterator[bytes]:
        try:
            for i in range(100):
                threads.add(threading.get_ident())
                yield bytes([i])
        finally:
            closed.set()

    async def main() -> list[bytes]:
        got = []
        stream = iterate_in_thread(blocking())
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return got

    assert anyio.run(main) == [b"\x00", b"\x01", b"\x02"]
    assert closed.is_set()
    assert threading.get_ident() not in threads
    assert anyio.run(collect, iterate_in_thread(iter([b"a", b"b"]))) == [b"a", b"b"]
