"""DNS records in the deployment's zone (``cmbcluster infra dns``): what every cloud's DNS does alike.

Choosing the zone (the one configured, or the public zone whose name is the longest suffix of the
records' names) and checking each record against it are the same on Route53 and Cloud DNS; only
the calls that list zones and change records are each cloud's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cmbcluster.errors import InvalidRequest, NotFound
from cmbcluster.interfaces.provisioning import DnsRecord

__all__ = ["Zone", "best_zone", "check_record", "fqdn"]


def fqdn(name: str) -> str:
    """``name`` fully qualified, as DNS services spell it: lower case, one trailing dot."""
    return name.rstrip(".").lower() + "."


@dataclass(frozen=True, kw_only=True)
class Zone:
    """A DNS zone: the service's ``id`` for it and its ``name`` (fully qualified)."""

    id: str
    name: str
    public: bool = True


def best_zone(record_name: str, zones: Iterable[Zone], *, kind: str, setting: str) -> Zone:
    """The public zone whose name is the longest suffix of ``record_name`` (``*.`` of a wildcard
    ignored); NotFound naming the ``kind`` of zone and the ``setting`` that picks one otherwise."""
    wanted = fqdn(record_name.removeprefix("*."))
    matching = [z for z in zones if z.public and (wanted == fqdn(z.name) or wanted.endswith("." + fqdn(z.name)))]
    if not matching:
        raise NotFound(f"no public {kind} holds {record_name}; create one or set {setting}")
    return max(matching, key=lambda z: len(fqdn(z.name)))


def check_record(record: DnsRecord, zone_name: str, zone_label: str) -> str:
    """The record's fully qualified name, once it is known to belong in the zone ``zone_name``
    (``zone_label`` names it in errors) and not to be a CNAME at the zone's apex."""
    name, apex = fqdn(record.name), fqdn(zone_name)
    if name != apex and not name.endswith("." + apex):
        raise InvalidRequest(f"{record.name} is not in the {zone_label}")
    if record.type == "CNAME" and name == apex:
        raise InvalidRequest(
            f"{record.name} is the zone apex, which cannot be a CNAME: give an IP address as --target, "
            "or use a subdomain"
        )
    return name
