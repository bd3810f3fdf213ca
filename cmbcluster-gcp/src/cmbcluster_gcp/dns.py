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


#: Types a CNAME cannot live beside (RFC 1034: a CNAME is alone at its name), and that replace one.
_ADDRESS_TYPES = ("A", "AAAA")


class CloudDns:
    """One change per upsert: additions, plus deletions of the record sets they replace, and of the
    ones they cannot live beside (A records under a new CNAME, a CNAME under new A records): Cloud DNS
    has no UPSERT action and refuses a CNAME beside other records; a change is atomic, so the names
    never disappear in between."""

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
            conflicting = (record.type, *(_ADDRESS_TYPES if record.type == "CNAME" else ("CNAME",)))
            existing = [r for r in self._record_sets(zone, name) if r["type"] in conflicting]
            current = [r for r in existing if r["type"] == record.type]
            others = [r for r in existing if r["type"] != record.type]
            if current == [wanted] and not others:
                done.append(f"unchanged {record.type} {name} -> {', '.join(values)} (zone {zone})")
                continue
            for other in others:
                done.append(f"DELETE {other['type']} {name} -> {', '.join(other.get('rrdatas', []))} "
                            f"(replaced by a {record.type})")  # fmt: skip
            deletions += existing
            additions.append(wanted)
            done.append(f"UPSERT {record.type} {name} -> {', '.join(values)} (zone {zone})")
        if additions and not dry_run:
            self.api.request(
                "POST", "dns", f"{self._zones_path()}/{zone}/changes", f"records in managed zone {zone}",
                body={"kind": "dns#change", "additions": additions, "deletions": deletions},
            )  # fmt: skip
        return done

    def _record_sets(self, zone: str, name: str) -> list[dict[str, Any]]:
        """Every record set at exactly ``name`` (any type), as the changes API wants them back."""
        existing = self.api.request(
            "GET", "dns", f"{self._zones_path()}/{zone}/rrsets", f"records {name}", params={"name": name}
        ).get("rrsets", [])
        return [{k: r[k] for k in ("kind", "name", "type", "ttl", "rrdatas") if k in r} for r in existing
                if r.get("name") == name]  # fmt: skip

    def delete(self, record: DnsRecord) -> bool:
        """Delete ``record`` if it still holds exactly its values; False if it is gone or changed since."""
        zone, dns_name = self.zone_for(record.name)
        name = check_record(record, dns_name, f"managed zone {zone} ({dns_name})")
        values = sorted(fqdn(v) if record.type == "CNAME" else v for v in record.values)
        for existing in self._record_sets(zone, name):
            if existing["type"] == record.type and sorted(existing.get("rrdatas", [])) == values:
                self.api.request(
                    "POST", "dns", f"{self._zones_path()}/{zone}/changes", f"records in managed zone {zone}",
                    body={"kind": "dns#change", "additions": [], "deletions": [existing]},
                )  # fmt: skip
                return True
        return False
