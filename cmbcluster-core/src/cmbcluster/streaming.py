"""Bridges between async byte streams (ASGI bodies) and the blocking iterators providers use.

Storage backends are synchronous (see :mod:`cmbcluster.interfaces.storage`): an upload is a
blocking call that pulls ``bytes`` chunks from an iterator, a download a blocking iterator.
These helpers run that blocking side in a worker thread and move the bytes across in bounded
memory:

- :func:`consume_in_thread` feeds an async source to a blocking consumer through a queue of a
  few chunks (back-pressure: the source is read no faster than the consumer writes), and makes
  the consumer's iterator *raise* when the source fails, so an all-or-nothing backend aborts
  instead of storing a truncated object.
- :func:`iterate_in_thread` turns a blocking iterator into an async one, one thread hop per
  chunk, and closes it (in a thread) however the async side stops.
- :func:`rechunk`, :func:`limit_bytes` and :func:`idle_timeout` shape the source: larger chunks
  mean fewer thread hops; a size limit and a stalled client stop it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

T = TypeVar("T")

#: Chunks handed across threads: large enough that a thread hop per chunk costs nothing
#: measurable, small enough that a few of them in flight stay well under any memory budget.
CHUNK_SIZE = 1024 * 1024


class StreamAborted(Exception):
    """Raised inside a consumer's iterator when the source stopped early (an error, a disconnect,
    a size limit): the consumer must not treat the bytes it got as a complete stream."""


async def rechunk(
    source: AsyncIterable[bytes], size: int = CHUNK_SIZE, *, max_wait: float | None = None
) -> AsyncIterator[bytes]:
    """Regroup ``source`` into chunks of at least ``size`` bytes (the last may be shorter); with
    ``max_wait``, also pass on what arrived once that many seconds went by since the last chunk (a
    slow client's bytes still reach the consumer, which renews the upload's hold as they come)."""
    parts: list[bytes] = []
    buffered = 0
    last = time.monotonic()
    async for piece in source:
        if not piece:
            continue
        parts.append(piece)
        buffered += len(piece)
        if buffered >= size or (max_wait is not None and time.monotonic() - last >= max_wait):
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            buffered = 0
            last = time.monotonic()
    if parts:
        yield b"".join(parts)


async def limit_bytes(
    source: AsyncIterable[bytes], max_bytes: int, exceeded: Callable[[int], BaseException]
) -> AsyncIterator[bytes]:
    """Pass ``source`` through, raising ``exceeded(max_bytes)`` as soon as it runs past ``max_bytes``."""
    total = 0
    async for piece in source:
        total += len(piece)
        if total > max_bytes:
            raise exceeded(max_bytes)
        yield piece


async def idle_timeout(
    source: AsyncIterable[bytes], seconds: float, expired: Callable[[], BaseException]
) -> AsyncIterator[bytes]:
    """Pass ``source`` through, raising ``expired()`` once no piece arrived for ``seconds`` (a
    client that stalled holds its upload's resources no longer than that)."""
    pieces = aiter(source)
    while True:
        with anyio.move_on_after(seconds) as waiting:
            piece = await anext(pieces, None)
        if waiting.cancelled_caught:
            raise expired()
        if piece is None:
            return
        yield piece


async def consume_in_thread(
    source: AsyncIterable[bytes],
    consumer: Callable[[Iterator[bytes]], T],
    *,
    max_buffered: int = 4,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run ``consumer(chunks)`` in a worker thread, ``chunks`` yielding what ``source`` yields.

    At most ``max_buffered`` chunks wait between the two sides. If ``source`` raises, the
    iterator the consumer reads raises :class:`StreamAborted` (chained to the cause) and this
    function re-raises the source's exception once the consumer has stopped. If the consumer
    fails or returns early, reading ``source`` stops and the consumer's exception propagates.
    The consumer may read ``chunks`` from any thread, one thread at a time.
    """
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=max_buffered)
    # Set by the producer before it closes ``send``, read by the consumer thread when the stream
    # ends: an end of stream after an abort is an error, never a complete body.
    aborted: list[BaseException] = []
    # The consumer may read its iterator from a thread of its own (a backend that reads ahead
    # while it sends): the loop's token lets any thread reach it, not only the worker thread.
    loop = anyio.lowlevel.current_token()

    def chunks() -> Iterator[bytes]:
        while not aborted:
            try:
                chunk = anyio.from_thread.run(receive.receive, token=loop)
            except anyio.EndOfStream:
                break
            yield chunk
        if aborted:
            raise StreamAborted("the stream ended early") from aborted[0]

    def run_consumer() -> T:
        try:
            return consumer(chunks())
        finally:
            # Wakes a producer blocked on a full queue when the consumer stops early.
            anyio.from_thread.run_sync(receive.close)

    producer_error: Exception | None = None
    consumer_error: Exception | None = None
    result: T | None = None

    async def produce() -> None:
        nonlocal producer_error
        try:
            async for chunk in source:
                await send.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer stopped reading; its own outcome says why
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the consumer has stopped
            aborted.append(exc)
            producer_error = exc
        except BaseException as exc:  # cancelled: abort the consumer too
            aborted.append(exc)
            raise
        finally:
            send.close()

    async with anyio.create_task_group() as group:
        group.start_soon(produce)
        try:
            result = await anyio.to_thread.run_sync(run_consumer, limiter=limiter)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the producer's error if any
            consumer_error = exc
        # The consumer is done: a producer still waiting for source bytes has nothing to feed.
        group.cancel_scope.cancel()
    if producer_error is not None:
        raise producer_error
    if consumer_error is not None:
        raise consumer_error
    return cast(T, result)  # neither side failed: the consumer returned


def _next_chunk(iterator: Iterator[bytes]) -> bytes | None:
    return next(iterator, None)


async def iterate_in_thread(
    iterator: Iterator[bytes], *, limiter: anyio.CapacityLimiter | None = None
) -> AsyncIterator[bytes]:
    """Iterate a blocking ``iterator`` from async code, each ``next()`` in a worker thread.

    The iterator is closed (in a thread, shielded from cancellation) when iteration ends for
    any reason: exhausted, an error, or the async consumer going away (a client disconnect).
    """
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(_next_chunk, iterator, limiter=limiter)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close, limiter=limiter)
