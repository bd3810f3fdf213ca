"""Price tables: what an hour of a vCPU, of a GiB of memory and a month of a stored GiB cost.

A cloud plugin provides its provider's table through ``cmbcluster_price_table`` (list prices, with
their sources and the date they were read); the operator overrides any price with
``CMBCLUSTER_PRICES`` (JSON); without either, everything costs zero (the embedded default) and
reports show usage without money. Amounts computed from a table are estimates, never a bill.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmbcluster.errors import ConfigurationError
from cmbcluster.interfaces.prices import HOURS_PER_MONTH, ComputePrice, PriceTable

__all__ = ["HOURS_PER_MONTH", "ComputePrice", "PriceOverrides", "PriceTable", "resolve_price_table"]


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
                 "expected cmbcluster.interfaces.PriceTable"]
            )  # fmt: skip
        if table.provider in found:
            raise ConfigurationError(
                [f"two plugins price provider {table.provider!r}: {found[table.provider][0]!r} and {plugin_name!r}"]
            )
        found[table.provider] = (plugin_name, table)
    table = found[provider][1] if provider in found else PriceTable(provider=provider)
    return apply_overrides(table, overrides)
