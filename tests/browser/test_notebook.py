"""A newcomer's first notebook: `./run serve` on a fresh data directory, exactly as the README starts
it, then in Chromium: sign in, make a bucket, launch JupyterLab from the catalog, open it through
the control plane's own address, run a cell that writes ``~/data/out.txt``, and find the file on the
storage page. A second person gets 404 on that environment's address and on its WebSocket.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from tests.run_serve import FIRST_START_SECONDS, RunServe

from .conftest import screenshot

CELL = 'import os\nopen(os.path.expanduser("~/data/out.txt"), "w").write("written by a notebook")\n'


@pytest.fixture(scope="module")
def newcomer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunServe]:
    workdir = tmp_path_factory.mktemp("newcomer")
    run = RunServe(workdir, workdir / "data")
    try:
        run.wait_ready(FIRST_START_SECONDS)
        yield run
        run.stop()
    finally:
        run.kill()


def person(browser: Browser, server: RunServe) -> tuple[BrowserContext, Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.route(lambda url: not url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:")), lambda r: r.abort())
    return context, context.new_page()


def dev_sign_in(page: Page, email: str) -> None:
    """The README's way in: the development sign-in, choosing an address."""
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/signin/"))
    page.get_by_role("link", name="Sign in with Development sign-in").click()
    page.get_by_label("E-mail address").fill(email)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=re.compile("^Welcome"))).to_be_visible()


def test_a_notebook_writes_into_a_mounted_bucket_through_the_control_plane(
    browser: Browser, newcomer_server: RunServe
) -> None:
    ada_context, page = person(browser, newcomer_server)
    dev_sign_in(page, "ada@example.org")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
    page.get_by_role("textbox", name="Name", exact=True).fill("results")
    page.get_by_role("button", name="Create bucket").click()
    expect(page.get_by_role("link", name="results")).to_be_visible()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Applications").click()
    launch = page.get_by_role("button", name="Launch JupyterLab")
    expect(launch).to_be_enabled()  # ./run serve installed it: the catalog offers it at once
    launch.click()
    dialog = page.get_by_role("dialog", name="Launch JupyterLab")
    expect(dialog.get_by_role("checkbox", name="results")).to_be_checked()  # her only bucket: mounted by default
    expect(dialog.get_by_label("Mount path for results")).to_have_value("/home/user/data")
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog.get_by_test_id("launch-status")).to_have_text("running", timeout=120_000)
    screenshot(page, "notebook-launched")
    with page.expect_popup() as popup:
        dialog.get_by_role("link", name="Open JupyterLab").click()
    lab = popup.value
    # through the control plane's own address, not a port of its own
    expect(lab).to_have_url(re.compile(rf"^{re.escape(newcomer_server.url)}/environments/[0-9a-f]{{32}}/lab"))
    environment_url = re.sub(r"lab.*$", "", lab.url)

    lab.locator(".jp-LauncherCard[data-category='Notebook']").first.click(timeout=90_000)
    # the kernel runs behind the proxied WebSocket once the status bar says Idle
    expect(lab.get_by_role("button", name=re.compile(r"Python 3 \(ipykernel\) \| Idle"))).to_be_visible(timeout=90_000)
    editor = lab.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.click()
    lab.keyboard.insert_text(CELL)
    expect(editor).to_contain_text("written by a notebook")
    lab.keyboard.press("Shift+Enter")
    # write() returns the number of characters: the kernel ran the cell (over the proxied WebSocket)
    expect(lab.locator(".jp-OutputArea-output").first).to_have_text("21", timeout=90_000)
    screenshot(lab, "notebook-cell")

    page.bring_to_front()
    dialog.get_by_role("button", name="Close").click()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
    page.get_by_role("link", name="results").click()
    expect(page.get_by_role("rowheader", name="out.txt")).to_be_visible()
    screenshot(page, "notebook-output-in-storage")

    # Someone else: the environment's address and its WebSocket are 404, as for an unknown one
    bob_context, bob = person(browser, newcomer_server)
    dev_sign_in(bob, "bob@example.org")
    assert bob.request.get(environment_url).status == 404
    assert bob.request.get(f"{environment_url}api/kernels").status == 404
    cookie = next(c["value"] for c in bob_context.cookies() if c["name"] == "cmbcluster_session")
    socket_url = environment_url.replace("http://", "ws://") + "api/events/subscribe"
    with pytest.raises(InvalidStatus) as refused:
        connect(socket_url, additional_headers={"Cookie": f"cmbcluster_session={cookie}"},
                origin=Origin(newcomer_server.url))  # fmt: skip
    assert refused.value.response.status_code == 404
    # while its owner's browser opens the same WebSocket
    ada_cookie = next(c["value"] for c in ada_context.cookies() if c["name"] == "cmbcluster_session")
    with connect(socket_url, additional_headers={"Cookie": f"cmbcluster_session={ada_cookie}"},
                 origin=Origin(newcomer_server.url)):  # fmt: skip
        pass
    bob_context.close()
    ada_context.close()
