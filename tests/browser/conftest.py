"""Browser tests: Debian's Chromium, driven by Playwright, against a real ``cmbcluster serve``.

The server runs the embedded default with a real OpenID Connect provider (oidc-provider-mock)
as its only sign-in, configured as the generic ``oidc`` provider. Chromium comes from Debian
(``apt-get install --no-install-recommends chromium``; the ``tests-browser`` nox session installs it when missing):
Playwright cannot download its own browsers here.

The files share one server and one signed-in browser session per person (``people``): whichever
file runs first, or alone, Alice signs in before anyone else, so she is the server's first user
and administers. Each file's own people (Dana, Erin...) keep to their own file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    ViewportSize,
    expect,
    sync_playwright,
)

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
SIZES: dict[str, ViewportSize] = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
# How many lines an element's text is laid out on (a word cut in two takes two).
LINES_OF_TEXT = "e => { const r = document.createRange(); r.selectNodeContents(e); return r.getClientRects().length }"
#: The console error of a signed-out page's first request (the UI then shows the sign-in page).
UNAUTHORIZED = "status of 401"
#: Dana's display name: 200 characters, to find where long names break the layout.
LONG_NAME = ("Dana " + "Bolometric-Cosmic-Microwave-Background-Polarimetry-" * 4)[:200]
#: Everyone who signs in, by their subject at the identity provider, with the claims it gives.
PEOPLE: dict[str, dict[str, object]] = {
    sub: {"email": f"{sub}@example.org", "email_verified": True, "name": name}
    for sub, name in {
        "alice": "Alice Admin", "bob": "Bob Bolometer", "carol": "Carol Cosmology", "dana": LONG_NAME,
        "erin": "Erin Ellipticity",
    }.items()
}  # fmt: skip
#: The server's first user, so its administrator: signed in before anyone else.
ADMIN = "alice"


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


OpenSession = Callable[[], Session]


@pytest.fixture(scope="session")
def open_session(browser: Browser, server: ServeProcess) -> Iterator[OpenSession]:
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


@contextmanager
def expecting(session: Session, *texts: str) -> Iterator[None]:
    """Console errors the test causes on purpose (a signed-out visit is a 401 for the UI too)."""
    session.console.expected.extend(texts)
    try:
        yield
    finally:
        del session.console.expected[-len(texts) :]


def sign_in(session: Session, sub: str) -> None:
    """Sign in the way a person does: the UI's provider button, then the identity provider's form."""
    page = session.page
    with expecting(session, UNAUTHORIZED):
        page.goto("/")
        expect(page).to_have_url(re.compile(r"/signin/\?next=%2F$"))
        page.get_by_role("link", name=f"Sign in with {PROVIDER_DISPLAY_NAME}").click()
        page.locator("input[name=sub]").fill(sub)
        page.get_by_role("button", name="Authorize").click()
        expect(page.get_by_role("heading", name=f"Welcome, {PEOPLE[sub]['name']}")).to_be_visible()


class People:
    """One signed-in browser session per person for the whole run, made on first use; the
    administrator's first of all."""

    def __init__(self, open_session: OpenSession) -> None:
        self._open_session = open_session
        self._signed_in: dict[str, Session] = {}

    def __call__(self, sub: str) -> Session:
        if sub not in self._signed_in:
            if sub != ADMIN:
                self(ADMIN)
            session = self._open_session()
            sign_in(session, sub)
            self._signed_in[sub] = session
        return self._signed_in[sub]


@pytest.fixture(scope="session")
def people(open_session: OpenSession, oidc: OidcMockServer) -> People:
    """Everyone in ``PEOPLE``, known to the identity provider; ``people(sub)`` is their session.
    A test that signs someone out or locks them out does it in a session of its own."""
    for sub, claims in PEOPLE.items():
        oidc.put_user(sub, claims)
    return People(open_session)


@pytest.fixture
def alice(people: People) -> Session:
    """The administrator's browser, signed in."""
    return people(ADMIN)


def api(page: Page, method: str, path: str, **kwargs: Any) -> Any:
    """The API with the page's own session (to arrange and to check what the UI shows). A change
    carries the page's Origin, as the browser's own requests do: with the session cookie and no
    Origin, the server refuses it."""
    if method not in ("GET", "HEAD"):
        origin = re.match(r"https?://[^/]+", page.url)
        assert origin is not None, f"the page is not on the server: {page.url}"
        kwargs["headers"] = {"Origin": origin.group(0), **kwargs.get("headers", {})}
    response = page.request.fetch(path, method=method, **kwargs)
    assert response.ok, f"{method} {path}: {response.status} {response.text()}"
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else None


def assert_clean(session: Session) -> None:
    """No console error or uncaught exception on the session's pages, but those expected."""
    assert session.console.errors == [], "\n".join(session.console.errors)
