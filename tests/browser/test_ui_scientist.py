"""The web UI as scientists use it (issue 15), in Chromium against a real server.

Dana is a scientist with a very long display name (200 characters); Alice (the first user of the
server, so an administrator) administers. The tests run in file order. Every page is photographed at
1280 by 800 and 390 by 844 into .reports/screenshots/pages/ (test artifacts, not committed) and
checked for horizontal scrolling.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error, Locator, Page, expect

from cmbcluster.testing.process import ServeProcess

from .conftest import (
    LINES_OF_TEXT,
    PROVIDER_DISPLAY_NAME,
    SCREENSHOTS,
    SIZES,
    UNAUTHORIZED,
    OpenSession,
    People,
    Session,
    api,
    assert_clean,
    expecting,
    sign_in,
)

LONG_FILE = ("planck_2026_" + "x" * 300)[:245] + ".fits"  # 250 characters
LONG_BUCKET = ("CMB maps " + "y" * 100)[:100]
state: dict[str, Any] = {}


@pytest.fixture
def dana(people: People) -> Session:
    return people("dana")


def go(page: Page, label: str) -> None:
    """Follow a main navigation link (the phone's menu first, where it is folded)."""
    menu = page.get_by_role("button", name="Menu")
    if menu.is_visible():
        menu.click()
    page.get_by_role("navigation", name="Main").get_by_role("link", name=label).click()


def no_horizontal_scroll(page: Page, what: str) -> None:
    """Neither the page nor a table in it scrolls sideways (a table's actions would be off screen)."""
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"{what}: the page is {width[0]} px wide in a {width[1]} px window"
    tables = page.locator(".table-wrap").evaluate_all("all => all.map(e => [e.scrollWidth, e.clientWidth])")
    assert all(inner <= outer for inner, outer in tables), f"{what}: a table scrolls sideways {tables}"


def fits_map(rows: int = 3072) -> bytes:
    """A FITS file as a HEALPix map is written: an empty primary HDU, then a binary table."""

    def cards(*items: tuple[str, str, str]) -> bytes:
        text = b"".join(f"{k:<8}= {v:>20} / {c}".ljust(80).encode() for k, v, c in items) + b"END".ljust(80)
        return text + b" " * (-len(text) % 2880)

    primary = cards(("SIMPLE", "T", "standard FITS"), ("BITPIX", "8", ""), ("NAXIS", "0", ""))
    table = cards(
        ("XTENSION", "'BINTABLE'", "binary table"), ("BITPIX", "8", ""), ("NAXIS", "2", ""), ("NAXIS1", "4", ""),
        ("NAXIS2", str(rows), ""), ("PCOUNT", "0", ""), ("GCOUNT", "1", ""), ("TFIELDS", "1", ""),
        ("TTYPE1", "'TEMPERATURE'", ""), ("TFORM1", "'E'", ""), ("EXTNAME", "'FREQ-MAP'", ""),
        ("NSIDE", "16", "HEALPix resolution"), ("FREQ", "'143 GHz'", "channel"),
    )  # fmt: skip
    data = struct.pack(f">{rows}f", *([2.7255] * rows))
    return primary + table + data + b"\0" * (-len(data) % 2880)


def png(width: int, height: int) -> bytes:
    """A grey PNG image (8-bit greyscale), written by hand: the format's signature and three chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + b"\x80" * width for _ in range(height))  # filter 0, then the row's pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# -- 7. words, units, sign-in and sign-out -----------------------------------------------------------


def test_signed_in_with_words_gib_one_bucket_and_a_favicon(dana: Session, server: ServeProcess) -> None:
    page = dana.page
    page.goto("/")
    expect(
        page.get_by_role("list", name="Recent activity").get_by_text(f"Signed in with {PROVIDER_DISPLAY_NAME}").first
    ).to_be_visible()
    assert page.request.get("/favicon.ico").status == 200
    assert page.request.get("/favicon.svg").status == 200
    go(page, "Storage")
    # The browser cuts a longer name at the field's limit without a word: the label says it first.
    name = page.get_by_role("textbox", name="Name", exact=True)
    expect(page.locator("label[for=bucket-name]")).to_have_text("Name (up to 100 characters)")
    expect(name).to_have_accessible_description("(up to 100 characters)")
    name.fill("   ")
    page.get_by_role("button", name="Create bucket").click()
    expect(page.get_by_role("alert").filter(has_text="Give the bucket a name.")).to_be_visible()
    page.get_by_role("textbox", name="Name", exact=True).fill(LONG_BUCKET)
    page.get_by_role("button", name="Create bucket").click()
    expect(page.get_by_role("link", name=LONG_BUCKET)).to_be_visible()
    # Duplicate names are refused, by the server, in words, naming the bucket Dana has (not the name typed).
    with expecting(dana, "status of 409"):
        page.get_by_role("textbox", name="Name", exact=True).fill(LONG_BUCKET.upper())
        page.get_by_role("button", name="Create bucket").click()
        expect(page.get_by_role("alert").filter(has_text="you already have a bucket named")).to_contain_text(
            f"you already have a bucket named '{LONG_BUCKET}' (names are compared ignoring case)"
        )
    assert len(api(page, "GET", "/api/v1/storages")["storages"]) == 1
    go(page, "Dashboard")
    expect(page.get_by_text("in 1 bucket.")).to_be_visible()
    go(page, "Applications")
    expect(page.get_by_test_id("limits").first).to_have_text(re.compile(r"^0 running of \d+ allowed"))
    page.get_by_role("button", name="Launch Files").click()
    dialog = page.get_by_role("dialog", name="Launch Files")
    for preset in ("light — 0.5 CPU, 1 GiB memory", "standard — 1 CPU, 2 GiB memory", "heavy — 2 CPU, 8 GiB memory"):
        expect(dialog.get_by_text(preset)).to_be_visible()
    page.keyboard.press("Escape")
    assert_clean(dana)


def test_settings_say_where_secrets_appear_and_the_picker_clears(dana: Session, tmp_path: Path) -> None:
    page = dana.page
    go(page, "Settings")
    expect(page.get_by_text("$CMBCLUSTER_SECRETS_DIR").first).to_be_visible()
    expect(page.get_by_text(re.compile("as ordinary environment variables"))).to_be_visible()
    secret = tmp_path / "token.txt"
    secret.write_text("s3cr3t")
    page.get_by_label("File", exact=True).set_input_files(str(secret))
    page.get_by_role("button", name="Upload secret file").click()
    expect(page.get_by_text("token.txt", exact=True)).to_be_visible()
    expect(page.get_by_label("File", exact=True)).to_have_value("")
    expect(page.get_by_role("button", name="Upload secret file")).to_be_disabled()
    assert_clean(dana)


# -- 3. files like a file manager ----------------------------------------------------------------------


def open_bucket(page: Page) -> None:
    go(page, "Storage")
    page.get_by_role("link", name=LONG_BUCKET).click()
    expect(page.get_by_text("This folder is empty").or_(page.get_by_role("table"))).to_be_visible()


def test_a_dropped_folder_uploads_every_file_with_its_path(dana: Session, tmp_path: Path) -> None:
    page = dana.page
    open_bucket(page)
    folder = tmp_path / "run1"
    (folder / "maps" / "deep").mkdir(parents=True)
    (folder / "notes.txt").write_text("observing log\n" * 10)
    (folder / "maps" / "sky.fits").write_bytes(fits_map())
    (folder / "maps" / "deep" / "mask.csv").write_text("ell,cl\n2,1.5\n3,0.9\n")
    (folder / "maps" / LONG_FILE).write_bytes(b"a file with a very long name")
    (tmp_path / "loose.json").write_text('{"nside": 16, "band": "143"}')
    # A real drag from the desktop: Chromium is handed the paths, as from a file manager.
    zone = page.get_by_test_id("file-manager")
    box = zone.bounding_box()
    assert box is not None
    cdp = page.context.new_cdp_session(page)
    x, y = box["x"] + box["width"] / 2, box["y"] + 40
    data = {"items": [], "files": [str(folder), str(tmp_path / "loose.json")], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    expect(page.get_by_test_id("dropzone")).to_have_text("Drop to upload here")
    cdp.send("Input.dispatchDragEvent", {"type": "drop", "x": x, "y": y, "data": data})
    queue = page.get_by_role("list", name="Upload queue")
    expect(queue.locator("li")).to_have_count(5)  # listed at once, each with its progress
    expect(page.get_by_role("status").filter(has_text="5 of 5 files uploaded")).to_be_visible(timeout=30_000)
    storage = api(page, "GET", "/api/v1/storages")["storages"][0]
    state["storage"] = storage
    listed = api(page, "GET", f"/api/v1/storages/{storage['id']}/objects?delimiter=false")
    assert sorted(o["key"] for o in listed["objects"]) == sorted([
        "loose.json", "run1/notes.txt", "run1/maps/sky.fits", "run1/maps/deep/mask.csv", f"run1/maps/{LONG_FILE}",
    ])  # fmt: skip
    expect(page.get_by_role("link", name="run1/")).to_be_visible()
    assert_clean(dana)


def test_uploads_show_speed_and_can_be_cancelled(dana: Session, tmp_path: Path) -> None:
    page = dana.page
    page.route("**/api/v1/storages/*/objects/slow.bin", lambda route: None)  # never answered: stays uploading
    big = tmp_path / "slow.bin"
    big.write_bytes(b"\0" * (4 * 1024 * 1024))
    page.locator("#upload").set_input_files(str(big))
    item = page.locator("li[data-upload='slow.bin']")
    expect(item).to_have_attribute("data-state", "uploading")
    page.get_by_role("button", name="Cancel the upload of slow.bin").click()
    expect(item).to_have_attribute("data-state", "cancelled")
    page.unroute("**/api/v1/storages/*/objects/slow.bin")
    page.get_by_role("button", name="Clear the list").click()
    assert_clean(dana)


def test_previews_of_fits_headers_json_csv_text_and_images(dana: Session, server: ServeProcess) -> None:
    page = dana.page
    page.get_by_role("link", name="run1/").click()
    page.get_by_role("link", name="maps/").click()
    page.get_by_role("button", name="Preview sky.fits").click()
    dialog = page.get_by_role("dialog", name="Preview")
    fits = dialog.get_by_test_id("fits-preview")
    expect(fits).to_contain_text("HDU 1: FREQ-MAP")
    expect(fits.get_by_role("row", name="NSIDE 16 HEALPix resolution")).to_be_visible()
    expect(fits.get_by_role("row", name="FREQ 143 GHz channel")).to_be_visible()
    page.keyboard.press("Escape")
    page.get_by_role("link", name="deep/").click()
    page.get_by_role("button", name="Preview mask.csv").click()
    expect(page.get_by_test_id("csv-preview").get_by_role("columnheader", name="ell")).to_be_visible()
    page.keyboard.press("Escape")
    beam = f"/api/v1/storages/{state['storage']['id']}/objects/beam.png"
    assert page.request.put(beam, data=png(3, 2), headers={"Origin": server.url}).ok
    nav = page.get_by_role("navigation", name="Breadcrumb")
    nav.get_by_role("link", name=LONG_BUCKET).click()
    page.get_by_role("button", name="Preview loose.json").click()
    expect(page.get_by_test_id("text-preview")).to_contain_text('"nside": 16')
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Preview beam.png").click()
    image = page.get_by_role("dialog", name="Preview").get_by_role("img", name="Preview of beam.png")
    expect(image).to_be_visible()
    page.wait_for_function("e => e.complete", arg=image.element_handle())
    assert image.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [3, 2]  # the picture itself, decoded
    page.keyboard.press("Escape")
    api(page, "DELETE", beam)
    assert_clean(dana)


def test_several_files_download_as_a_zip_and_files_move_and_folders_go(dana: Session) -> None:
    page = dana.page
    page.get_by_label("Select loose.json").check()
    page.get_by_label("Select run1/").check()
    with page.expect_download() as info:
        page.get_by_role("button", name="Download selected (zip)").click()
    download = info.value
    assert download.suggested_filename == f"{LONG_BUCKET}.zip"
    with zipfile.ZipFile(io.BytesIO(Path(download.path()).read_bytes())) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted([
            "loose.json", "run1/notes.txt", "run1/maps/sky.fits", "run1/maps/deep/mask.csv", f"run1/maps/{LONG_FILE}",
        ])  # fmt: skip
        assert archive.read("run1/maps/sky.fits") == fits_map()
    # Rename a file into a new folder; a folder deleted with its files; two files deleted at once.
    page.get_by_role("button", name="Rename or move loose.json").click()
    page.get_by_label("New name").fill("meta/settings.json")
    page.get_by_role("button", name="Rename or move", exact=True).click()
    expect(page.get_by_role("link", name="meta/")).to_be_visible()
    page.get_by_role("link", name="run1/").click()
    page.get_by_role("link", name="maps/").click()
    page.get_by_label("Select sky.fits").check()
    page.get_by_label(f"Select {LONG_FILE}").check()
    page.get_by_role("button", name="Delete selected").click()
    dialog = page.get_by_role("dialog", name="Delete")
    expect(dialog).to_contain_text("Delete 2 selected items?")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("button", name="Preview sky.fits")).to_have_count(0)
    expect(page.get_by_role("link", name="deep/")).to_be_visible()  # what was not selected stays
    names = [
        o["key"]
        for o in api(page, "GET", f"/api/v1/storages/{state['storage']['id']}/objects?delimiter=false")["objects"]
    ]
    assert "run1/maps/sky.fits" not in names and f"run1/maps/{LONG_FILE}" not in names, names
    page.get_by_role("navigation", name="Breadcrumb").get_by_role("link", name=LONG_BUCKET).click()
    page.get_by_role("button", name="Delete run1/").click()
    dialog = page.get_by_role("dialog", name="Delete")
    expect(dialog).to_contain_text("and every file in it")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("link", name="run1/")).to_have_count(0)
    keys = [
        o["key"]
        for o in api(page, "GET", f"/api/v1/storages/{state['storage']['id']}/objects?delimiter=false")["objects"]
    ]
    assert keys == ["meta/settings.json"]
    assert_clean(dana)


# -- 5. and 4. launching, controlling one's environments -----------------------------------------------


def test_the_launch_dialog_mounts_the_only_bucket_and_says_where(dana: Session) -> None:
    page = dana.page
    go(page, "Applications")
    page.get_by_role("button", name="Launch Files").click()
    dialog = page.get_by_role("dialog", name="Launch Files")
    expect(dialog.get_by_role("checkbox", name=LONG_BUCKET)).to_be_checked()
    expect(dialog.get_by_test_id("mount-where")).to_have_text(
        "Its files appear in the environment at /home/user/data: the folder data of its home."
    )
    dialog.get_by_label("Name (optional)").fill(("Dana's analysis of " + "z" * 100)[:100])
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog.get_by_test_id("launch-status")).to_have_text("running", timeout=30_000)
    state["env"] = api(page, "GET", "/api/v1/environments")["items"][0]
    assert [m["display_name"] for m in state["env"]["mounts"]] == [LONG_BUCKET]
    dialog.get_by_role("button", name="Close").click()
    assert_clean(dana)


def test_a_failed_start_is_red_said_once_with_a_link_to_the_logs_at_their_end(alice: Session, dana: Session) -> None:
    admin = alice.page
    script = (
        "import sys\nfor n in range(300): print(f'loading map {n}')\n"
        "print('FATAL: the sky map is missing')\nsys.exit(3)"
    )
    api(admin, "POST", "/api/v1/applications", data={
        "slug": "broken-map", "name": "Broken map", "image": "python:3.11", "port": 8080,
        "command": ["python", "-c", script], "default_preset": "light",
    })  # fmt: skip
    page = dana.page
    page.goto("/applications/")  # the catalog as it is now
    page.get_by_role("button", name="Launch Broken map").click()
    dialog = page.get_by_role("dialog", name="Launch Broken map")
    dialog.get_by_label("Name (optional)").fill("broken")
    dialog.get_by_role("button", name="Launch").click()
    failure = dialog.get_by_role("alert")
    expect(failure).to_contain_text("FATAL: the sky map is missing", timeout=30_000)
    expect(dialog.locator("progress")).to_have_count(0)  # no blue bar filled to 100 %
    assert dialog.inner_text().count("FATAL: the sky map is missing") == 1  # said once
    assert re.search(r"[0-9a-f]{32}", dialog.inner_text()) is None  # no ids
    color = failure.evaluate("e => getComputedStyle(e).color")
    assert color == "rgb(180, 35, 24)", color  # red
    page.screenshot(path=str(SCREENSHOTS / "pages" / "desktop-launch-failed.png"))
    failure.get_by_role("link", name="Open its logs").click()
    logs = page.get_by_role("dialog", name="Logs of broken")
    output = logs.get_by_test_id("logs")
    expect(output).to_contain_text("FATAL: the sky map is missing")
    page.wait_for_function(
        "() => { const e = document.querySelector('[data-testid=logs]'); return e && e.scrollTop > 0 &&"
        " e.scrollTop + e.clientHeight >= e.scrollHeight - 2 }"
    )
    expect(logs.get_by_text("FATAL: the sky map is missing")).to_be_in_viewport()
    page.keyboard.press("Escape")
    environment = next(e for e in api(page, "GET", "/api/v1/environments")["items"] if e["name"] == "broken")
    api(page, "DELETE", f"/api/v1/environments/{environment['id']}")
    assert_clean(dana)


def test_stop_and_restart_ask_first_and_delete_says_what_goes_and_stays(dana: Session) -> None:
    page = dana.page
    go(page, "Environments")
    name = state["env"]["name"]
    row = page.locator(f'tr[data-environment="{name}"]')
    expect(row.locator(".badge")).to_have_text("running")
    expect(page.get_by_test_id("limits")).to_contain_text("1 running of")
    expect(row.get_by_test_id("deadlines")).to_contain_text(re.compile(r"idle stop in .*uptime ends in"))
    expect(row.get_by_test_id("resources")).to_contain_text(re.compile(r"of 0.5 CPU.*of 1 GiB", re.S))
    row.get_by_role("button", name=f"Restart {name}", exact=True).click()
    confirm = page.get_by_role("dialog", name="Restart environment")
    expect(confirm).to_contain_text("lose their kernels")
    confirm.get_by_role("button", name="Cancel").click()
    expect(row.locator(".badge")).to_have_text("running")
    row.get_by_role("button", name=f"Stop {name}", exact=True).click()
    confirm = page.get_by_role("dialog", name="Stop environment")
    confirm.get_by_role("button", name="Stop").click()
    expect(row.locator(".badge")).to_have_text("stopped", timeout=30_000)
    # Stopped: no question to start (and Start, not also Restart); its size and buckets can change.
    expect(row.get_by_role("button", name=f"Restart {name}", exact=True)).to_have_count(0)
    row.get_by_role("button", name=f"Edit {name}", exact=True).click()
    edit = page.get_by_role("dialog", name=f"Edit {name}")
    edit.get_by_role("radio", name=re.compile("^standard")).check()
    edit.get_by_role("button", name="Save").click()
    expect(row).to_contain_text("standard · 1 CPU · 2 GiB")
    row.get_by_role("button", name=f"Delete {name}", exact=True).click()
    confirm = page.get_by_role("dialog", name="Delete environment", exact=True)
    expect(confirm).to_contain_text("its own home folder")
    expect(confirm).to_contain_text(f"your buckets ({LONG_BUCKET}) and every file in them")
    confirm.get_by_role("button", name="Cancel").click()
    row.get_by_role("button", name=f"Start {name}", exact=True).click()
    expect(row.locator(".badge")).to_have_text("running", timeout=30_000)
    assert_clean(dana)


def test_a_bookmark_of_a_stopped_environment_starts_it_and_opens_the_page_asked_for(dana: Session) -> None:
    """Stopped overnight, a bookmark of a page in it (its bucket's folder here) leads to the web UI,
    which starts it, then the browser is back on that page."""
    page = dana.page
    env = state["env"]
    api(page, "POST", f"/api/v1/environments/{env['id']}/stop")
    bookmark = f"{env['url']}data/?sort=name"
    page.goto(bookmark)
    resume = page.get_by_test_id("resume")
    expect(resume).to_contain_text(f"{env['name']} is stopped. Start it to open the page you asked for.")
    expect(page).to_have_url(re.compile(r"/environments/\?resume="))
    resume.get_by_role("button", name=f"Start {env['name']} and open the page").click()
    page.wait_for_url(re.compile(re.escape(bookmark) + "$"), timeout=30_000)
    assert api(page, "GET", f"/api/v1/environments/{env['id']}")["status"] == "running"
    # another's id or an unknown one: the list, nothing said of it
    page.goto(f"/environments/?resume={'0' * 32}&next=%2Fanywhere")
    expect(page.get_by_role("heading", name="Environments")).to_be_visible()
    expect(page.get_by_test_id("resume")).to_have_count(0)
    assert_clean(dana)


def test_extend_postpones_the_automatic_stop(alice: Session, dana: Session) -> None:
    users = api(alice.page, "GET", "/api/v1/admin/users?query=dana")["items"]
    api(alice.page, "PATCH", f"/api/v1/admin/users/{users[0]['id']}", data={"max_uptime_minutes": 10})
    page = dana.page
    name = state["env"]["name"]
    row = page.locator(f'tr[data-environment="{name}"]')
    row.get_by_role("button", name=f"Restart {name}", exact=True).click()
    page.get_by_role("dialog", name="Restart environment").get_by_role("button", name="Restart").click()
    warning = page.get_by_role("alert").filter(has_text="it reaches its maximum uptime")
    expect(warning).to_be_visible(timeout=30_000)
    before = api(page, "GET", "/api/v1/environments")["items"][0]["uptime_shutdown_at"]
    warning.get_by_role("button", name=f"Extend {name}").click()
    expect(warning).to_be_hidden(timeout=10_000)
    after = api(page, "GET", "/api/v1/environments")["items"][0]["uptime_shutdown_at"]
    assert after > before
    assert_clean(dana)


# -- 6. an administrator sees everything -----------------------------------------------------------------


def test_an_admin_stops_another_users_environment_and_the_audit_names_it(alice: Session, dana: Session) -> None:
    page = alice.page
    name = state["env"]["name"]
    page.goto("/admin/")
    expect(page.get_by_role("heading", name="Storage")).to_be_visible()
    go(page, "Admin")
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Environments").click()
    row = page.locator(f'tr[data-environment="{name}"]')
    expect(row).to_contain_text("dana@example.org")
    expect(row.locator(".badge")).to_have_text("running")
    row.get_by_role("button", name=f"Stop {name} of dana@example.org").click()
    page.get_by_role("dialog", name="Stop environment").get_by_role("button", name="Stop").click()
    expect(row.locator(".badge")).to_have_text("stopped", timeout=30_000)
    expect(row).to_contain_text("by an administrator (alice@example.org)")
    go(page, "Admin")
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Audit trail").click()
    stopped = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="environment.stopped")).first
    expect(stopped).to_contain_text(f"environment {name}")
    expect(stopped).to_contain_text("alice@example.org")
    assert re.search(r"[0-9a-f]{32}", page.locator("main").inner_text()) is None  # names, not ids
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Users").click()
    expect(page.get_by_test_id("uptime-default")).to_contain_text("1440 minutes (24 h)")
    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Monitoring").click()
    # Bucket usage is measured (Dana's bucket holds a file), not reported as 0.
    stats = api(page, "GET", "/api/v1/admin/stats")
    assert stats["storages"]["usage_bytes"] > 0
    expect(page.get_by_role("region", name="Storage").locator(".big")).not_to_have_text("0 B")
    assert_clean(alice)


# -- 2. layout under real data: every page, at both sizes -------------------------------------------------


PAGES = [
    ("dashboard", "/"), ("applications", "/applications/"), ("environments", "/environments/"),
    ("storage", "/storage/"), ("files", None), ("settings", "/settings/"), ("admin-monitoring", "/admin/"),
    ("admin-users", "/admin/users/"), ("admin-environments", "/admin/environments/"),
    ("admin-applications", "/admin/applications/"), ("admin-audit", "/admin/audit/"), ("admin-usage", "/admin/usage/"),
]  # fmt: skip
LONG_GROUP = ("Polarization working group " + "z" * 100)[:100]


def test_the_dashboard_shows_the_months_estimate_and_an_admin_the_costs_per_user_as_csv(
    alice: Session, dana: Session, tmp_path: Path
) -> None:
    """Dana ran environments in the tests above; a small budget makes her month pass it."""
    dana_id = api(alice.page, "GET", "/api/v1/admin/users?query=dana")["items"][0]["id"]
    api(alice.page, "PUT", "/api/v1/admin/budgets/user/dana@example.org", data={"amount": 0.01, "unit": "currency"})
    api(alice.page, "PUT", f"/api/v1/admin/groups/{LONG_GROUP}", data={"members": ["dana@example.org"]})
    try:
        mine = api(dana.page, "GET", "/api/v1/usage/me")
        assert mine["totals"]["cost"] > 0 and "not a bill" in mine["estimate"]
        page = dana.page
        page.goto("/")
        card = page.get_by_role("region", name="This month")
        expect(card.locator(".big")).to_have_text(re.compile(r"\$\d"))  # an amount, in the table's currency
        expect(card).to_contain_text("Estimates from the operator's prices (CMBCLUSTER_PRICES), not a bill.")
        expect(card.get_by_role("status")).to_contain_text("your monthly budget of 0.01 USD is")
        assert_clean(dana)

        admin = alice.page
        admin.goto("/admin/usage/")
        row = admin.locator(f'tr[data-row="{dana_id}"]')
        expect(row).to_contain_text("dana@example.org")
        expect(row).to_contain_text("budget used up")
        expect(admin.locator(".error", has_text="user dana@example.org")).to_contain_text("new starts refused")
        expect(row.get_by_text(re.compile(r"^\$\d"))).to_be_visible()
        expect(admin.get_by_role("img", name=re.compile("^Core-hours per day, highest"))).to_be_visible()
        expect(admin.get_by_text(re.compile("^Estimates from the operator's prices"))).to_be_visible()
        with admin.expect_download() as download:
            admin.get_by_role("link", name="Download CSV").click()
        saved = tmp_path / "usage.csv"
        download.value.save_as(saved)
        lines = saved.read_text().splitlines()
        assert lines[0].startswith("# estimates from the operator's prices") and lines[1].startswith("user,label,")
        assert any(line.startswith(f"{dana_id},dana@example.org,") for line in lines), lines
        assert download.value.suggested_filename.endswith("-by-user.csv")

        admin.get_by_label("By").select_option("group")
        expect(admin.locator(f'tr[data-row="{LONG_GROUP}"]')).to_contain_text(LONG_GROUP)
        for viewport in SIZES.values():
            admin.set_viewport_size(viewport)
            no_horizontal_scroll(admin, f"usage by group at {viewport['width']} px")
        admin.set_viewport_size(SIZES["desktop"])
        admin.get_by_label("Month").fill("2020-01")
        expect(admin.get_by_text("Nothing used in 2020-01")).to_be_visible()
        assert_clean(alice)
    finally:
        api(alice.page, "DELETE", "/api/v1/admin/budgets/user/dana@example.org")
        api(alice.page, "DELETE", f"/api/v1/admin/groups/{LONG_GROUP}")


def test_every_page_keeps_long_names_within_the_window_at_both_sizes(
    alice: Session, dana: Session, server: ServeProcess
) -> None:
    # Dana, with her 200-character name, administers too now: she sees every page.
    users = api(alice.page, "GET", "/api/v1/admin/users?query=dana")["items"]
    api(alice.page, "PATCH", f"/api/v1/admin/users/{users[0]['id']}", data={"role": "admin"})
    storage = state["storage"]
    url = f"/api/v1/storages/{storage['id']}/objects/{LONG_FILE}"
    assert dana.page.request.put(url, data=b"long", headers={"Origin": server.url}).ok
    browser = dana.context.browser
    assert browser is not None
    (SCREENSHOTS / "pages").mkdir(parents=True, exist_ok=True)
    for size, viewport in SIZES.items():
        context = browser.new_context(
            base_url=server.url, storage_state=dana.context.storage_state(), viewport=viewport
        )
        page = context.new_page()
        errors: list[str] = []

        def on_error(exc: Error, into: list[str] = errors) -> None:
            into.append(str(exc))

        page.on("pageerror", on_error)
        try:
            for name, path in PAGES:
                page.goto(path or f"/storage/files/?id={storage['id']}")
                expect(page.locator("main h1").first).to_be_visible()
                page.wait_for_load_state("networkidle")
                if name == "files":
                    expect(page.get_by_text(LONG_FILE[:40])).to_be_visible()
                    cell: Locator = page.locator(f'tr[data-file="{LONG_FILE}"] .name').first
                    assert cell.get_attribute("title") == LONG_FILE  # the whole name on hover
                    assert cell.evaluate("e => e.scrollWidth > e.clientWidth"), "the long name is cut, with …"
                    download = page.get_by_role("link", name=f"Download {LONG_FILE}")
                    download.scroll_into_view_if_needed()
                    expect(download).to_be_in_viewport()
                    # The bucket's crumb is cut to the window, not to a letter or two.
                    crumb = page.get_by_role("navigation", name="Breadcrumb").get_by_role("link", name=LONG_BUCKET)
                    crumb_box = crumb.bounding_box()
                    assert crumb_box is not None and crumb_box["width"] >= viewport["width"] / 2, crumb_box
                if name == "dashboard":
                    expect(page.get_by_role("button", name="Sign out")).to_be_in_viewport()
                no_horizontal_scroll(page, f"{name} at {size}")
                page.screenshot(path=str(SCREENSHOTS / "pages" / f"{size}-{name}.png"), full_page=True)
            # The dialogs too.
            page.goto("/applications/")
            page.get_by_role("button", name="Launch Files").click()
            dialog = page.get_by_role("dialog", name="Launch Files")
            expect(dialog.get_by_role("checkbox", name=LONG_BUCKET)).to_be_checked()
            no_horizontal_scroll(page, f"launch dialog at {size}")
            wide = dialog.evaluate("e => [e.scrollWidth, e.clientWidth]")
            assert wide[0] <= wide[1], f"the launch dialog at {size} scrolls sideways: {wide}"
            for preset in ("light", "standard", "heavy"):  # a size's name is never cut in two
                lines = dialog.get_by_text(preset, exact=True).evaluate(LINES_OF_TEXT)
                assert lines == 1, f"{preset!r} is broken over {lines} lines at {size}"
            page.screenshot(path=str(SCREENSHOTS / "pages" / f"{size}-launch-dialog.png"))
        finally:
            context.close()
        assert errors == [], errors


def test_sign_out_says_so_and_the_development_sign_in_looks_like_the_app(
    people: People, open_session: OpenSession
) -> None:
    people("dana")  # signed in before, in another browser, which stays signed in
    dana = open_session()
    sign_in(dana, "dana")
    page = dana.page
    page.goto("/")
    menu = page.get_by_role("button", name="Menu")
    if menu.is_visible():
        menu.click()
    dana.console.expected.append(UNAUTHORIZED)  # signed out, the UI's requests are refused
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status").filter(has_text="You are signed out")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "pages" / "desktop-signed-out.png"))
    page.get_by_role("link", name="Sign in with Development sign-in").click()
    expect(page.get_by_role("heading", name="Development sign-in")).to_be_visible()
    button = page.get_by_role("button", name="Sign in")
    assert button.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 78, 216)"  # the app's blue
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(SCREENSHOTS / "pages" / "desktop-development-sign-in.png"))
    for size, viewport in SIZES.items():
        page.set_viewport_size(viewport)
        no_horizontal_scroll(page, f"the development sign-in at {size}")
    page.set_viewport_size(SIZES["desktop"])


def test_a_session_ended_in_another_tab_takes_the_launch_dialog_to_sign_in(
    alice: Session, people: People, open_session: OpenSession
) -> None:
    """The launch dialog follows a start that takes long (a cluster adding a node); Dana signs out in
    another tab. The dialog's progress stream ends, saying so, and its page goes to the sign-in page,
    which says she is signed out and brings her back to Applications."""
    api(alice.page, "POST", "/api/v1/applications", data={
        "slug": "slow-start", "name": "Slow start", "image": "local", "default_preset": "light",
        "command": [shutil.which("sleep"), "3600"],  # never opens its port: starting until stopped
    })  # fmt: skip
    kept = people("dana")  # signed in before, in another browser, which stays signed in
    dana = open_session()
    sign_in(dana, "dana")
    dana.console.expected.append(UNAUTHORIZED)  # signed out, the UI's requests are refused
    page = dana.page
    page.goto("/applications/")
    page.get_by_role("button", name="Launch Slow start").click()
    dialog = page.get_by_role("dialog", name="Launch Slow start")
    dialog.get_by_label("Name (optional)").fill("slow start")
    dialog.get_by_role("button", name="Launch").click()
    try:
        expect(dialog.get_by_test_id("launch-status")).to_have_text("starting", timeout=30_000)
        other = dana.context.new_page()
        other.goto("/")
        menu = other.get_by_role("button", name="Menu")
        if menu.is_visible():
            menu.click()
        other.get_by_role("button", name="Sign out").click()
        expect(other.get_by_role("status").filter(has_text="You are signed out")).to_be_visible()
        expect(page).to_have_url(re.compile(r"/signin/\?signed_out=1&next=%2Fapplications%2F$"), timeout=10_000)
        expect(page.get_by_role("status").filter(has_text="You are signed out")).to_be_visible()
        expect(page.get_by_role("link", name=f"Sign in with {PROVIDER_DISPLAY_NAME}")).to_have_attribute(
            "href", re.compile(r"\?next=%2Fapplications%2F$")
        )
    finally:
        for environment in api(kept.page, "GET", "/api/v1/environments")["items"]:
            if environment["name"] == "slow start":
                api(kept.page, "DELETE", f"/api/v1/environments/{environment['id']}")
    assert_clean(dana)
