"""200 signed-in users asking the server at the same moment, as a class logging in together would:
routes that run in worker threads answer them all, promptly. Their requests once held every
connection of the database pool while waiting for a worker to validate their answers, and the
workers waited for a connection: the server answered nothing until the pool's timeout.

A real `cmbcluster serve` on the embedded default; distinct users, each with their own session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from cmbcluster.api.server import raise_open_file_limit
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

USERS = 200
#: every request of a round answered within (the server answered nothing for 30 s before)
ROUND_SECONDS = 20.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, list[dict[str, str]]]]:
    root = tmp_path_factory.mktemp("users")
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(root / "data"), "CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE": "10000"})
    with ServeProcess(env, root) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            users = [dev_sign_in(http, f"scientist{i}@example.org") for i in range(USERS)]
        yield server, users


# The settings pages' reads (sync routes, each validating its answer in a second worker hop) and a
# bucket list: what a page load of the web UI asks, each from every user at once.
@pytest.mark.parametrize("path", ["/api/v1/settings/env-vars", "/api/v1/settings/secret-files", "/api/v1/storages"])
def test_every_user_at_once_is_answered(
    served: tuple[ServeProcess, list[dict[str, str]]], path: str, record_property: Callable[[str, object], None]
) -> None:
    server, users = served
    raise_open_file_limit()  # 200 simultaneous connections of this process

    async def round_of_requests() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=USERS)
        async with httpx.AsyncClient(base_url=server.url, timeout=ROUND_SECONDS, limits=limits) as http:

            async def one(headers: dict[str, str]) -> tuple[int, float]:
                began = time.monotonic()
                answer = await http.get(path, headers=headers)
                return answer.status_code, time.monotonic() - began

            return await asyncio.gather(*(one(headers) for headers in users))

    for _ in range(2):  # the second round on a warm server
        try:
            answers = asyncio.run(round_of_requests())
        except httpx.TimeoutException:
            raise AssertionError(f"a request waited over {ROUND_SECONDS}s:\n{server.output()[-3000:]}") from None
        statuses = sorted({status for status, _ in answers})
        assert statuses == [200], f"{statuses}:\n{server.output()[-3000:]}"
    slowest = max(seconds for _, seconds in answers)
    record_property(f"figure: slowest answer in seconds, {USERS} users at once on {path}", f"{slowest:.2f}")
