"""Usage records under a controllable clock: a month of starts, stops, restarts and a control-plane
crash adds up to exactly the expected hours, on the real local compute and storage backends."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from waiting import wait_until_running

from cmbcluster.context import AppContext
from cmbcluster.db.models import Environment, UsageInterval, User
from cmbcluster.interfaces import StorageClass
from cmbcluster.services import accounting, environments, storages
from cmbcluster.services.reconcile import Reconciler
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.clock import ManualClock, manual_clock

NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
MIB = 1024**2


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    """No idle culling or uptime limit: the scenarios say when each environment stops."""
    return CoreSettings(data_dir=tmp_path / "data", idle_timeout_minutes=0, max_uptime_hours=0)


@pytest.fixture
def clock(client: TestClient) -> Iterator[ManualClock]:
    with manual_clock(NOV) as moving:
        yield moving


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return NOV + dt.timedelta(days=day - 1, hours=hour, minutes=minute)


def _context(app: FastAPI) -> AppContext:
    context: AppContext = app.state.context
    return context


def _start(context: AppContext, env_id: str) -> None:
    with context.sessions() as db:
        env = db.get(Environment, env_id)
        assert env is not None
        user = db.get(User, env.user_id)
        assert user is not None
        environments.reserve_start(db, context, user, env)
        environments.launch(db, context, env)
    # Running before the clock moves on: an hour later, one still starting would be past its start timeout.
    wait_until_running(context, env_id)


def _stop(context: AppContext, env_id: str) -> None:
    with context.sessions() as db:
        env = db.get(Environment, env_id)
        assert env is not None
        environments.stop(db, context, env, actor_id=None, reason="test")


def test_a_month_adds_up_to_the_expected_core_hours_and_gb_months(
    app: FastAPI, client: TestClient, alice: dict[str, str], clock: ManualClock
) -> None:
    context = _context(app)
    with context.sessions() as db:
        user = db.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
        env = environments.create(
            db, context, user, environments.EnvironmentRequest(application="files", preset="light")
        )
        env_id, cpu, memory_gib = env.id, env.cpu, env.memory_mib / 1024
        bucket = storages.create_storage(db, context, user, display_name="data", storage_class=StorageClass.STANDARD)
        storage_id, bucket_name = bucket.id, bucket.bucket_name

    def measure() -> None:
        context.storage_runtime.refresher.refresh(storage_id, bucket_name).result(timeout=10)

    # the bucket: empty on the 1st, 3 MiB from the 11th, 1 MiB from the 21st to the end of the month
    measure()
    clock.set(at(11, 0))
    context.storage.upload_object(bucket_name, "a", [b"x" * (2 * MIB)])
    context.storage.upload_object(bucket_name, "b", [b"x" * MIB])
    measure()
    clock.set(at(15, 0))
    measure()  # unchanged: no new record
    clock.set(at(21, 0))
    context.storage.delete_objects(bucket_name, ["a"])
    measure()

    # day 1: 09:00-17:00, with reconcile passes meanwhile (they must not add anything)
    clock.set(at(1, 9))
    _start(context, env_id)
    for hour in range(10, 17):
        clock.set(at(1, hour))
        Reconciler(context).reconcile()
    clock.set(at(1, 17))
    _stop(context, env_id)
    # day 2: 09:00-18:00 with a restart at 12:00 (stop and start in the same second)
    clock.set(at(2, 9))
    _start(context, env_id)
    clock.set(at(2, 12))
    _stop(context, env_id)
    _start(context, env_id)
    clock.set(at(2, 18))
    _stop(context, env_id)
    # day 3: started at 09:00, last seen running at 10:00, the control plane and its processes die
    # at 10:30; the restarted control plane finds it gone at 11:00: it ran one hour, as far as anyone saw
    clock.set(at(3, 9))
    _start(context, env_id)
    clock.set(at(3, 10))
    Reconciler(context).reconcile()
    clock.set(at(3, 10, 30))
    context.compute.stop(env_id)  # the crash: the process is gone, the record still says running
    clock.set(at(3, 11))
    report = Reconciler(context).reconcile(startup=True)
    assert env_id in report.marked_stopped
    # day 30: started at 20:00 and still running when the month ends
    clock.set(at(30, 20))
    _start(context, env_id)
    clock.set(at(31, 0))  # 2026-12-01 00:00
    Reconciler(context).reconcile()

    hours = 8 + 9 + 1 + 4
    with context.sessions() as db:
        usage = accounting.usage_by(db, context.prices, NOV, at(31, 0))[user.id]
        assert usage.environment_hours == pytest.approx(hours, abs=1e-9)
        assert usage.core_hours == pytest.approx(hours * cpu, abs=1e-9)
        assert usage.memory_gib_hours == pytest.approx(hours * memory_gib, abs=1e-9)
        gib_hours = (3 * 10 * 24 + 1 * 10 * 24) / 1024  # 3 MiB for 10 days, 1 MiB for 10 days
        assert usage.storage_gb_months == pytest.approx(gib_hours / 730, rel=1e-12)
        assert usage.cost == 0  # the embedded default prices nothing
        # one interval per run, one of them open (a background pass racing a stop may leave an
        # empty one, which counts nothing)
        runs = select(func.count()).where((UsageInterval.end_s > UsageInterval.start_s) | UsageInterval.end_s.is_(None))
        assert db.execute(runs).scalar_one() == 5
        open_ = db.execute(select(UsageInterval).where(UsageInterval.end_s.is_(None))).scalars().all()
        assert [i.environment_id for i in open_] == [env_id]
        # the first week: only days 1 to 3
        week = accounting.usage_by(db, context.prices, NOV, at(8, 0))[user.id]
        assert week.environment_hours == pytest.approx(18, abs=1e-9)
    _stop(context, env_id)


def test_a_control_plane_restart_continues_an_environment_that_kept_running(
    app: FastAPI, client: TestClient, alice: dict[str, str], clock: ManualClock
) -> None:
    """A pod outlives its control plane: the interval goes on, and is counted once."""
    context = _context(app)
    with context.sessions() as db:
        user = db.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
        env_id = environments.create(db, context, user, environments.EnvironmentRequest(application="files")).id
    clock.set(at(5, 8))
    _start(context, env_id)
    clock.set(at(5, 9))
    Reconciler(context).reconcile()
    clock.set(at(5, 12))  # down from 9:00 to 12:00; the environment kept running
    Reconciler(context).reconcile(startup=True)
    clock.set(at(5, 14))
    _stop(context, env_id)
    with context.sessions() as db:
        assert accounting.usage_by(db, context.prices, NOV, at(6, 0))[user.id].environment_hours == 6
        runs = select(func.count()).where(UsageInterval.end_s > UsageInterval.start_s)
        assert db.execute(runs).scalar_one() == 1


def test_an_environment_deleted_while_running_closes_its_interval(
    app: FastAPI, client: TestClient, alice: dict[str, str], clock: ManualClock
) -> None:
    context = _context(app)
    with context.sessions() as db:
        user = db.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
        env_id = environments.create(db, context, user, environments.EnvironmentRequest(application="files")).id
    clock.set(at(7, 8))
    _start(context, env_id)
    clock.set(at(7, 10))
    with context.sessions() as db:
        env = db.get(Environment, env_id)
        assert env is not None
        environments.remove(db, context, env, actor_id=None)
    clock.set(at(7, 20))
    with context.sessions() as db:
        assert accounting.usage_by(db, context.prices, NOV, at(8, 0))[user.id].environment_hours == 2


def test_local_prices_are_zero_unless_configured(tmp_path: Path) -> None:
    from cmbcluster.app import create_app

    plain = create_app(CoreSettings(data_dir=tmp_path / "a")).state.context.prices
    assert not plain.priced and "usage only" in plain.disclaimer
    priced = create_app(
        CoreSettings(data_dir=tmp_path / "b", prices='{"vcpu_hour": 0.05, "gib_hour": 0.01}')
    ).state.context.prices
    assert priced.compute.hourly(2, 4) == pytest.approx(0.14)


def test_a_wrong_price_override_stops_the_start_naming_the_field(tmp_path: Path) -> None:
    from cmbcluster.app import create_app
    from cmbcluster.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"CMBCLUSTER_PRICES.*vcpu_hour"):
        create_app(CoreSettings(data_dir=tmp_path, prices='{"vcpu_hour": -1}'))
