"""The GCP plugin's price table passes the price-table contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbcluster.config import ResolvedConfig
from cmbcluster.testing.deploy import resolved_config
from cmbcluster.testing.prices import PriceTableContract, PriceTableHook
from cmbcluster_gcp.prices import cmbcluster_price_table


class TestGcpPriceTableContract(PriceTableContract):
    provider = "gcp"

    @pytest.fixture
    def price_table(self) -> PriceTableHook:
        return cmbcluster_price_table

    @pytest.fixture
    def active_config(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ResolvedConfig:
        return resolved_config(
            monkeypatch, CLOUD_PROVIDER="gcp", PROJECT_ID="cmb-research", CMBCLUSTER_DATA_DIR=str(tmp_path)
        )
