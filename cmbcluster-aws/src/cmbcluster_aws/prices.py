"""AWS list prices for usage reports (us-east-1, on demand), as cited in docs/ARCHITECTURE_POLYCLOUD.md.

EC2 prices whole instances only: the per-vCPU and per-GiB figures split the m5.xlarge node price
in the ratio GCP's N2 list prices use (a vCPU costs about 7.46 GiB-hours), so that a reserved
whole node costs exactly the instance price. Operators override any figure with CMBCLUSTER_PRICES.
"""

from __future__ import annotations

import datetime as dt

from cmbcluster import hookimpl
from cmbcluster.pricing import ComputePrice, PriceTable
from cmbcluster.registrations import ResolvedConfig

#: GCP N2 us-central1: $0.031611 per vCPU-hour / $0.004237 per GiB-hour.
VCPU_TO_GIB = 0.031611 / 0.004237

PRICE_TABLE = PriceTable(
    provider="aws",
    currency="USD",
    node_type="m5.xlarge (4 vCPU, 16 GiB), $0.192/h",
    compute=ComputePrice.split_node(0.192, vcpus=4, memory_gib=16, vcpu_to_gib=VCPU_TO_GIB),
    storage_gb_month={"standard": 0.023, "infrequent": 0.0125, "cold": 0.004, "archive": 0.00099, "auto": 0.023},
    cluster_hour=0.10,
    sources=(
        "https://aws.amazon.com/ec2/pricing/on-demand/ (m5.xlarge, us-east-1)",
        "https://aws.amazon.com/s3/pricing/ (first 50 TB per month)",
        "https://aws.amazon.com/eks/pricing/ (standard support)",
    ),
    read_on=dt.date(2026, 11, 1),
)


@hookimpl
def cmbcluster_price_table(config: ResolvedConfig) -> PriceTable | None:
    return PRICE_TABLE
