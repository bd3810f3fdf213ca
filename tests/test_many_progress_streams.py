"""1,000 progress streams left open while environments wait to start, as 200 launch dialogs
would (a cluster autoscaler adding nodes keeps them open for minutes): the streams hold no
database connection and no worker thread, and creates, lists and sign-ins still answer.

A real `cmbcluster serve` on the embedded default; each environment runs `sleep`, which never
opens its port, so it stays "starting" for as long as the test needs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from cmbcluster.api.server import raise_open_file_limit
from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

ENVIRONMENTS = 200
STREAMS_PER_ENVIRONMENT = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("streams")
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(root / "data"),
        "CMBCLUSTER_MAX_ENVIRONMENTS_PER_USER": "1000",
        "CMBCLUSTER_MAX_CONCURRENT_STARTS": "1000",
        "CMBCLUSTER_START_TIMEOUT_SECONDS": "3600",
        "CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE": "1000",
    })  # fmt: skip
    with ServeProcess(env, root) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            admin = dev_sign_in(http, "ada@example.org")
            sleeper = {"slug": "waits", "name": "Waits", "image": "local", "command": [shutil.which("sleep"), "3600"]}
            assert http.post("/api/v1/applications", json=sleeper, headers=admin).status_code == 201
            yield server, admin
    # whatever happened to the server, none of its environments may outlive the test
    compute = LocalProcessCompute(root / "data" / "compute")
    for status in compute.list_managed():
        compute.delete(status.environment_id)


def _metric(server: ServeProcess, admin: dict[str, str], name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", headers=admin).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def _create(client: httpx.AsyncClient, headers: dict[str, str], gate: asyncio.Semaphore) -> str:
    async with gate:
        answer = await client.post("/api/v1/environments", json={"application": "waits"}, headers=headers)
    assert answer.status_code == 201, answer.text
    body: dict[str, str] = answer.json()
    return body["id"]


async def _follow(client: httpx.AsyncClient, headers: dict[str, str], environment_id: str, seen: list[str],
                  opened: asyncio.Event, total: int) -> str:  # fmt: skip
    """Follow one stream; return the last status it sent."""
    last = ""
    async with client.stream("GET", f"/api/v1/environments/{environment_id}/events", headers=headers) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))["status"]
                if len(seen) < total:
                    seen.append(last)
                    if len(seen) == total:
                        opened.set()
    return last


async def _until(server: ServeProcess, event: asyncio.Event, followers: list[asyncio.Task[str]],
                 seen: list[str], timeout: float) -> None:  # fmt: skip
    """Wait for ``event``; a stream that ends first (refused, broken, or a state it should not have)
    fails the test at once with what it got, and a timeout says how far the streams came, each with
    the server's last output, instead of a bare TimeoutError."""
    waiting = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait([waiting, *followers], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiting in done:
        return
    waiting.cancel()
    tail = server.output()[-4000:]
    for task in done:
        error = task.exception()
        raise AssertionError(f"a stream ended before every stream opened: {error or task.result()!r}\n{tail}")
    raise AssertionError(f"after {timeout} s, {len(seen)} of {len(followers)} streams sent a first state\n{tail}")


async def _timed(coro_factory: object, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await coro_factory()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return times


async def _scenario(server: ServeProcess, admin: dict[str, str]) -> dict[str, object]:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        gate = asyncio.Semaphore(10)
        ids = await asyncio.gather(*(_create(client, admin, gate) for _ in range(ENVIRONMENTS)))

        async def list_once() -> None:
            assert (await client.get("/api/v1/environments", headers=admin)).status_code == 200

        async def create_once() -> None:
            await _create(client, admin, asyncio.Semaphore(1))

        counter = iter(range(10_000))

        async def sign_in_once() -> None:
            # the development sign-in's three steps, as a browser takes them
            with httpx.Client(base_url=server.url, timeout=30) as http:
                await asyncio.to_thread(dev_sign_in, http, f"user{next(counter)}@example.org")

        before = {
            "list": await _timed(list_once, 20), "create": await _timed(create_once, 5),
            "sign-in": await _timed(sign_in_once, 5),
        }  # fmt: skip

        seen: list[str] = []
        opened = asyncio.Event()
        total = ENVIRONMENTS * STREAMS_PER_ENVIRONMENT
        opening_began = time.perf_counter()
        followers = [
            asyncio.create_task(_follow(client, admin, environment_id, seen, opened, total))
            for environment_id in ids
            for _ in range(STREAMS_PER_ENVIRONMENT)
        ]
        await _until(server, opened, followers, seen, timeout=120)  # every stream sent its first state
        opening = time.perf_counter() - opening_began
        await asyncio.sleep(2)  # and then waits, idle
        held = {
            "streams": _metric(server, admin, "cmbcluster_progress_streams"),
            "connections": _metric(server, admin, "cmbcluster_db_connections_in_use"),
            "threads": _metric(server, admin, "cmbcluster_worker_threads_busy"),
        }
        during = {
            "list": await _timed(list_once, 20), "create": await _timed(create_once, 5),
            "sign-in": await _timed(sign_in_once, 5),
        }  # fmt: skip
        # a change reaches every stream of that environment, and ends them
        started = time.perf_counter()
        assert (await client.post(f"/api/v1/environments/{ids[0]}/stop", headers=admin)).status_code == 200
        ends = await asyncio.wait_for(asyncio.gather(*followers[:STREAMS_PER_ENVIRONMENT]), timeout=30)
        delivered = time.perf_counter() - started
        for task in followers[STREAMS_PER_ENVIRONMENT:]:
            task.cancel()
        await asyncio.gather(*followers[STREAMS_PER_ENVIRONMENT:], return_exceptions=True)
        return {
            "opening": opening, "seen": seen, "held": held, "before": before, "during": during, "ends": ends,
            "delivered": delivered,
        }  # fmt: skip


def test_a_thousand_idle_progress_streams_hold_nothing_and_block_nothing(
    served: tuple[ServeProcess, dict[str, str]], record_property: Callable[[str, object], None]
) -> None:
    server, admin = served
    # the server raises its own limit (api/server.py); this process, the 1,000 browsers, needs as much
    assert raise_open_file_limit() >= 2 * ENVIRONMENTS * STREAMS_PER_ENVIRONMENT, "too few open files allowed"
    result: dict[str, Any] = asyncio.run(_scenario(server, admin))
    assert set(result["seen"]) == {"starting"}
    record_property("figure: seconds until 1000 streams each sent a first state", f"{result['opening']:.1f}")
    held: dict[str, float] = result["held"]
    assert held["streams"] == ENVIRONMENTS * STREAMS_PER_ENVIRONMENT
    # nothing per stream: at most the hub's own read, and a request of the test itself
    assert held["connections"] <= 2 and held["threads"] <= 2, held
    assert result["ends"] == ["stopped"] * STREAMS_PER_ENVIRONMENT
    assert result["delivered"] < 5
    before: dict[str, list[float]] = result["before"]
    during: dict[str, list[float]] = result["during"]
    for what in before:
        usual, now = statistics.median(before[what]), statistics.median(during[what])
        # generous (two shared cores, a hub pass every half second), yet far from "the API stopped"
        assert now <= 3 * usual + 0.25, (what, usual, now)
        record_property(f"figure: median {what} seconds, without / with 1000 open streams", f"{usual:.3f} / {now:.3f}")
