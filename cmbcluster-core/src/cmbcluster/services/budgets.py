"""Monthly budgets of users and groups: warn at 80 %, refuse new starts at 100 %, stop at 100 % if hard.

A budget counts the calendar month (UTC) so far, in the price table's currency (estimated cost)
or in core-hours, from the same usage records as the reports (:mod:`cmbcluster.services.accounting`).
A group's budget counts the usage of all its members.

Each crossing (80 or 100 % in a month) is recorded once in ``budget_events`` (a unique key makes
a second recording a no-op), audited, and sent to ``CMBCLUSTER_BUDGET_WEBHOOK_URL`` by the reconcile
loop until delivered or :data:`MAX_ATTEMPTS` passes have failed; a failed delivery is logged,
never raised.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cmbcluster.db.models import Budget, BudgetEvent, Group, GroupMember, User, utcnow
from cmbcluster.errors import CmbclusterError, Conflict, InvalidRequest, NotFound
from cmbcluster.pricing import PriceTable
from cmbcluster.services import accounting
from cmbcluster.services.audit import audit
from cmbcluster.services.users import by_email
from cmbcluster.text import check_display_name

if TYPE_CHECKING:
    from cmbcluster.context import AppContext

log = logging.getLogger(__name__)

UNITS = ("currency", "core_hours")
SCOPES = ("user", "group")
LEVELS = (80, 100)
#: The smallest budget, and its precision: a cent, or a hundredth of a core-hour. Smaller amounts
#: (5e-324 was accepted once) only made messages such as "1.2e+299 % used".
MIN_AMOUNT = 0.01
#: The largest budget, in the API and the CLI alike (a trillion: no deployment spends that much)
MAX_AMOUNT = 1e12
AMOUNT_DECIMALS = 2
#: Percentages are reported up to this (shown as ">999 %"): far past 100 % the figure says nothing
#: more, and a budget an earlier version accepted (5e-324) must not make it infinite.
PERCENT_CAP = 1000.0
#: The longest group name, in characters.
MAX_GROUP_NAME = 100
#: Webhook deliveries per event: a few tries within a pass, then again on later passes up to this.
MAX_ATTEMPTS = 5
TRIES_PER_PASS = 3
WEBHOOK_TIMEOUT = 5.0


class BudgetExceeded(CmbclusterError):
    """A start refused because a budget is used up (403: retrying does not help until the month ends
    or an admin raises the budget)."""

    http_status = 403
    code = "budget_exceeded"


@dataclass
class BudgetStatus:
    budget: Budget
    label: str  # the user's e-mail or the group's name
    used: float
    currency: str

    @property
    def percent(self) -> float:
        """100 x used / amount, at most :data:`PERCENT_CAP` (never infinite)."""
        if self.budget.amount <= 0:
            return 100.0
        return min(100.0 * self.used / self.budget.amount, PERCENT_CAP)

    @property
    def level(self) -> int:
        """0, 80 or 100: the highest threshold reached."""
        return max((lvl for lvl in LEVELS if self.percent >= lvl), default=0)

    @property
    def state(self) -> str:
        return {0: "ok", 80: "warning", 100: "exceeded"}[self.level]

    def describe(self) -> str:
        unit = self.currency if self.budget.unit == "currency" else "core-hours"
        whose = "your monthly budget" if self.budget.scope == "user" else f"the monthly budget of group {self.label!r}"
        return (
            f"{whose} of {format_amount(self.budget.amount)} {unit} is {format_percent(self.percent)} used "
            f"({self.used:.2f} {unit} this month)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.budget.id, "scope": self.budget.scope, "target_id": self.budget.target_id,
            "label": self.label, "amount": self.budget.amount, "unit": self.budget.unit,
            "currency": self.currency, "hard": self.budget.hard, "used": round(self.used, 4),
            "percent": round(self.percent, 1), "state": self.state, "message": self.describe(),
        }  # fmt: skip


def format_amount(amount: float) -> str:
    """A budget's amount as people write it: 0.01, 12.5, 1000000000000 (not 1e+12)."""
    return f"{amount:.{AMOUNT_DECIMALS}f}".rstrip("0").rstrip(".")


def format_percent(percent: float) -> str:
    """``80 %``, or ``>999 %`` once the figure stops meaning anything."""
    return ">999 %" if percent >= 999.5 else f"{percent:.0f} %"


def month_of(now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime]:
    lo, hi = accounting.month_period(now.strftime("%Y-%m"))
    return now.strftime("%Y-%m"), lo, hi


# -- evaluation ----------------------------------------------------------------------------------
def statuses(
    db: Session,
    prices: PriceTable,
    *,
    user_id: str | None = None,
    budget_id: str | None = None,
    now: dt.datetime | None = None,
) -> list[BudgetStatus]:
    """Every budget's use this month; with ``user_id``, only the budgets that bind that user; with
    ``budget_id``, that one alone."""  # fmt: skip
    moment = now or utcnow()
    if user_id is not None:
        budgets = list(db.execute(_USERS_BUDGETS, {"user_id": user_id}).scalars())
    elif budget_id is not None:
        budgets = list(db.execute(_ALL_BUDGETS.where(Budget.id == budget_id)).scalars())
    else:
        budgets = list(db.execute(_ALL_BUDGETS).scalars())
    if not budgets:
        return []
    members: dict[str, list[str]] = defaultdict(list)
    group_ids = [b.target_id for b in budgets if b.scope == "group"]
    for group_id, member in db.execute(
        select(GroupMember.group_id, GroupMember.user_id).where(GroupMember.group_id.in_(group_ids))
    ):
        members[group_id].append(member)
    users = {b.target_id for b in budgets if b.scope == "user"} | {u for ms in members.values() for u in ms}
    _month, lo, hi = month_of(moment)
    usage = accounting.usage_by(db, prices, lo, hi, user_ids=sorted(users), now=moment)
    labels = dict(db.execute(select(User.id, User.email).where(User.id.in_(users))).all())
    labels |= dict(db.execute(select(Group.id, Group.name).where(Group.id.in_(group_ids))).all())
    result = []
    for budget in budgets:
        who = [budget.target_id] if budget.scope == "user" else members[budget.target_id]
        used = sum(_amount(usage[u], budget.unit) for u in who if u in usage)
        result.append(BudgetStatus(budget, labels.get(budget.target_id, budget.target_id), used, prices.currency))
    return result


_ALL_BUDGETS = select(Budget).order_by(Budget.scope, Budget.created_at)
# Built once: every start asks it (check_start), and building costs more than running it.
_USERS_BUDGETS = _ALL_BUDGETS.where(
    ((Budget.scope == "user") & (Budget.target_id == bindparam("user_id")))
    | (
        (Budget.scope == "group")
        & Budget.target_id.in_(select(GroupMember.group_id).where(GroupMember.user_id == bindparam("user_id")))
    )
)


def _amount(usage: accounting.Usage, unit: str) -> float:
    return usage.cost if unit == "currency" else usage.core_hours


def check_start(db: Session, context: AppContext, user: User) -> None:
    """Refuse a new start when a budget binding ``user`` is used up (recording the crossing)."""
    used_up = [s for s in statuses(db, context.prices, user_id=user.id) if s.level >= 100]
    if not used_up:
        return
    record_crossings(db, used_up)
    db.commit()
    raise BudgetExceeded(
        f"new environments cannot start: {used_up[0].describe()}; "
        "ask an administrator to raise it, or wait for next month"
    )


def record_crossings(db: Session, found: list[BudgetStatus], now: dt.datetime | None = None) -> list[BudgetEvent]:
    """Record (once per budget, month and level) and audit each threshold reached. Returns the new ones."""
    moment = now or utcnow()
    month = moment.strftime("%Y-%m")
    recorded = []
    for status in found:
        for level in (lvl for lvl in LEVELS if lvl <= status.level):
            exists = db.execute(
                select(BudgetEvent.id).where(
                    BudgetEvent.budget_id == status.budget.id, BudgetEvent.month == month, BudgetEvent.level == level
                )
            ).first()
            if exists:
                continue
            payload = {
                "event": "budget.warning" if level == 80 else "budget.exceeded", "level": level, "month": month,
                "at": moment.isoformat(), **status.as_dict(),
            }  # fmt: skip
            event = BudgetEvent(budget_id=status.budget.id, month=month, level=level, at=moment, payload=payload)
            try:
                with db.begin_nested():  # another replica or request recorded it meanwhile: theirs stands
                    db.add(event)
            except IntegrityError:
                continue
            audit(db, actor_id=None, action=payload["event"], target_type=f"budget.{status.budget.scope}",
                  target_id=status.budget.target_id, level=level, month=month, message=status.describe())  # fmt: skip
            recorded.append(event)
    return recorded


@dataclass(frozen=True)
class HardStop:
    """Users whose running environments a used-up hard budget stops, and the reason they are told."""

    user_ids: list[str]
    reason: str


def enforce(db: Session, context: AppContext) -> list[HardStop]:
    """The reconcile loop's pass: record crossings, send pending events, and say whose environments
    a used-up hard budget stops (the loop stops them: this module stays below services.environments,
    which asks it before every start)."""
    found = statuses(db, context.prices)
    record_crossings(db, found)
    db.commit()
    stops: list[HardStop] = []
    for status in found:
        if status.level < 100 or not status.budget.hard:
            continue
        users = (
            [status.budget.target_id]
            if status.budget.scope == "user"
            else list(db.execute(select(GroupMember.user_id).where(GroupMember.group_id == status.budget.target_id))
                      .scalars())
        )  # fmt: skip
        stops.append(HardStop(user_ids=users, reason=f"stopped: {status.describe()} (a hard budget)"))
    deliver_pending(db, context.config.core.budget_webhook_url)
    return stops


# -- the webhook ---------------------------------------------------------------------------------
def deliver_pending(db: Session, url: str | None, *, pause: float = 0.5) -> int:
    """POST each undelivered event to ``url`` (a few tries each); returns how many arrived."""
    if not url:
        return 0
    pending = db.execute(
        select(BudgetEvent)
        .where(BudgetEvent.delivered_at.is_(None), BudgetEvent.attempts < MAX_ATTEMPTS)
        .order_by(BudgetEvent.id)
    ).scalars()
    delivered = 0
    with httpx.Client(timeout=WEBHOOK_TIMEOUT) as client:
        for event in list(pending):
            for attempt in range(TRIES_PER_PASS):
                event.attempts += 1
                try:
                    client.post(url, json=event.payload).raise_for_status()
                except httpx.HTTPError as error:
                    log.warning("budget webhook: event %s not delivered (attempt %s): %s", event.id, event.attempts,
                                error)  # fmt: skip
                    if event.attempts >= MAX_ATTEMPTS:
                        break
                    if attempt + 1 < TRIES_PER_PASS:
                        time.sleep(pause * (attempt + 1))
                    continue
                event.delivered_at = utcnow()
                delivered += 1
                break
            db.commit()
    return delivered


# -- administration ------------------------------------------------------------------------------
def resolve_target(db: Session, scope: str, target: str) -> tuple[str, str]:
    """(id, label) of a user (id or e-mail) or a group (id or name)."""
    if scope == "user":
        user = db.get(User, target) or by_email(db, target)
        if user is None:
            raise NotFound(f"user {target} not found")
        return user.id, user.email
    if scope == "group":
        group = db.get(Group, target) or db.execute(select(Group).where(Group.name == target)).scalar_one_or_none()
        if group is None:
            raise NotFound(f"group {target} not found")
        return group.id, group.name
    raise InvalidRequest(f"a budget's scope is one of {', '.join(SCOPES)}, not {scope!r}")


def set_budget(
    db: Session,
    prices: PriceTable,
    *,
    actor_id: str | None,
    scope: str,
    target: str,
    amount: float,
    unit: str,
    hard: bool,
) -> Budget:
    if unit not in UNITS:
        raise InvalidRequest(f"a budget's unit is one of {', '.join(UNITS)}, not {unit!r}")
    if not math.isfinite(amount):  # "nan" and "inf" parse as floats
        raise InvalidRequest(f"a budget's amount must be a finite number, not {amount}")
    if not amount >= MIN_AMOUNT:
        raise InvalidRequest(f"a budget's amount must be at least {MIN_AMOUNT}, not {amount!r}")
    if amount > MAX_AMOUNT:
        raise InvalidRequest(f"a budget's amount must be at most {MAX_AMOUNT:.0e}, not {amount!r}")
    amount = round(amount, AMOUNT_DECIMALS)
    target_id, label = resolve_target(db, scope, target)
    if unit == "currency" and not prices.priced:
        raise InvalidRequest(
            "every price of this deployment is zero (the embedded default's, unless CMBCLUSTER_PRICES sets "
            "some), so a budget in currency would never run out: set it in core_hours, or set prices first"
        )
    budget = db.execute(
        select(Budget).where(Budget.scope == scope, Budget.target_id == target_id)
    ).scalar_one_or_none() or Budget(scope=scope, target_id=target_id)
    budget.amount, budget.unit, budget.hard = amount, unit, hard
    db.add(budget)
    db.flush()
    audit(db, actor_id=actor_id, action="budget.set", target_type=f"budget.{scope}", target_id=target_id,
          label=label, amount=amount, unit=unit, hard=hard)  # fmt: skip
    db.commit()
    _reset_crossings(db, prices, budget)
    return budget


def _reset_crossings(db: Session, prices: PriceTable, budget: Budget) -> None:
    """Forget this month's crossings the budget's new amount puts back below: a raised budget warns
    again when its use reaches the new 80 %."""
    current = [s for s in statuses(db, prices) if s.budget.id == budget.id]
    level = current[0].level if current else 0
    month = utcnow().strftime("%Y-%m")
    for event in db.execute(
        select(BudgetEvent).where(BudgetEvent.budget_id == budget.id, BudgetEvent.month == month)
    ).scalars():
        if event.level > level:
            db.delete(event)
    db.commit()


def delete_budget(db: Session, *, actor_id: str | None, scope: str, target: str) -> None:
    try:
        target_id, label = resolve_target(db, scope, target)
    except NotFound:  # a deleted user's budget that an earlier version kept, listed by the id: removable by it
        if not db.execute(select(Budget.id).where(Budget.scope == scope, Budget.target_id == target)).first():
            raise
        target_id = label = target
    budget = db.execute(select(Budget).where(Budget.scope == scope, Budget.target_id == target_id)).scalar_one_or_none()
    if budget is None:
        raise NotFound(f"{scope} {label} has no budget")
    db.delete(budget)
    audit(db, actor_id=actor_id, action="budget.deleted", target_type=f"budget.{scope}", target_id=target_id,
          label=label)  # fmt: skip
    db.commit()


def forget_user(db: Session, user_id: str) -> None:
    """A user being deleted: their budget goes too (it was kept, listed by id, and could not be
    removed, every way of naming a budget's user looking the user up first)."""
    _delete_budgets(db, "user", user_id)


def _delete_budgets(db: Session, scope: str, target_id: str) -> None:
    """The budget of a user or group that is being deleted (the caller commits)."""
    for budget in db.execute(select(Budget).where(Budget.scope == scope, Budget.target_id == target_id)).scalars():
        db.delete(budget)


def check_group_name(name: str) -> str:
    """``name`` stripped, if it can name a new group: 1 to :data:`MAX_GROUP_NAME` printable
    characters. Names are shown to admins in tables, the CSV and the terminal; a NUL, a line break
    or a right-to-left override there would disguise them. No ``/``: the API names a group in its paths.
    Not ``(no group)``, the row of the users in none, with which the group's figures would merge."""
    name = check_display_name(name, what="a group name", limit=MAX_GROUP_NAME)
    if "/" in name:
        raise InvalidRequest("a group name cannot contain '/': the API names groups in its paths")
    if name.casefold() == accounting.NO_GROUP:
        raise InvalidRequest(
            f"{accounting.NO_GROUP!r} names the users in no group in reports and /metrics: choose another group name"
        )
    return name


def set_group(db: Session, *, actor_id: str | None, name: str, members: list[str]) -> Group:
    """Create or replace a group's members (users given by id or e-mail). A new group's name is
    checked (:func:`check_group_name`); an existing group keeps its name, whatever it is."""
    name = name.strip()
    # one member named two ways (by e-mail in another case, by id) is one member
    ids = list(dict.fromkeys(resolve_target(db, "user", member)[0] for member in members))
    group = db.execute(select(Group).where(Group.name == name)).scalar_one_or_none()
    if group is None:
        same = db.execute(select(Group.name).where(func.lower(Group.name) == name.lower())).scalars().first()
        if same is not None:  # "Physics" beside "physics" would read as one group in every listing
            raise Conflict(f"a group {same!r} exists: a new group's name must differ from it in more than case")
        group = Group(name=check_group_name(name))
        db.add(group)
        db.flush()
    for row in db.execute(select(GroupMember).where(GroupMember.group_id == group.id)).scalars():
        db.delete(row)
    db.flush()
    db.add_all(GroupMember(group_id=group.id, user_id=uid) for uid in ids)
    audit(db, actor_id=actor_id, action="group.set", target_type="group", target_id=group.id, name=name,
          members=len(ids))  # fmt: skip
    db.commit()
    return group


def set_group_storage_quota(db: Session, *, actor_id: str, name: str, quota_bytes: int | None) -> Group:
    """Set what a group's members' buckets may hold together (earlier versions included); None
    or 0: no group quota. Audited with the value before and after."""
    group_id, label = resolve_target(db, "group", name)
    group = db.get(Group, group_id)
    assert group is not None
    quota_bytes = quota_bytes or None
    if quota_bytes != group.storage_quota_bytes:
        audit(db, actor_id=actor_id, action="group.storage_quota_changed", target_type="group", target_id=group_id,
              name=label, before={"storage_quota_bytes": group.storage_quota_bytes},
              after={"storage_quota_bytes": quota_bytes})  # fmt: skip
        group.storage_quota_bytes = quota_bytes
    db.commit()
    return group


def status_of(db: Session, prices: PriceTable, budget: Budget, label: str) -> BudgetStatus:
    """This month's status of a budget just set, for the answer (see :func:`group_of`)."""
    found = statuses(db, prices, budget_id=budget.id)
    if found:
        return found[0]
    raise _removed_meanwhile(f"{budget.scope} {label}'s budget")


def group_of(db: Session, group_id: str, label: str) -> dict[str, Any]:
    """A group just changed, for the answer. Another admin may have deleted it since the change was
    committed: a 409 saying so (reading it back from every group was a 500 then)."""
    found = groups(db, group_id=group_id)
    if found:
        return found[0]
    raise _removed_meanwhile(f"group {label}")


def _removed_meanwhile(what: str) -> Conflict:
    return Conflict(f"{what} was removed by another request meanwhile")


def groups(db: Session, *, group_id: str | None = None) -> list[dict[str, Any]]:
    """Every group (or the one ``group_id``) with its members' e-mails."""
    query = (
        select(Group.id, Group.name, Group.storage_quota_bytes, User.email)
        .select_from(Group)
        .outerjoin(GroupMember, GroupMember.group_id == Group.id)
        .outerjoin(User, User.id == GroupMember.user_id)
        .order_by(Group.name, User.email)
    )
    rows = db.execute(query if group_id is None else query.where(Group.id == group_id)).all()
    found: dict[str, dict[str, Any]] = {}
    for group_id, name, quota, email in rows:
        entry = found.setdefault(group_id, {"id": group_id, "name": name, "members": [], "storage_quota_bytes": quota})
        if email:
            entry["members"].append(email)
    return list(found.values())


def delete_group(db: Session, *, actor_id: str | None, name: str) -> None:
    group_id, label = resolve_target(db, "group", name)
    group = db.get(Group, group_id)
    db.delete(group)
    _delete_budgets(db, "group", group_id)
    audit(db, actor_id=actor_id, action="group.deleted", target_type="group", target_id=group_id, name=label)
    db.commit()
