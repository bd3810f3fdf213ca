"""Route53: the deployment's DNS records (``cmbcluster infra dns``, and ``down`` removing them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import DnsRecord
from cmbcluster.provisioning.dns import Zone, best_zone, check_record, fqdn
from cmbcluster_aws.errors import aws_errors

__all__ = ["Route53Dns"]

#: Types a CNAME cannot live beside (RFC 1034: a CNAME is alone at its name), and that replace one.
_ADDRESS_TYPES = ("A", "AAAA")


def _route53_name(name: str) -> str:
    """A name as Route53 lists it (``*`` is answered as ``\\052``), normalised for comparing."""
    return fqdn(name.replace("\\052", "*"))


class Route53Dns:
    """Changes in one hosted zone: ``hosted_zone_id``, or the public zone whose name is the
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

    def _record_sets(self, zone_id: str, name: str) -> list[dict[str, Any]]:
        """Every record set at exactly ``name`` (any type)."""
        with aws_errors(f"Route53 records {name}"):
            listing = self.client.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=name, MaxItems="20")
        return [r for r in listing.get("ResourceRecordSets", []) if _route53_name(str(r["Name"])) == fqdn(name)]

    def upsert(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        """One atomic change: each record upserted, and what it cannot live beside (A records under a
        new CNAME, a CNAME under new A records) deleted in the same change."""
        if not records:
            raise InvalidRequest("no DNS records to upsert")
        zone_id, zone_name = self.zone_for(records[0].name)
        changes, done = [], []
        for record in records:
            name = check_record(record, zone_name, f"hosted zone {zone_name}")
            conflicting = _ADDRESS_TYPES if record.type == "CNAME" else ("CNAME",)
            for existing in self._record_sets(zone_id, name):
                if existing["Type"] in conflicting:
                    changes.append({"Action": "DELETE", "ResourceRecordSet": existing})
                    values = [v["Value"] for v in existing.get("ResourceRecords", [])] or ["(alias)"]
                    done.append(
                        f"DELETE {existing['Type']} {name} -> {', '.join(values)} (replaced by a {record.type})"
                    )
            changes.append(
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": name,
                        "Type": record.type,
                        "TTL": record.ttl,
                        "ResourceRecords": [{"Value": value} for value in record.values],
                    },
                }
            )
            done.append(f"UPSERT {record.type} {name} -> {', '.join(record.values)} (zone {zone_name} {zone_id})")
        if not dry_run:
            with aws_errors(f"Route53 zone {zone_name}"):
                self.client.change_resource_record_sets(
                    HostedZoneId=zone_id,
                    ChangeBatch={"Comment": "cmbcluster infra dns", "Changes": changes},
                )
        return done

    def delete(self, record: DnsRecord) -> bool:
        """Delete ``record`` if it still holds exactly its values; False if it is gone or changed since."""
        zone_id, zone_name = self.zone_for(record.name)
        name = check_record(record, zone_name, f"hosted zone {zone_name}")
        for existing in self._record_sets(zone_id, name):
            values = sorted(str(v["Value"]).rstrip(".") for v in existing.get("ResourceRecords", []))
            if existing["Type"] == record.type and values == sorted(v.rstrip(".") for v in record.values):
                with aws_errors(f"Route53 zone {zone_name}"):
                    self.client.change_resource_record_sets(
                        HostedZoneId=zone_id,
                        ChangeBatch={"Comment": "cmbcluster infra down",
                                     "Changes": [{"Action": "DELETE", "ResourceRecordSet": existing}]},
                    )  # fmt: skip
                return True
        return False
