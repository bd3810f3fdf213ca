"""GCP list prices for usage reports (us-central1, on demand), as cited in docs/ARCHITECTURE_POLYCLOUD.md.

Compute Engine prices N2 machines per vCPU-hour and per GiB-hour; n2-standard-4 (4 vCPU, 16 GiB)
is their sum, $0.194236/h. Cloud Storage prices per GiB-month (730 hours). Operators override any
figure with CMBCLUSTER_PRICES.
"""

from __future__ import annotations

import datetime as dt

from cmbcluster import hookimpl
from cmbcluster.pricing import ComputePrice, PriceTable
from cmbcluster.registrations import ResolvedConfig

PRICE_TABLE = PriceTable(
    provider="gcp",
    currency="USD",
    node_type="n2-standard-4 (4 vCPU, 16 GiB), $0.194236/h",
    compute=ComputePrice(vcpu_hour=0.031611, gib_hour=0.004237),
    storage_gb_month={"standard": 0.020, "infrequent": 0.010, "cold": 0.004, "archive": 0.0012, "auto": 0.020},
    cluster_hour=0.10,
    sources=(
        "https://cloud.google.com/compute/vm-instance-pricing (N2, us-central1)",
        "https://cloud.google.com/storage/pricing (regional, us-central1)",
        "https://cloud.google.com/kubernetes-engine/pricing (cluster management fee)",
    ),
    read_on=dt.date(2026, 11, 1),
)


@hookimpl
def cmbcluster_price_table(config: ResolvedConfig) -> PriceTable | None:
    return PRICE_TABLE
