"""First load of the web UI's dashboard: JavaScript transferred (compressed) and time to interactive.

Runs `cmbcluster serve` on the embedded default, signs in through its development sign-in in
Debian's Chromium (driven by Playwright), then loads the dashboard with an empty cache a few
times. Targets (issue 7): at most 250 kB of compressed JavaScript, interactive within 1 s.
Prints the figures; exits 1 when a target is missed. The browser test
(tests/browser/test_ui.py) measures the same way, with a real OIDC provider.

    python tests/benchmarks/bench_ui.py [--runs N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from browser.conftest import CHROMIUM, CHROMIUM_ARGS, UI_BUILT  # noqa: E402
from browser.measure import JS_BUDGET_BYTES, TTI_BUDGET_SECONDS, measure_first_load  # noqa: E402

from cmbcluster.testing.process import ServeProcess, clean_environ  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("bench_ui: skipped, Playwright is not installed (`./run nox -s tests-browser` measures it too)")
        return 0
    if not CHROMIUM.exists():
        print(f"bench_ui: skipped, no Chromium at {CHROMIUM} (`apt-get install -y --no-install-recommends chromium`)")
        return 0
    if not UI_BUILT.exists():
        subprocess.run([sys.executable, str(ROOT / "frontend" / "build_ui.py")], check=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        env = clean_environ({"CMBCLUSTER_DATA_DIR": str(Path(tmp) / "data")})
        with ServeProcess(env, Path(tmp)) as server:
            server.wait_ready("/readyz")
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(base_url=server.url)
            page = context.new_page()
            page.goto("/signin/")
            page.get_by_role("link", name="Sign in with").click()
            page.get_by_label("E-mail address").fill("bench@example.org")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_function("window.__cmbclusterReady !== undefined")
            figures = measure_first_load(browser, server.url, context.storage_state(), runs=args.runs)
            browser.close()
    js, tti = figures["js_bytes_compressed"], figures["time_to_interactive_s"]
    print(
        f"web UI, first load of the dashboard: {js / 1000:.1f} kB JavaScript compressed "
        f"({figures['js_bytes_uncompressed'] / 1000:.1f} kB uncompressed, {figures['js_files']} files; "
        f"target <= {JS_BUDGET_BYTES / 1000:.0f} kB); time to interactive {tti * 1000:.0f} ms median of "
        f"{figures['runs']} (target <= {TTI_BUDGET_SECONDS * 1000:.0f} ms)"
    )
    return 0 if js <= JS_BUDGET_BYTES and tti <= TTI_BUDGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
