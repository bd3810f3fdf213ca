"""The price-table contract: what every ``cmbcluster_price_table`` implementation must return.

Usage reports price what users reserved with the table of the configured cloud's plugin, chosen by
its ``provider`` name, with the operator's overrides on top (``CMBCLUSTER_PRICES``). The suite
checks a plugin's table the way core reads it: a :class:`~cmbcluster.interfaces.PriceTable` (or
None), for the plugin's own provider name, every price finite and not negative, the standard
storage class priced, the public pages it was read from and the date it was read (every amount is
shown as an estimate from that date's list prices), overrides applied over it::

    from cmbcluster.testing.prices import PriceTableContract

    class TestAzurePrices(PriceTableContract):
        provider = "azure"

        @pytest.fixture
        def price_table(self):
            return cmbcluster_azure.prices.cmbcluster_price_table

        @pytest.fixture
        def active_config(self, monkeypatch, tmp_path):
            return resolved_config(monkeypatch, CLOUD_PROVIDER="azure", CMBCLUSTER_DATA_DIR=str(tmp_path))
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable

import pytest

from cmbcluster.config import ResolvedConfig
from cmbcluster.interfaces import PriceTable
from cmbcluster.pricing import PriceOverrides, resolve_price_table

__all__ = ["PriceTableContract", "PriceTableHook"]

#: ``cmbcluster_price_table(config) -> PriceTable | None``, the hook implementation under test.
PriceTableHook = Callable[[ResolvedConfig], PriceTable | None]


class PriceTableContract:
    """Subclass with ``provider`` (the infra provider's name the table is for) and two fixtures:
    ``price_table`` (the hook implementation) and ``active_config`` (a configuration using it)."""

    provider: str = ""

    @pytest.fixture
    def price_table(self) -> PriceTableHook:
        raise NotImplementedError("return the plugin's cmbcluster_price_table")

    @pytest.fixture
    def active_config(self) -> ResolvedConfig:
        raise NotImplementedError("return a ResolvedConfig with the plugin's cloud selected")

    def _table(self, price_table: PriceTableHook, config: ResolvedConfig) -> PriceTable:
        table = price_table(config)
        assert isinstance(table, PriceTable), f"cmbcluster_price_table returned {type(table).__name__}"
        return table

    def test_the_table_is_for_its_provider_and_chosen_by_that_name(
        self, price_table: PriceTableHook, active_config: ResolvedConfig
    ) -> None:
        assert self.provider, "set provider to the infra provider's name the table prices"
        table = self._table(price_table, active_config)
        assert table.provider == self.provider
        chosen = resolve_price_table(self.provider, [("plugin", table)], PriceOverrides())
        assert chosen.priced, "a plugin's table prices something (else return None)"
        assert chosen.compute == table.compute and dict(chosen.storage_gb_month) == dict(table.storage_gb_month)

    def test_every_price_is_finite_and_not_negative(
        self, price_table: PriceTableHook, active_config: ResolvedConfig
    ) -> None:
        table = self._table(price_table, active_config)
        prices = {
            "vcpu_hour": table.compute.vcpu_hour, "gib_hour": table.compute.gib_hour,
            "cluster_hour": table.cluster_hour,
            **{f"presets.{name}.vcpu_hour": p.vcpu_hour for name, p in table.presets.items()},
            **{f"presets.{name}.gib_hour": p.gib_hour for name, p in table.presets.items()},
            **{f"storage_gb_month.{name}": price for name, price in table.storage_gb_month.items()},
        }  # fmt: skip
        bad = {name: value for name, value in prices.items() if not (math.isfinite(value) and value >= 0)}
        assert not bad, f"prices must be finite and >= 0: {bad}"
        assert "standard" in table.storage_gb_month, "the standard storage class (the default) needs a price"
        assert re.fullmatch(r"[A-Z]{3}", table.currency), f"currency {table.currency!r} is not an ISO 4217 code"

    def test_it_says_where_and_when_its_prices_were_read(
        self, price_table: PriceTableHook, active_config: ResolvedConfig
    ) -> None:
        table = self._table(price_table, active_config)
        assert table.sources and all(url.startswith("https://") for url in table.sources), table.sources
        assert table.read_on is not None and table.read_on <= dt.date.today()
        assert table.read_on.isoformat() in table.disclaimer  # every amount says its prices' date
        json.dumps(table.describe())  # what GET /api/v1/usage/prices answers

    def test_the_operators_overrides_win(self, price_table: PriceTableHook, active_config: ResolvedConfig) -> None:
        table = self._table(price_table, active_config)
        overrides = PriceOverrides.parse('{"vcpu_hour": 1.25, "storage_gb_month": {"standard": 0.5}}')
        chosen = resolve_price_table(self.provider, [("plugin", table)], overrides)
        assert chosen.compute.vcpu_hour == 1.25 and chosen.storage_for("standard") == 0.5
        assert chosen.compute.gib_hour == table.compute.gib_hour  # the rest stays the plugin's
        assert chosen.overridden
