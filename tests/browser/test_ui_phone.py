"""The web UI on a phone (390 by 844), as an outsider used it: long names, a group over its storage
quota, several buckets in one launch, a budget used up.

Erin, a scientist, works on a phone; Alice (the administrator) sets her group's quota and her budget.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from .conftest import LINES_OF_TEXT, SCREENSHOTS, SIZES, People, Session, api, assert_clean

LONG_ENV = "component-separation-notebook-for-the-planck-lfi-30ghz-maps-with-a-very-long-descriptive-name"
BUCKETS = ["Planck LFI 30 GHz maps", "ACT DR6 lensing", "x"]
GROUP = "Cosmic Microwave Background Component Separation Working Group"


@pytest.fixture(scope="module")
def erin(people: People) -> Session:
    """Erin on her phone, with three buckets."""
    erin = people("erin")
    erin.page.set_viewport_size(SIZES["phone"])
    for name in BUCKETS:
        api(erin.page, "POST", "/api/v1/storages", data={"display_name": name})
    return erin


@pytest.fixture
def environments(erin: Session) -> Iterator[list[str]]:
    """Ids of the environments a test starts: deleted afterwards, pass or fail."""
    made: list[str] = []
    yield made
    for environment_id in made:
        api(erin.page, "DELETE", f"/api/v1/environments/{environment_id}")


def running(page: Page, environment_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = api(page, "GET", f"/api/v1/environments/{environment_id}")
        if found["status"] == "running":
            return found
        assert found["status"] in ("pending", "starting") and time.monotonic() < deadline, found
        page.wait_for_timeout(300)


def photograph(page: Page, name: str) -> None:
    (SCREENSHOTS / "phone").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "phone" / f"{name}.png"), full_page=True)


def test_the_dashboard_keeps_open_on_one_line_beside_a_long_environment_name(
    erin: Session, environments: list[str]
) -> None:
    page = erin.page
    created = api(
        page, "POST", "/api/v1/environments",
        data={"application": "files", "name": LONG_ENV, "preset": "light", "start": True},
    )  # fmt: skip
    environments.append(created["id"])
    running(page, created["id"])
    page.goto("/")
    card = page.get_by_role("region", name="My environments")
    link = card.get_by_role("link", name=f"Open {LONG_ENV}")
    expect(link).to_be_visible()
    photograph(page, "dashboard-long-environment-name")
    assert link.evaluate(LINES_OF_TEXT) == 1, "Open is broken over several lines"
    assert link.evaluate("e => e.getBoundingClientRect().right <= window.innerWidth")
    name = card.locator(".name", has_text=LONG_ENV[:20])
    assert name.evaluate("e => e.scrollWidth > e.clientWidth"), "the long name is the part cut, with …"
    assert_clean(erin)


def test_several_buckets_ticked_in_the_launch_dialog_get_a_folder_each(erin: Session, environments: list[str]) -> None:
    page = erin.page
    page.goto("/applications/")
    page.get_by_role("button", name="Launch Files").click()
    dialog = page.get_by_role("dialog", name="Launch Files")
    for name in BUCKETS:
        dialog.get_by_role("checkbox", name=name).check()
    paths = [dialog.get_by_label(f"Mount path for {name}") for name in BUCKETS]
    for path, expected in zip(paths, ["/home/user/data", "/home/user/data-2", "/home/user/data-3"], strict=True):
        expect(path).to_have_value(expected)
    # unticked and ticked again: the first folder free again
    dialog.get_by_role("checkbox", name=BUCKETS[0]).uncheck()
    dialog.get_by_role("checkbox", name=BUCKETS[0]).check()
    expect(paths[0]).to_have_value("/home/user/data")
    photograph(page, "launch-dialog-three-buckets")
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog.get_by_test_id("launch-status")).to_have_text("running", timeout=30_000)
    launched = [e for e in api(page, "GET", "/api/v1/environments")["items"] if e["id"] not in environments]
    environments.extend(e["id"] for e in launched)
    (mine,) = launched
    assert sorted(m["mount_path"] for m in mine["mounts"]) == [
        "/home/user/data", "/home/user/data-2", "/home/user/data-3"
    ]  # fmt: skip
    dialog.get_by_role("button", name="Close").click()
    assert_clean(erin)


def test_the_launch_progress_of_a_long_named_environment_stays_inside_its_dialog(
    erin: Session, environments: list[str]
) -> None:
    """The launch dialog follows a start to its end: the name, the status line, the bar and the Open
    button stay within the dialog on a phone (the name wraps; nothing is cut off at the right)."""
    page = erin.page
    page.goto("/applications/")
    page.get_by_role("button", name="Launch Files").click()
    dialog = page.get_by_role("dialog", name="Launch Files")
    name = dialog.get_by_label("Name (optional)")
    expect(name).to_have_accessible_description(re.compile(r"up to 100 characters"))  # not cut without a word
    name.fill(LONG_ENV)
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog.get_by_test_id("launch-status")).to_have_text("running", timeout=30_000)
    environments.extend(e["id"] for e in api(page, "GET", "/api/v1/environments")["items"] if e["name"] == LONG_ENV)
    link = dialog.get_by_role("link", name=f"Open {LONG_ENV}")
    expect(link).to_be_visible()
    photograph(page, "launch-progress-long-environment-name")
    right = dialog.evaluate("d => d.getBoundingClientRect().right")
    for part in (dialog.locator(".launch-progress"), dialog.locator("progress"), link):
        assert part.evaluate("e => e.getBoundingClientRect().right") <= right + 0.5, part
    progress = dialog.locator(".launch-progress")
    assert progress.evaluate("e => e.scrollWidth <= e.clientWidth"), "something in the progress is cut off"
    expect(page.get_by_test_id("limits")).to_contain_text("1 running of")  # the page behind counts it already
    dialog.get_by_role("button", name="Close").click()
    assert_clean(erin)


def test_without_prices_the_dashboard_leads_with_hours_not_an_amount(erin: Session) -> None:
    """Found by a newcomer: with no prices configured the dashboard showed "$0.00" in large type
    beside "no prices are configured: usage only, no amounts". (This suite's server has prices:
    the report is answered as an unpriced deployment's would be.)"""
    page = erin.page

    def unpriced(route: Any) -> None:
        report = route.fetch().json()
        report["priced"] = False
        report["estimate"] = "no prices are configured for this deployment: usage only, no amounts"
        report["totals"] = {**report["totals"], "cost": 0, "compute_cost": 0, "storage_cost": 0}
        route.fulfill(json=report)

    page.route("**/api/v1/usage/me*", unpriced)
    try:
        page.goto("/")
        card = page.get_by_role("region", name="This month")
        expect(card.locator(".big")).to_have_text(re.compile(r"^[\d.,]+ h$"), timeout=30_000)
        expect(card).to_contain_text("environment hours (")
        expect(card).not_to_contain_text("$")
        expect(card).to_contain_text("No prices are configured for this deployment: usage only, no amounts.")
    finally:
        page.unroute("**/api/v1/usage/me*")
    assert_clean(erin)


def test_a_group_over_its_storage_quota_is_red_and_says_uploads_are_refused(alice: Session, erin: Session) -> None:
    page = erin.page
    bucket = next(s for s in api(page, "GET", "/api/v1/storages")["storages"] if s["display_name"] == BUCKETS[0])
    api(page, "PUT", f"/api/v1/storages/{bucket['id']}/objects/maps/sky.fits", data=b"\0" * 20_000)
    # the quota set afterwards, below what the group holds (as an admin may)
    api(alice.page, "PUT", f"/api/v1/admin/groups/{GROUP}", data={"members": ["erin@example.org"]})
    try:
        api(alice.page, "PATCH", f"/api/v1/admin/groups/{GROUP}", data={"storage_quota_bytes": 12_000})
        deadline = time.monotonic() + 30
        while api(page, "GET", "/api/v1/storages")["group_quotas"][0]["used_bytes"] < 20_000:  # measured
            assert time.monotonic() < deadline, "the upload is not counted in the group's usage"
            page.wait_for_timeout(300)
        page.goto("/storage/")
        line = page.locator(".group-quota")
        expect(line).to_contain_text("of the group's 12 KiB quota")
        expect(line).to_contain_text("over its quota, so uploads are refused")
        expect(line).to_have_class(re.compile(r"\berror\b"))
        photograph(page, "storage-group-over-quota")
        page.goto("/")
        on_dashboard = page.get_by_role("region", name="Storage usage").locator(".group-quota")
        expect(on_dashboard).to_contain_text("over its quota, so uploads are refused")
        expect(on_dashboard).to_have_class(re.compile(r"\berror\b"))
        # near it (80 % and more): yellow, no refusal said
        api(alice.page, "PATCH", f"/api/v1/admin/groups/{GROUP}", data={"storage_quota_bytes": 24_000})
        page.reload()
        expect(on_dashboard).to_have_class(re.compile(r"\bwarning\b"))
        expect(on_dashboard).not_to_contain_text("refused")
        assert_clean(erin)
    finally:
        api(alice.page, "DELETE", f"/api/v1/admin/groups/{GROUP}")


def test_a_used_up_budget_is_red_and_says_new_environments_cannot_start(
    alice: Session, erin: Session, environments: list[str]
) -> None:
    """At a cent per core-second, Erin's month passes 0.02 while an environment of hers runs: a 0.01
    budget is used up (the environments above ran a second or two each on a quiet machine: too few)."""
    page = erin.page
    created = api(page, "POST", "/api/v1/environments", data={"application": "files", "preset": "light", "start": True})
    environments.append(created["id"])
    running(page, created["id"])
    deadline = time.monotonic() + 60
    while api(page, "GET", "/api/v1/usage/me")["totals"]["cost"] < 0.02:
        assert time.monotonic() < deadline, "the running environment is not counted in her month"
        page.wait_for_timeout(300)
    api(alice.page, "PUT", "/api/v1/admin/budgets/user/erin@example.org", data={"amount": 0.01, "unit": "currency"})
    try:
        page.goto("/")
        card = page.get_by_role("region", name="This month")
        expect(card.locator(".big")).to_be_visible(timeout=30_000)  # the month added up
        budget = card.get_by_role("status").filter(has_text="budget")
        expect(budget).to_contain_text("your monthly budget of 0.01 USD is")
        expect(budget).to_contain_text("New environments cannot start until an administrator raises it")
        expect(budget).to_have_class(re.compile(r"\berror\b"))
        photograph(page, "dashboard-budget-used-up")
        assert_clean(erin)

        usage = alice.page
        usage.goto("/admin/usage/")
        flagged = usage.locator("p", has_text="user erin@example.org")
        expect(flagged).to_contain_text("new starts refused")
        expect(flagged).to_contain_text(re.compile(r": (\d+|>999) % of its monthly 0.01 USD used"))
        expect(flagged).to_have_class(re.compile(r"\berror\b"))
        assert_clean(alice)
    finally:
        api(alice.page, "DELETE", "/api/v1/admin/budgets/user/erin@example.org")
