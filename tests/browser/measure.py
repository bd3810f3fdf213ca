"""First load of the dashboard: JavaScript transferred (compressed) and time to interactive.

Shared by the browser test (which holds the byte budget and prints the time) and
tests/benchmarks/bench_ui.py (which holds both budgets).
"""

from __future__ import annotations

import statistics
from typing import Any

from playwright.sync_api import Browser, Response

# The targets: at most 250 kB of compressed JavaScript, interactive within a second.
JS_BUDGET_BYTES = 250_000
TTI_BUDGET_SECONDS = 1.0
RUNS = 3


def measure_first_load(browser: Browser, base_url: str, storage_state: Any, runs: int = RUNS) -> dict[str, Any]:
    """Load the dashboard ``runs`` times, each in a fresh context (empty cache) signed in with ``storage_state``.

    JavaScript bytes are the encoded (compressed) response bodies of every script the page loads;
    time to interactive is ``performance.now()`` when the dashboard, hydrated, has shown its data
    (the page records it in ``window.__cmbclusterReady``).
    """
    compressed: list[int] = []
    uncompressed: list[int] = []
    files: list[int] = []
    tti: list[float] = []
    for _ in range(runs):
        context = browser.new_context(base_url=base_url, storage_state=storage_state)
        page = context.new_page()
        responses: list[Response] = []

        def record(response: Response, into: list[Response] = responses) -> None:
            into.append(response)

        page.on("response", record)
        page.goto("/", wait_until="load")
        page.wait_for_function("window.__cmbclusterReady !== undefined", timeout=10_000)
        ready_ms = page.evaluate("window.__cmbclusterReady")
        page.wait_for_load_state("networkidle")
        scripts = [r for r in responses if r.request.resource_type == "script"]
        sizes = [(r.request.sizes()["responseBodySize"], len(r.body())) for r in scripts]
        context.close()
        compressed.append(sum(c for c, _ in sizes))
        uncompressed.append(sum(u for _, u in sizes))
        files.append(len(sizes))
        tti.append(ready_ms / 1000)
    return {
        "js_bytes_compressed": max(compressed),
        "js_bytes_uncompressed": max(uncompressed),
        "js_files": max(files),
        "time_to_interactive_s": statistics.median(tti),
        "time_to_interactive_runs_s": tti,
        "runs": runs,
    }
