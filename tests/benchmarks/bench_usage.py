"""Usage reports over a year of records for 1,000 users (issue 20): target <= 200 ms per report.

Each user runs one environment on each of 250 working days (8 hours, with a restart every tenth
day) and their bucket changes size every day: about 275,000 environment intervals and 365,000
storage intervals. Measures, on SQLite (WAL, local disk), the year's report by user, by group and
by application, and one user's own month (by day). Reports read the daily and monthly rollups
(rebuilt here from the bulk-inserted intervals, as the migration that added them does) plus the
intervals still open. Prints the figures; exits 1 when one misses the
target. With ``--postgres`` also on PostgreSQL (tests/postgres.py starts a server on 127.0.0.1).

    python tests/benchmarks/bench_usage.py [--users 1000] [--postgres]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, insert

from cmbcluster.db import create_db_engine, session_factory, upgrade
from cmbcluster.db.models import Group, GroupMember, StorageInterval, UsageInterval, User
from cmbcluster.pricing import ComputePrice, PriceTable
from cmbcluster.services import accounting

TARGET_MS = 200.0
YEAR = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = 86400
PRICES = PriceTable(
    provider="bench", compute=ComputePrice(vcpu_hour=0.03, gib_hour=0.004), storage_gb_month={"standard": 0.02}
)


def fill(engine: Engine, users: int) -> int:
    upgrade(engine)
    start = int(YEAR.timestamp())
    with session_factory(engine)() as db:
        db.execute(insert(User), [
            {"id": f"u{i:05d}", "email": f"user{i}@example.org", "auth_provider": "bench", "subject": str(i)}
            for i in range(users)
        ])  # fmt: skip
        db.execute(insert(Group), [{"id": f"g{g}", "name": f"group {g}"} for g in range(20)])
        db.execute(insert(GroupMember), [{"group_id": f"g{i % 20}", "user_id": f"u{i:05d}"} for i in range(users)])
        rows = 0
        for i in range(users):
            envs: list[dict[str, object]] = []
            stored: list[dict[str, object]] = []
            for day in range(365):
                base = start + day * DAY
                if day % 7 < 5 and len(envs) < 275:
                    cut = 4 * 3600 if day % 10 == 0 else 0  # a restart: two intervals that day
                    spans = (
                        [(9 * 3600, 9 * 3600 + cut), (9 * 3600 + cut, 17 * 3600)] if cut else [(9 * 3600, 17 * 3600)]
                    )
                    for a, b in spans:
                        envs.append({"environment_id": f"e{i}", "user_id": f"u{i:05d}", "application": "jupyterlab",
                                     "preset": "standard", "cpu": 1.0, "memory_gib": 2.0, "accelerator": "",
                                     "start_s": base + a, "end_s": base + b, "seen_s": base + b})  # fmt: skip
                stored.append({"storage_id": f"s{i}", "user_id": f"u{i:05d}", "storage_class": "standard",
                               "bytes": (day + 1) * 2**30, "start_s": base,
                               "end_s": base + DAY if day < 364 else None})  # fmt: skip
            db.execute(insert(UsageInterval), envs)
            db.execute(insert(StorageInterval), stored)
            rows += len(envs) + len(stored)
        db.commit()
    # Bulk inserts bypass the ORM events that keep the rollups: recompute them, as the migration does.
    began = time.perf_counter()
    with engine.begin() as connection:
        accounting.rebuild_rollups(connection)
    print(f"  rollups rebuilt from every closed interval in {time.perf_counter() - began:.1f} s")
    return rows


def timed(engine: Engine, label: str, run: object, repeat: int = 5) -> float:
    times = []
    with session_factory(engine)() as db:
        for _ in range(repeat):
            began = time.perf_counter()
            run(db)  # type: ignore[operator]
            times.append((time.perf_counter() - began) * 1000)
    median = statistics.median(times)
    print(f"  {label:<38} median {median:7.1f} ms  (min {min(times):.1f}, max {max(times):.1f})")
    return median


def measure(engine: Engine, name: str, users: int) -> bool:
    began = time.perf_counter()
    rows = fill(engine, users)
    print(f"{name}: {rows:,} records for {users} users in {time.perf_counter() - began:.1f} s")
    end = YEAR.replace(year=2027)
    now = end
    december = YEAR.replace(month=12)
    results = [
        timed(engine, "year by user", lambda db: accounting.report(db, PRICES, YEAR, end, "user", now=now)),
        timed(engine, "year by group", lambda db: accounting.report(db, PRICES, YEAR, end, "group", now=now)),
        timed(engine, "year by application", lambda db: accounting.report(db, PRICES, YEAR, end, "application", now=now)),  # noqa: E501
        timed(engine, "one user's month by day (/usage/me)", lambda db: accounting.report(
            db, PRICES, YEAR, YEAR.replace(month=2), "day", user_ids=["u00042"], now=now)),
        # the admin page's default: this month so far, today's hours read from the intervals (the
        # records end with the year: on its last day, as the dashboard would ask on that day)
        timed(engine, "December so far by user (31st, 13:00)", lambda db: accounting.report(
            db, PRICES, december, end, "user", now=december.replace(day=31, hour=13))),
    ]  # fmt: skip
    return all(r <= TARGET_MS for r in results)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_db_engine(f"sqlite:///{Path(tmp) / 'usage.db'}")
        ok &= measure(engine, "SQLite", args.users)
        engine.dispose()
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from postgres import postgres_server  # type: ignore[import-not-found]

        with postgres_server() as url:
            engine = create_db_engine(url)
            ok &= measure(engine, "PostgreSQL", args.users)
            engine.dispose()
    print(f"target: every report <= {TARGET_MS:.0f} ms: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
