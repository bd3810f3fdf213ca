"""DNS records in the deployment's zone (``cmbcluster infra dns``): what every cloud's DNS does alike.

Choosing the zone (the one configured, or the public zone whose name is the longest suffix of the
records' names) and checking each record against it are the same on Route53 and Cloud DNS; only
the calls that list zones and change records are each cloud's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cmbcluster.errors import InvalidRequest, NotFound
from cmbcluster.interfaces.provisioning import DnsRecord

__all__ = ["Zone", "best_zone", "check_record", "deployment_domains", "fqdn"]


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


def deployment_domains(
    public_url: str | None, environments_domain: str | None, *, domain: str | None = None
) -> list[str]:
    """The names ``infra up`` certifies and points DNS at: ``domain`` (a cloud's own setting), else the
    public URL's host, and the environments' domain; IP addresses and localhost are no domain to
    certify or to find a zone for, so they are left out."""
    names = [domain or (urlsplit(public_url).hostname if public_url else None), environments_domain]
    return [name for name in names if name and not _is_address(name)]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True
