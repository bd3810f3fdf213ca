"""Route53: upsert the deployment's DNS records (``cmbcluster infra dns``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import DnsRecord
from cmbcluster.provisioning.dns import Zone, best_zone, check_record
from cmbcluster_aws.errors import aws_errors

__all__ = ["Route53Dns"]


class Route53Dns:
    """UPSERT changes in one hosted zone: ``hosted_zone_id``, or the public zone whose name is the
    longest suffix of the records' names (:func:`cmbcluster.provisioning.dns.best_zone`)."""

    def __init__(self, client: Any, *, hosted_zone_id: str | None = None) -> None:
        self.client = client
        self.hosted_zone_id = hosted_zone_id.removeprefix("/hostedzone/") if hosted_zone_id else None

    def zone_for(self, name: str) -> tuple[str, str]:
        """(zone id, zone name) for a record name."""
        with aws_errors("Route53 hosted zones"):
            if self.hosted_zone_id:
                zone = self.client.get_hosted_zone(Id=self.hosted_zone_id)["HostedZone"]
                return self.hosted_zone_id, str(zone["Name"])
            zones = [
                Zone(id=str(z["Id"]).removeprefix("/hostedzone/"), name=str(z["Name"]),
                     public=not z.get("Config", {}).get("PrivateZone"))
                for page in self.client.get_paginator("list_hosted_zones").paginate()
                for z in page.get("HostedZones", [])
            ]  # fmt: skip
        best = best_zone(name, zones, kind="Route53 hosted zone", setting="ROUTE53_HOSTED_ZONE_ID")
        return best.id, best.name

    def upsert(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        if not records:
            raise InvalidRequest("no DNS records to upsert")
        zone_id, zone_name = self.zone_for(records[0].name)
        changes, done = [], []
        for record in records:
            fqdn = check_record(record, zone_name, f"hosted zone {zone_name}")
            changes.append(
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": fqdn,
                        "Type": record.type,
                        "TTL": record.ttl,
                        "ResourceRecords": [{"Value": value} for value in record.values],
                    },
                }
            )
            done.append(f"UPSERT {record.type} {fqdn} -> {', '.join(record.values)} (zone {zone_name} {zone_id})")
        if not dry_run:
            with aws_errors(f"Route53 zone {zone_name}"):
                self.client.change_resource_record_sets(
                    HostedZoneId=zone_id,
                    ChangeBatch={"Comment": "cmbcluster infra dns", "Changes": changes},
                )
        return done
