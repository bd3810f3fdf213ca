"""The AWS and GCP price tables, through the accounting: the architecture doc's example month
(3 nodes all month, 2 TB stored) gives the doc's node and storage lines."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from cmbcluster.config import resolve
from cmbcluster.db import create_db_engine, session_factory, upgrade
from cmbcluster.db.models import StorageInterval, UsageInterval
from cmbcluster.pricing import PriceOverrides, resolve_price_table
from cmbcluster.services import accounting
from cmbcluster.settings import CoreSettings

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE_POLYCLOUD.md"
NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
MONTH = dt.timedelta(hours=730)


def doc_line(starts: str) -> tuple[float, float]:
    """The (GCP, AWS) amounts of the cost table's row that starts with ``starts``."""
    row = next(line for line in DOC.read_text().splitlines() if line.startswith(f"| {starts}"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    gcp, aws = (float(re.match(r"\$([\d,.]+)", cell).group(1).replace(",", "")) for cell in cells[1:3])  # type: ignore[union-attr]
    return gcp, aws


@pytest.mark.parametrize("provider", ["gcp", "aws"])
def test_the_architecture_docs_example_month_gives_its_node_and_storage_lines(tmp_path: Path, provider: str) -> None:
    config = resolve(CoreSettings(data_dir=tmp_path))  # the installed plugins answer cmbcluster_price_table
    prices = resolve_price_table(provider, config.plugins.price_tables(config), PriceOverrides())
    assert prices.sources and prices.read_on is not None
    engine = create_db_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    upgrade(engine)
    start, end = int(NOV.timestamp()), int((NOV + MONTH).timestamp())
    with session_factory(engine)() as db:
        for node in range(3):  # three environments, each reserving a whole 4 vCPU / 16 GiB node
            db.add(UsageInterval(environment_id=f"e{node}", user_id="u", application="a", preset="node", cpu=4,
                                 memory_gib=16, start_s=start, end_s=end, seen_s=end))  # fmt: skip
        db.add(StorageInterval(storage_id="s", user_id="u", storage_class="standard", bytes=2048 * 1024**3,
                               start_s=start, end_s=end))  # fmt: skip
        db.commit()
        usage = accounting.usage_by(db, prices, NOV, NOV + MONTH, now=NOV + MONTH)["u"]
    nodes, storage = doc_line("3 nodes"), doc_line("2 TB")
    column = 0 if provider == "gcp" else 1
    assert round(usage.compute_cost, 2) == nodes[column]
    assert round(usage.storage_cost, 2) == storage[column]
    assert usage.storage_gb_months == pytest.approx(2048)
    assert round(730 * prices.cluster_hour, 2) == doc_line("cluster fee")[1]


def test_the_operator_overrides_a_plugins_price(tmp_path: Path) -> None:
    config = resolve(CoreSettings(data_dir=tmp_path))
    overrides = PriceOverrides.parse('{"storage_gb_month": {"standard": 0.01}, "cluster_hour": 0}')
    prices = resolve_price_table("aws", config.plugins.price_tables(config), overrides)
    assert prices.storage_for("standard") == 0.01 and prices.cluster_hour == 0
    assert prices.compute.vcpu_hour > 0  # the rest stays the plugin's
    assert "aws list prices read on 2026-11-01" in prices.disclaimer and "operator" in prices.disclaimer
