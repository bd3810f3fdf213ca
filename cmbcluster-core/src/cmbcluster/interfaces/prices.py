"""Price tables, the value a cloud plugin returns from ``cmbcluster_price_table``.

Per reserved vCPU-hour and GiB-hour, per GiB-month stored by storage class, the cluster fee, with
the price pages' URLs and the date they were read. :mod:`cmbcluster.pricing` selects the
deployment's table and applies the operator's overrides.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HOURS_PER_MONTH", "ComputePrice", "PriceTable"]

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
