"""Price tables: what an hour of a vCPU, of a GiB of memory and a month of a stored GiB cost.

A cloud plugin provides its provider's table through ``cmbcluster_price_table`` (list prices, with
their sources and the date they were read); the operator overrides any price with
``CMBCLUSTER_PRICES`` (JSON); without either, everything costs zero (the embedded default) and
reports show usage without money. Amounts computed from a table are estimates, never a bill.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmbcluster.errors import ConfigurationError

__all__ = ["HOURS_PER_MONTH", "ComputePrice", "PriceOverrides", "PriceTable", "resolve_price_table"]

#: The month of cloud price pages (and of docs/ARCHITECTURE_POLYCLOUD.md): 730 hours.
HOURS_PER_MONTH = 730


@dataclass(frozen=True, kw_only=True)
class ComputePrice:
    """Per reserved vCPU-hour and GiB-hour of memory."""

    vcpu_hour: float
    gib_hour: float

    @classmethod
    def split_node(cls, hourly: float, vcpus: float, memory_gib: float, vcpu_to_gib: float) -> ComputePrice:
        """Per-vCPU and per-GiB prices from a node's hourly price, for clouds that price whole
        instances only: a vCPU costs ``vcpu_to_gib`` times a GiB, and a whole node reserved costs
        exactly ``hourly``."""
        gib = hourly / (vcpus * vcpu_to_gib + memory_gib)
        return cls(vcpu_hour=gib * vcpu_to_gib, gib_hour=gib)

    def hourly(self, cpu: float, memory_gib: float) -> float:
        return cpu * self.vcpu_hour + memory_gib * self.gib_hour


@dataclass(frozen=True, kw_only=True)
class PriceTable:
    """One provider's list prices. ``compute`` prices every preset not in ``presets``;
    ``storage_gb_month`` is per GiB-month (730 hours) by portable storage class."""

    provider: str
    currency: str = "USD"
    compute: ComputePrice = ComputePrice(vcpu_hour=0.0, gib_hour=0.0)
    presets: Mapping[str, ComputePrice] = field(default_factory=dict)
    node_type: str = ""  # the node type ``compute`` was read for, as shown in reports
    storage_gb_month: Mapping[str, float] = field(default_factory=dict)
    cluster_hour: float = 0.0
    sources: tuple[str, ...] = ()
    read_on: dt.date | None = None
    overridden: tuple[str, ...] = ()  # the prices the operator's configuration changed

    def compute_for(self, preset: str) -> ComputePrice:
        return self.presets.get(preset, self.compute)

    def storage_for(self, storage_class: str) -> float:
        return self.storage_gb_month.get(storage_class, self.storage_gb_month.get("standard", 0.0))

    @property
    def priced(self) -> bool:
        """False when every price is zero: reports then show usage without money."""
        return bool(
            self.compute.vcpu_hour or self.compute.gib_hour or self.cluster_hour
            or any(p.vcpu_hour or p.gib_hour for p in self.presets.values())
            or any(self.storage_gb_month.values())
        )  # fmt: skip

    @property
    def disclaimer(self) -> str:
        if not self.priced:
            return "no prices are configured for this deployment: usage only, no amounts"
        if not self.sources:  # no plugin's list: the operator's figures alone
            return "estimates from the operator's prices (CMBCLUSTER_PRICES), not a bill"
        read = f" read on {self.read_on.isoformat()}" if self.read_on else ""
        changed = f", with the operator's own prices for {', '.join(self.overridden)}" if self.overridden else ""
        return f"estimates from {self.provider} list prices{read}{changed}, not a bill"

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "currency": self.currency, "node_type": self.node_type,
            "vcpu_hour": self.compute.vcpu_hour, "gib_hour": self.compute.gib_hour,
            "presets": {name: {"vcpu_hour": p.vcpu_hour, "gib_hour": p.gib_hour} for name, p in self.presets.items()},
            "storage_gb_month": dict(self.storage_gb_month), "cluster_hour": self.cluster_hour,
            "sources": list(self.sources), "read_on": self.read_on.isoformat() if self.read_on else None,
            "overridden": list(self.overridden), "estimate": self.disclaimer,
        }  # fmt: skip


class _ComputeOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcpu_hour: float = Field(ge=0)
    gib_hour: float = Field(ge=0)


class PriceOverrides(BaseModel):
    """``CMBCLUSTER_PRICES``: any price the operator sets instead of the plugin's list price."""

    model_config = ConfigDict(extra="forbid")
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    vcpu_hour: float | None = Field(default=None, ge=0)
    gib_hour: float | None = Field(default=None, ge=0)
    presets: dict[str, _ComputeOverride] = Field(default_factory=dict)
    storage_gb_month: dict[str, float] = Field(default_factory=dict)
    cluster_hour: float | None = Field(default=None, ge=0)

    @classmethod
    def parse(cls, raw: str | None) -> PriceOverrides:
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError([f"CMBCLUSTER_PRICES is not a valid price table: {problems}"]) from exc


def apply_overrides(table: PriceTable, overrides: PriceOverrides) -> PriceTable:
    changed: list[str] = []
    compute = table.compute
    if overrides.vcpu_hour is not None or overrides.gib_hour is not None:
        compute = ComputePrice(
            vcpu_hour=compute.vcpu_hour if overrides.vcpu_hour is None else overrides.vcpu_hour,
            gib_hour=compute.gib_hour if overrides.gib_hour is None else overrides.gib_hour,
        )
        changed.append("compute")
    presets = dict(table.presets)
    for name, preset in overrides.presets.items():
        presets[name] = ComputePrice(vcpu_hour=preset.vcpu_hour, gib_hour=preset.gib_hour)
        changed.append(f"preset {name}")
    storage = dict(table.storage_gb_month)
    for storage_class, price in overrides.storage_gb_month.items():
        if price < 0:
            raise ConfigurationError([f"CMBCLUSTER_PRICES: storage_gb_month.{storage_class} must not be negative"])
        storage[storage_class] = price
        changed.append(f"storage {storage_class}")
    cluster_hour = table.cluster_hour
    if overrides.cluster_hour is not None:
        cluster_hour = overrides.cluster_hour
        changed.append("cluster fee")
    return replace(
        table, currency=overrides.currency or table.currency, compute=compute, presets=presets,
        storage_gb_month=storage, cluster_hour=cluster_hour, overridden=tuple(changed),
    )  # fmt: skip


def resolve_price_table(provider: str, offered: list[tuple[str, object]], overrides: PriceOverrides) -> PriceTable:
    """The table of the configured ``provider`` among the plugins' answers (chosen by name, never
    by install order), with the operator's overrides; zero prices when no plugin prices it."""
    found: dict[str, tuple[str, PriceTable]] = {}
    for plugin_name, table in offered:
        if table is None:
            continue
        if not isinstance(table, PriceTable):
            raise ConfigurationError(
                [f"plugin {plugin_name!r} returned {type(table).__name__} from cmbcluster_price_table; "
                 "expected cmbcluster.pricing.PriceTable"]
            )  # fmt: skip
        if table.provider in found:
            raise ConfigurationError(
                [f"two plugins price provider {table.provider!r}: {found[table.provider][0]!r} and {plugin_name!r}"]
            )
        found[table.provider] = (plugin_name, table)
    table = found[provider][1] if provider in found else PriceTable(provider=provider)
    return apply_overrides(table, overrides)
