"""A research group's day in the web UI, in a real browser against a real server and identity provider.

The tests run in file order and share the server: Alice (the first user, so an administrator)
signs in, launches, stores, restarts and deletes; then she promotes Bob and locks Carol out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from cmbcluster.testing.process import ServeProcess

from .conftest import (
    PROVIDER_DISPLAY_NAME,
    REPORTS,
    SIZES,
    UNAUTHORIZED,
    ConsoleErrors,
    OpenSession,
    People,
    Session,
    api,
    assert_clean,
    expecting,
    screenshot,
    sign_in,
)
from .measure import JS_BUDGET_BYTES, measure_first_load


def test_sign_in_lists_the_servers_providers_and_signs_in_through_oidc(
    people: People, open_session: OpenSession
) -> None:
    # A browser of her own: her first sign-in when this file runs first (else `people` signed her in first).
    session = open_session()
    page = session.page
    with expecting(session, UNAUTHORIZED):
        page.goto("/environments/")
        expect(page).to_have_url(re.compile(r"/signin/\?next=%2Fenvironments%2F$"))
        # Exactly the providers the server lists, by their configured names: here OIDC and the development one.
        providers = page.get_by_role("link", name=re.compile("^Sign in with"))
        expect(providers).to_have_text([f"Sign in with {PROVIDER_DISPLAY_NAME}", "Sign in with Development sign-in"])
        screenshot(page, "sign-in")
    sign_in(session, "alice")
    expect(page.get_by_role("link", name="Admin")).to_be_visible()  # the first user administers
    expect(page.get_by_text("No environment yet")).to_be_visible()
    newest = page.get_by_role("list", name="Recent activity").get_by_role("listitem").first
    expect(newest).to_contain_text(f"Signed in with {PROVIDER_DISPLAY_NAME}")
    assert_clean(session)


def test_upload_a_file_and_download_it_back_byte_identical(alice: Session, tmp_path: os.PathLike[str]) -> None:
    page = alice.page
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
    expect(page.get_by_text("No bucket yet")).to_be_visible()
    page.get_by_role("textbox", name="Name", exact=True).fill("Planck maps")
    with expecting(alice, "status of 400"):  # the embedded default stores one class only, and says so
        page.get_by_label("Storage class").select_option("infrequent")
        page.get_by_role("button", name="Create bucket").click()
        expect(page.get_by_role("alert").filter(has_text="offers only the standard storage class")).to_be_visible()
    page.get_by_label("Storage class").select_option("standard")
    page.get_by_role("button", name="Create bucket").click()
    expect(page.get_by_role("link", name="Planck maps")).to_be_visible()
    screenshot(page, "storage")
    page.get_by_role("link", name="Planck maps").click()
    expect(page.get_by_text("This folder is empty")).to_be_visible()
    page.get_by_label("Open or make a folder").fill("maps")
    page.get_by_role("button", name="Go").click()
    breadcrumb = page.get_by_role("navigation", name="Breadcrumb")
    expect(breadcrumb.get_by_role("link", name="maps", exact=True)).to_be_visible()
    content = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, not a round size
    source = os.path.join(tmp_path, "sky map.fits")
    with open(source, "wb") as handle:
        handle.write(content)
    page.locator("#upload").set_input_files(source)
    expect(page.get_by_text("sky map.fits uploaded")).to_be_visible(timeout=30_000)
    expect(page.get_by_role("rowheader", name="sky map.fits")).to_be_visible()
    screenshot(page, "files")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download sky map.fits").click()
    download = download_info.value
    assert download.suggested_filename == "sky map.fits"
    with open(download.path(), "rb") as handle:
        assert handle.read() == content
    # The bucket's root now shows the folder the file went into.
    page.get_by_role("navigation", name="Breadcrumb").get_by_role("link", name="Planck maps").click()
    expect(page.get_by_role("link", name="maps/")).to_be_visible()
    assert_clean(alice)


def test_a_bucket_being_moved_is_marked_for_its_owner_and_its_progress_shown_to_admins(
    alice: Session, server: ServeProcess, tmp_path: Path
) -> None:
    from cmbcluster.db import create_db_engine, session_factory
    from cmbcluster.db.models import MigrationBucket, Storage
    from cmbcluster.local.storage import LocalStorage
    from cmbcluster.migration.engine import Migration, Side

    page = alice.page
    listed = api(page, "GET", "/api/v1/storages")["storages"]
    assert isinstance(listed, list) and listed[0]["moving_to"] is None
    # What `cmbcluster migrate run --to elsewhere` records (in the server's database) as it starts on the bucket.
    engine = create_db_engine(f"sqlite:///{server.log.parent / 'data' / 'cmbcluster.db'}")
    sessions = session_factory(engine)
    unused = LocalStorage(tmp_path / "unused")
    run = Migration(sessions, Side(name="local", storage=unused), Side(name="elsewhere", storage=unused))
    with sessions() as db:
        storage = db.get(Storage, listed[0]["id"])
        assert storage is not None
        manifest = run._manifest_row(db, storage)
        manifest.objects_total, manifest.bytes_total = 1, 3 * 1024 * 1024 + 17
        db.commit()
        manifest_id = manifest.id
    try:
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
        expect(page.get_by_text("being moved to elsewhere")).to_be_visible()
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Admin").click()
        expect(page.get_by_role("heading", name="Moving to another cloud")).to_be_visible()
        moving = page.get_by_role("table", name="Buckets being moved")
        expect(moving.get_by_role("rowheader", name="alice@example.org")).to_be_visible()
        expect(moving).to_contain_text("0 B of 3 MiB")
        screenshot(page, "admin-migration")
    finally:
        with sessions() as db:
            db.delete(db.get(MigrationBucket, manifest_id))
            db.commit()
        engine.dispose()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
    expect(page.get_by_role("link", name="Planck maps")).to_be_visible()
    expect(page.get_by_text("being moved to")).to_have_count(0)
    assert_clean(alice)


def test_a_long_bucket_name_keeps_a_readable_width_on_a_desktop(alice: Session) -> None:
    """Found by a newcomer: on a 1366-pixel screen the Storage list cut bucket names to "Planck-…"
    while the other columns had room to spare. A name's column now keeps a readable width."""
    page = alice.page
    name = "Planck-LFI-30GHz-full-mission-frequency-maps-and-half-ring-splits-for-component-separation"
    created = api(page, "POST", "/api/v1/storages", data={"display_name": name})
    try:
        page.set_viewport_size({"width": 1366, "height": 900})
        page.goto("/storage/")
        shown = page.get_by_role("link", name=name).locator(".name")
        expect(shown).to_be_visible()
        assert shown.evaluate("e => e.getBoundingClientRect().width") >= 250, "the name is cut to a few letters"
        table = page.get_by_role("table", name="Your buckets")
        assert table.evaluate("t => t.scrollWidth <= t.clientWidth"), "the table is wider than its place"
    finally:
        api(page, "DELETE", f"/api/v1/storages/{created['id']}")
        page.set_viewport_size(SIZES["desktop"])
    assert_clean(alice)


def test_launch_an_environment_watch_it_run_and_open_it(alice: Session) -> None:
    page = alice.page
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Applications").click()
    expect(page.get_by_role("heading", name="Files")).to_be_visible()
    screenshot(page, "applications")
    page.get_by_role("button", name="Launch Files").click()
    dialog = page.get_by_role("dialog", name="Launch Files")
    dialog.get_by_label("Name (optional)").fill("analysis")
    dialog.get_by_label("Environment variables (one NAME=value per line)").fill("BAND=150GHz")
    # Her only bucket: mounted unless she says not.
    expect(dialog.get_by_role("checkbox", name="Planck maps")).to_be_checked()
    expect(dialog.get_by_label("Mount path for Planck maps")).to_have_value("/home/user/data")
    dialog.get_by_role("button", name="Launch").click()
    status = dialog.get_by_test_id("launch-status")
    expect(status).to_have_text("running", timeout=30_000)
    expect(dialog.locator("progress")).to_have_attribute("value", "100")
    screenshot(page, "launch-progress")
    with page.expect_popup() as popup_info:
        dialog.get_by_role("link", name="Open analysis").click()
    app_page = popup_info.value
    # The Files application is Python's web server in the environment's home, through the control
    # plane's own address; the bucket is where it was mounted: /home/user/data is ~/data.
    expect(app_page).to_have_url(re.compile(r"/environments/[0-9a-f]{32}/$"))
    expect(app_page.get_by_role("heading", name=re.compile("Directory listing"))).to_be_visible()
    app_page.get_by_role("link", name="data@").click()  # Python's file server marks a link with @
    expect(app_page.get_by_role("link", name="maps/")).to_be_visible()
    app_page.close()
    dialog.get_by_role("button", name="Close").click()
    environment = api(page, "GET", "/api/v1/environments")["items"][0]
    assert environment["env"] == {"BAND": "150GHz"} and environment["status"] == "running"
    assert [m["display_name"] for m in environment["mounts"]] == ["Planck maps"]
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Dashboard").click()
    expect(page.get_by_role("list", name="Recent activity").get_by_text("analysis started")).to_be_visible()
    expect(page.get_by_text("1 running, of your 1 environment.")).to_be_visible()
    screenshot(page, "dashboard")
    assert_clean(alice)


def test_restart_and_delete_the_environment(alice: Session) -> None:
    page = alice.page
    before = api(page, "GET", "/api/v1/environments")["items"][0]
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Environments").click()
    row = page.locator("tr[data-environment=analysis]")
    expect(row.locator(".badge")).to_have_text("running")
    expect(row.get_by_role("link", name="Open analysis")).to_be_visible()
    screenshot(page, "environments")
    row.get_by_role("button", name="Logs of analysis").click()
    logs = page.get_by_role("dialog", name="Logs of analysis")
    expect(logs.get_by_label("Output of analysis")).to_contain_text("GET / HTTP/1.1")  # the visit when opened
    page.keyboard.press("Escape")
    expect(logs).to_be_hidden()
    restart = row.get_by_role("button", name="Restart analysis")
    restart.click()
    page.get_by_role("dialog", name="Restart environment").get_by_role("button", name="Restart").click()
    expect(restart).to_be_enabled(timeout=30_000)
    expect(row.locator(".badge")).to_have_text("running", timeout=30_000)
    after = api(page, "GET", "/api/v1/environments")["items"][0]
    assert after["started_at"] != before["started_at"], "restart must start the environment again"
    assert after["env"] == before["env"], "restart keeps the environment's choices"
    row.get_by_role("button", name="Delete analysis").click()
    dialog = page.get_by_role("dialog", name="Delete environment")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("You have no environment")).to_be_visible()
    assert api(page, "GET", "/api/v1/environments")["items"] == []
    assert_clean(alice)


def test_settings_show_a_new_api_token_once(alice: Session, server: ServeProcess) -> None:
    page = alice.page
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Settings").click()
    page.get_by_label("Token name").fill("laptop")
    page.get_by_role("button", name="Create token").click()
    token = page.get_by_label("New token").input_value()
    assert token.startswith("cmbt_")
    answer = httpx.get(f"{server.url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert answer.json()["email"] == "alice@example.org"
    screenshot(page, "settings")
    page.get_by_role("button", name="Done").click()
    page.get_by_role("button", name="Revoke token laptop").click()
    expect(page.get_by_text("No token yet")).to_be_visible()
    assert httpx.get(f"{server.url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # A refused request shows the API's own message.
    with expecting(alice, "status of 400"):
        page.get_by_role("textbox", name="Name", exact=True).fill("HOME")
        page.get_by_role("button", name="Save variable").click()
        expect(
            page.get_by_role("alert").filter(has_text="HOME is a reserved environment variable name")
        ).to_be_visible()
    assert_clean(alice)


def test_an_admin_promotes_one_user_and_locks_another_out(
    alice: Session, open_session: OpenSession, tmp_path: Path, server: ServeProcess
) -> None:
    bob, carol = open_session(), open_session()  # their own: Carol is locked out below
    sign_in(bob, "bob")
    sign_in(carol, "carol")
    expect(bob.page.get_by_role("link", name="Admin")).to_have_count(0)

    page = alice.page
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Admin").click()
    expect(page.get_by_role("heading", name="Users", exact=True)).to_be_visible()
    screenshot(page, "admin-monitoring")
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Users").click()
    page.get_by_label("Search by e-mail or name").fill("example.org")
    page.get_by_role("button", name="Search").click()
    page.get_by_label("Role of bob@example.org").select_option("admin")
    expect(page.locator("tr[data-user='bob@example.org']").get_by_label("Role of bob@example.org")).to_have_value(
        "admin"
    )
    # Bob's environments may run ten minutes: within the warning period from their start.
    page.get_by_label("Maximum uptime of bob@example.org in minutes").fill("10")
    page.get_by_role("button", name="Set the maximum uptime of bob@example.org").click()
    expect(page.get_by_label("Maximum uptime of bob@example.org in minutes")).to_have_value("10")
    # Bob's buckets may hold 2 GiB, earlier versions included; he sees it beside his usage.
    page.get_by_label("Storage quota of bob@example.org in GiB").fill("2")
    with page.expect_response(lambda r: r.request.method == "PATCH" and "/api/v1/admin/users/" in r.url) as patched:
        page.get_by_role("button", name="Set the storage quota of bob@example.org").click()
    assert patched.value.status == 200
    expect(page.get_by_label("Storage quota of bob@example.org in GiB")).to_have_value("2")
    # Bob's group may hold 3 GiB in all (set through the admin API); he sees it beside his own.
    origin = {"Origin": server.url}
    lab = "/api/v1/admin/groups/cmb-lab"
    assert page.request.put(lab, data={"members": ["bob@example.org"]}, headers=origin).ok
    assert page.request.patch(lab, data={"storage_quota_bytes": 3 * 1024**3}, headers=origin).ok
    bob.page.get_by_role("navigation", name="Main").get_by_role("link", name="Storage").click()
    expect(bob.page.locator("#storage-quota")).to_contain_text("of your 2 GiB quota")
    expect(bob.page.locator(".group-quota")).to_contain_text("of the group's 3 GiB quota")
    expect(bob.page.locator(".group-quota")).to_contain_text("Group cmb-lab")
    page.get_by_role("button", name="Deactivate carol@example.org").click()
    expect(page.get_by_role("button", name="Activate carol@example.org")).to_be_visible()
    screenshot(page, "admin-users")
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Audit trail").click()
    for action, whom in (("user.deactivated", "carol@example.org"), ("user.role_changed", "bob@example.org")):
        newest = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=action, exact=True)).first
        expect(newest).to_contain_text(whom)
    screenshot(page, "admin-audit")

    # The catalog: an admin adds an application with an uploaded icon; everyone sees it.
    icon = tmp_path / "sky.svg"
    icon.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><circle cx="4" cy="4" r="4"/></svg>')
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Applications").click()
    page.get_by_role("button", name="Add an application").click()
    form = page.get_by_role("dialog", name="Add an application")
    form.get_by_role("textbox", name="Name", exact=True).fill("Sky viewer")
    form.get_by_label("Slug (lower-case, dashes)").fill("sky-viewer")
    form.get_by_label("Container image").fill("python:3.11-slim")
    form.get_by_label("Command (one argument per line").fill("python\n-m\nhttp.server\n{port}")
    form.get_by_label("Icon (image, at most 64 KB)").set_input_files(str(icon))
    expect(form.get_by_role("img", name="Icon preview")).to_be_visible()
    form.get_by_role("button", name="Add application").click()
    expect(form).to_be_hidden()
    expect(page.get_by_role("rowheader", name=re.compile("Sky viewer"))).to_be_visible()
    bob.page.get_by_role("navigation", name="Main").get_by_role("link", name="Applications").click()
    card = bob.page.get_by_role("listitem").filter(has=bob.page.get_by_role("heading", name="Sky viewer"))
    expect(card.locator("img")).to_have_attribute("src", re.compile(r"^data:image/svg\+xml;base64,"))

    bob.page.reload()
    bob.page.get_by_role("link", name="Admin").click()
    expect(bob.page.get_by_role("heading", name="Administration")).to_be_visible()
    bob.page.get_by_role("navigation", name="Main").get_by_role("link", name="Applications").click()
    bob.page.get_by_role("button", name="Launch Files").click()
    dialog = bob.page.get_by_role("dialog", name="Launch Files")
    dialog.get_by_label("Name (optional)").fill("quick look")
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog.get_by_test_id("launch-status")).to_have_text("running", timeout=30_000)
    dialog.get_by_role("link", name="Go to my environments").click()
    warning = bob.page.get_by_role("alert").filter(has_text=re.compile(r"quick look stops automatically in \d+ min"))
    expect(warning).to_be_visible(timeout=20_000)
    expect(bob.page.locator("tr[data-environment='quick look'] .warn-text")).to_contain_text(
        re.compile(r"uptime ends in \d+ min")
    )
    screenshot(bob.page, "shutdown-warning")

    # Carol's session ended at once; signing in again is refused with the reason.
    with expecting(carol, "status of 403"):
        carol.page.reload()
        expect(carol.page.get_by_role("alert").filter(has_text="this account is deactivated")).to_be_visible()
        expect(carol.page.get_by_role("heading", name=re.compile("Welcome"))).to_have_count(0)
        screenshot(carol.page, "deactivated")
        carol.page.get_by_role("link", name="Sign in again").click()
        carol.page.get_by_role("link", name=f"Sign in with {PROVIDER_DISPLAY_NAME}").click()
        carol.page.locator("input[name=sub]").fill("carol")
        carol.page.get_by_role("button", name="Authorize").click()
        expect(carol.page.get_by_text("this account is deactivated")).to_be_visible()
    assert carol.page.request.get("/api/v1/auth/me").status == 403
    for session in (alice, bob, carol):
        assert_clean(session)


def test_the_ui_works_on_a_phone_and_with_the_keyboard_alone(alice: Session, server: ServeProcess) -> None:
    browser = alice.context.browser
    assert browser is not None
    phone = browser.new_context(
        base_url=server.url, storage_state=alice.context.storage_state(), viewport={"width": 390, "height": 844},
        is_mobile=True,
    )  # fmt: skip
    console = ConsoleErrors(origin=server.url)
    phone.on("page", console.watch)
    page = phone.new_page()
    try:
        page.goto("/")
        expect(page.get_by_role("heading", name="Welcome, Alice Admin")).to_be_visible()
        main_nav = page.get_by_role("navigation", name="Main")
        expect(main_nav).to_be_hidden()
        menu = page.get_by_role("button", name="Menu")
        menu.click()
        expect(menu).to_have_attribute("aria-expanded", "true")
        expect(main_nav).to_be_visible()
        screenshot(page, "phone-menu")
        main_nav.get_by_role("link", name="Applications").click()
        expect(main_nav).to_be_hidden()  # the menu folds after choosing
        expect(page.get_by_role("heading", name="Applications")).to_be_visible()
        # Keyboard: on a fresh page the first Tab reaches the skip link, which moves focus to the content;
        # the launch dialog opens, takes focus and closes without a mouse.
        page.reload()
        expect(page.get_by_role("button", name="Launch Files")).to_be_visible()
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("main#main")).to_be_focused()
        page.get_by_role("button", name="Launch Files").focus()
        page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Launch Files")
        expect(dialog).to_be_visible()
        expect(dialog.get_by_label("Name (optional)")).to_be_focused()
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
    finally:
        phone.close()
    assert console.errors == [], "\n".join(console.errors)


def test_first_load_of_the_dashboard_is_small_and_fast(
    alice: Session, server: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    state = alice.context.storage_state()
    browser = alice.context.browser
    assert browser is not None
    figures = measure_first_load(browser, server.url, state)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "ui-first-load.json").write_text(json.dumps(figures, indent=2))
    compressed, plain = figures["js_bytes_compressed"] / 1000, figures["js_bytes_uncompressed"] / 1000
    with capsys.disabled():  # the figures belong in every run's output, not only a failing one's
        print(
            f"\nfirst load of the dashboard: {compressed:.1f} kB of JavaScript transferred (compressed; "
            f"{plain:.1f} kB uncompressed, {figures['js_files']} files), interactive after "
            f"{figures['time_to_interactive_s'] * 1000:.0f} ms (median of {figures['runs']})"
        )
    # The bytes are the page's own and the same on any machine: a budget a test can hold. The time
    # to interactive depends on the machine's load (1.3 s in a CI run beside the other test lane):
    # printed here, its budget held by tests/benchmarks/bench_ui.py, which exits 1 on a miss.
    assert figures["js_bytes_compressed"] <= JS_BUDGET_BYTES
