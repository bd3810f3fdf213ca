"""Route53: upsert the deployment's DNS records (``cmbcluster infra dns``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cmbcluster.errors import InvalidRequest, NotFound
from cmbcluster.interfaces import DnsRecord
from cmbcluster_aws.errors import aws_errors

__all__ = ["Route53Dns"]


def _fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


class Route53Dns:
    """UPSERT changes in one hosted zone: ``hosted_zone_id``, or the public zone whose name is the
    longest suffix of the records' names."""

    def __init__(self, client: Any, *, hosted_zone_id: str | None = None) -> None:
        self.client = client
        self.hosted_zone_id = hosted_zone_id.removeprefix("/hostedzone/") if hosted_zone_id else None

    def zone_for(self, name: str) -> tuple[str, str]:
        """(zone id, zone name) for a record name."""
        with aws_errors("Route53 hosted zones"):
            if self.hosted_zone_id:
                zone = self.client.get_hosted_zone(Id=self.hosted_zone_id)["HostedZone"]
                return self.hosted_zone_id, str(zone["Name"])
            zones = [z for page in self.client.get_paginator("list_hosted_zones").paginate()
                     for z in page.get("HostedZones", [])]  # fmt: skip
        fqdn = _fqdn(name.removeprefix("*."))
        matching = [
            z
            for z in zones
            if not z.get("Config", {}).get("PrivateZone") and (fqdn == z["Name"] or fqdn.endswith("." + z["Name"]))
        ]
        if not matching:
            raise NotFound(f"no public Route53 hosted zone holds {name}; create one or set ROUTE53_HOSTED_ZONE_ID")
        best = max(matching, key=lambda z: len(str(z["Name"])))
        return str(best["Id"]).removeprefix("/hostedzone/"), str(best["Name"])

    def upsert(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        if not records:
            raise InvalidRequest("no DNS records to upsert")
        zone_id, zone_name = self.zone_for(records[0].name)
        changes, done = [], []
        for record in records:
            fqdn = _fqdn(record.name)
            if fqdn != zone_name and not fqdn.endswith("." + zone_name):
                raise InvalidRequest(f"{record.name} is not in the hosted zone {zone_name}")
            if record.type == "CNAME" and fqdn == zone_name:
                raise InvalidRequest(
                    f"{record.name} is the zone apex, which cannot be a CNAME: give an IP address as --target, "
                    "or use a subdomain"
                )
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
