"""The AWS plugin's price table passes the price-table contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmbcluster.config import ResolvedConfig
from cmbcluster.testing.deploy import resolved_config
from cmbcluster.testing.prices import PriceTableContract, PriceTableHook
from cmbcluster_aws.prices import cmbcluster_price_table


class TestAwsPriceTableContract(PriceTableContract):
    provider = "aws"

    @pytest.fixture
    def price_table(self) -> PriceTableHook:
        return cmbcluster_price_table

    @pytest.fixture
    def active_config(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ResolvedConfig:
        return resolved_config(
            monkeypatch, CLOUD_PROVIDER="aws", AWS_REGION="eu-west-1", AWS_ACCOUNT_ID="123456789012",
            CMBCLUSTER_DATA_DIR=str(tmp_path),
        )  # fmt: skip
