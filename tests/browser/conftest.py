"""Browser tests: Debian's Chromium, driven by Playwright, against a real ``cmbcluster serve``.

The server runs the embedded default with a real OpenID Connect provider (oidc-provider-mock)
as its only sign-in, configured as the generic ``oidc`` provider. Chromium comes from Debian
(``apt-get install --no-install-recommends chromium``; the ``tests-browser`` nox session installs it when missing):
Playwright cannot download its own browsers here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, sync_playwright

from cmbcluster.testing.oidc import OidcMockServer
from cmbcluster.testing.process import ServeProcess, clean_environ

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / ".reports"
SCREENSHOTS = REPORTS / "screenshots"
CHROMIUM = Path(os.environ.get("CMBCLUSTER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
PROVIDER_DISPLAY_NAME = "Lab identity"
UI_BUILT = ROOT / "cmbcluster-core" / "src" / "cmbcluster" / "webui_static" / "index.html"


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `apt-get install -y --no-install-recommends chromium` "
            "(the tests-browser session does)"
        )
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def oidc() -> Iterator[OidcMockServer]:
    with OidcMockServer() as server:
        yield server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, oidc: OidcMockServer) -> Iterator[ServeProcess]:
    if not UI_BUILT.exists():
        pytest.fail("the web UI is not built: run `python frontend/build_ui.py` (the tests-browser session does)")
    workdir = tmp_path_factory.mktemp("serve")
    env = clean_environ(
        {
            "CMBCLUSTER_DATA_DIR": str(workdir / "data"),
            "CMBCLUSTER_AUTH_PROVIDERS": "oidc,local",
            "CMBCLUSTER_OIDC_ISSUER": oidc.issuer,
            "CMBCLUSTER_OIDC_CLIENT_ID": "cmbcluster",
            "CMBCLUSTER_OIDC_CLIENT_SECRET": "a-client-secret",
            "CMBCLUSTER_OIDC_DISPLAY_NAME": PROVIDER_DISPLAY_NAME,
            # Shutdown warnings are decided by the background pass: run it every second, not every 15.
            "CMBCLUSTER_RECONCILE_INTERVAL_SECONDS": "1",
            # Priced, so that the usage pages show money (the embedded default prices nothing); a
            # cent per core-second, so that the few seconds environments run in these tests show.
            "CMBCLUSTER_PRICES": '{"vcpu_hour": 36, "gib_hour": 1, "storage_gb_month": {"standard": 0.02}}',
        }
    )
    with ServeProcess(env, workdir) as process:
        process.wait_ready("/readyz")
        yield process


@dataclass
class ConsoleErrors:
    """Console errors and uncaught exceptions of our own pages (not the identity provider's)."""

    origin: str
    errors: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error" and page.url.startswith(self.origin):
                text = f"{page.url}: {message.text}"
                if any(allowed in message.text for allowed in self.expected):
                    return
                self.errors.append(text)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: uncaught {exc}"))


@dataclass
class Session:
    """One person's browser context on the server."""

    context: BrowserContext
    page: Page
    console: ConsoleErrors


@pytest.fixture(scope="session")
def open_session(browser: Browser, server: ServeProcess) -> Iterator[object]:
    """A factory of fresh browser contexts; every page is watched for console errors."""
    made: list[Session] = []

    def make() -> Session:
        context = browser.new_context(
            base_url=server.url, viewport={"width": 1280, "height": 860}, accept_downloads=True
        )
        # Nothing beyond loopback: the identity provider's page links a CDN stylesheet.
        context.route(lambda url: not url.startswith(("http://127.0.0.1", "data:")), lambda route: route.abort())
        console = ConsoleErrors(origin=server.url)
        context.on("page", console.watch)
        page = context.new_page()
        made.append(Session(context, page, console))
        return made[-1]

    yield make
    for session in made:
        session.context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
