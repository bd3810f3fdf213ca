"""Cloud DNS: upsert the deployment's records (``cmbcluster infra dns``) through the dns v1 changes API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import DnsRecord
from cmbcluster.provisioning.dns import Zone, best_zone, check_record, fqdn

if TYPE_CHECKING:
    from cmbcluster_gcp.rest import GoogleApi

__all__ = ["CloudDns"]


class CloudDns:
    """One change per upsert: additions, plus deletions of the record sets they replace (Cloud DNS has
    no UPSERT action; a change is atomic, so the names never disappear in between)."""

    def __init__(self, api: GoogleApi, *, project: str, zone: str | None = None) -> None:
        self.api = api
        self.project = project
        self.zone = zone

    def _zones_path(self) -> str:
        return f"dns/v1/projects/{self.project}/managedZones"

    def zone_for(self, name: str) -> tuple[str, str]:
        """(managed zone name, its DNS name) for a record name: CLOUD_DNS_ZONE, or the public zone whose
        DNS name is the longest suffix of ``name`` (:func:`cmbcluster.provisioning.dns.best_zone`)."""
        if self.zone:
            zone = self.api.request("GET", "dns", f"{self._zones_path()}/{self.zone}", f"managed zone {self.zone}")
            return self.zone, str(zone["dnsName"])
        zones: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"pageToken": token} if token else None
            page = self.api.request("GET", "dns", self._zones_path(), "managed zones", params=params)
            zones += page.get("managedZones", [])
            token = str(page.get("nextPageToken") or "")
            if not token:
                break
        best = best_zone(
            name,
            [Zone(id=str(z["name"]), name=str(z["dnsName"]), public=z.get("visibility", "public") == "public")
             for z in zones],
            kind="Cloud DNS managed zone", setting="CLOUD_DNS_ZONE",
        )  # fmt: skip
        return best.id, best.name

    def upsert(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        if not records:
            raise InvalidRequest("no DNS records to upsert")
        zone, dns_name = self.zone_for(records[0].name)
        additions, deletions, done = [], [], []
        for record in records:
            name = check_record(record, dns_name, f"managed zone {zone} ({dns_name})")
            values = [fqdn(v) if record.type == "CNAME" else v for v in record.values]
            wanted = {"kind": "dns#resourceRecordSet", "name": name, "type": record.type, "ttl": record.ttl,
                      "rrdatas": values}  # fmt: skip
            existing = self.api.request(
                "GET", "dns", f"{self._zones_path()}/{zone}/rrsets", f"records {name}",
                params={"name": name, "type": record.type},
            ).get("rrsets", [])  # fmt: skip
            current = [{k: r[k] for k in ("kind", "name", "type", "ttl", "rrdatas") if k in r} for r in existing]
            if current == [wanted]:
                done.append(f"unchanged {record.type} {name} -> {', '.join(values)} (zone {zone})")
                continue
            deletions += current
            additions.append(wanted)
            done.append(f"UPSERT {record.type} {name} -> {', '.join(values)} (zone {zone})")
        if additions and not dry_run:
            self.api.request(
                "POST", "dns", f"{self._zones_path()}/{zone}/changes", f"records in managed zone {zone}",
                body={"kind": "dns#change", "additions": additions, "deletions": deletions},
            )  # fmt: skip
        return done
