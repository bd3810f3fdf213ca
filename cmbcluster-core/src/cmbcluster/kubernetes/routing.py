"""How users reach their environments, and how environments are kept apart.

Two ways (``CMBCLUSTER_ROUTING``; ``proxy`` unless an environments domain asks for host routing,
which only ``ingress`` serves):

- ``proxy``: the control plane's own reverse proxy serves ``<public url>/environments/<id>/``
  and forwards to the pod's IP, after the same owner check as everywhere else
  (:mod:`cmbcluster.api.routes.environment_proxy`). An environment is then a Secret and a Pod,
  no object more: half the API calls of a start, and any ingress controller (or none) in front
  of the control plane. The default, because the proxy also drops the cookies an application
  sets for the control plane's own requests (its session's among them), which an ingress passes
  on to the browser.
- ``ingress``: each environment gets an **Ingress** (owned by its pod): host routing
  (``https://env-<id>.<environments domain>/``, one wildcard TLS secret for all of them, never a
  certificate per environment) or path routing under the control plane's own host
  (``<public url>/environments/<id>/``). Every request passes the ingress controller's
  ``auth-url`` check against the control plane's ``/api/v1/environments/authorize``: only the
  signed-in owner of a running environment gets through (the annotations are ingress-nginx's;
  other controllers take extra annotations from the settings). A browser not yet signed in to it
  goes to the control plane's ``enter`` (``auth-signin``); an environment on a host of its own
  gets a cookie of that host (:mod:`cmbcluster.services.environment_entry`), never the control
  plane's session cookie.
- The namespace has one **NetworkPolicy** over every user pod: traffic in only from the
  control plane (and, with ``ingress`` routing, the ingress controller's namespace); traffic out
  anywhere except the cloud metadata addresses (169.254.169.254; 169.254.169.252, where GKE
  Dataplane V2 serves the GKE metadata server on port 988; fd00:ec2::254 on AWS IPv6), so a user
  cannot borrow the node's cloud identity, and user pods cannot reach each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from cmbcluster.compute.command import environment_path
from cmbcluster.kubernetes.labels import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_VALUE, USER_ENVIRONMENT

NETWORK_POLICY_NAME = "cmbcluster-user-environments"
#: The cloud metadata endpoints user pods must not reach (the same list as the chart's
#: networkPolicy.blockedCidrs): the instance metadata service of every cloud, GKE Dataplane V2's
#: metadata server (169.254.169.252, port 988), and EC2's IPv6 endpoint.
METADATA_ADDRESSES = ("169.254.169.254/32", "169.254.169.252/32", "fd00:ec2::254/128")
SERVICE_PORT = 80
#: the control plane's pods, as the Helm chart labels them
CONTROL_PLANE_SELECTOR = {"app.kubernetes.io/name": "cmbcluster", "app.kubernetes.io/component": "control-plane"}
#: the namespace label Kubernetes sets on every namespace (1.21+; label it by hand on older clusters)
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True, kw_only=True)
class Exposure:
    """Where environments are served and who checks access.

    ``routing`` ``proxy``: through the control plane, at ``<public_url>/environments/<id>/``
    (an ``environments_domain`` then means nothing: the settings refuse the pair, see
    :class:`~cmbcluster.kubernetes.plugin.KubernetesSettings`).
    ``ingress``, with ``environments_domain`` set: host routing. Otherwise path routing under
    ``public_url``'s host (no host rule at all when that is unset too, for a cluster with one
    ingress). ``auth_url`` is the authorize endpoint as the ingress controller reaches it.
    """

    routing: Literal["ingress", "proxy"] = "proxy"
    ingress_class: str = "nginx"
    environments_domain: str | None = None
    public_url: str | None = None
    tls_secret: str | None = "cmbcluster-environments-tls"  # noqa: S105 - the name of a Secret, not a password
    auth_url: str = "http://cmbcluster.cmbcluster.svc.cluster.local/api/v1/environments/authorize"
    ingress_namespace: str = "ingress-nginx"
    extra_annotations: dict[str, str] = field(default_factory=dict)

    @property
    def proxied(self) -> bool:
        """Served by the control plane's proxy: no Service or Ingress per environment."""
        return self.routing == "proxy"

    @property
    def host_routing(self) -> bool:
        return bool(self.environments_domain)

    def host(self, name: str) -> str | None:
        if self.environments_domain:
            return f"{name}.{self.environments_domain.strip('.')}"
        return urlsplit(self.public_url).hostname if self.public_url else None

    def path(self, environment_id: str) -> str:
        return "/" if self.host_routing else environment_path(environment_id)

    def url(self, name: str, environment_id: str) -> str:
        """What the user opens."""
        host = self.host(name)
        scheme = "https" if (self.host_routing and self.tls_secret) else _scheme(self.public_url)
        if host is None:
            return self.path(environment_id)
        port = urlsplit(self.public_url).port if (self.public_url and not self.host_routing) else None
        return f"{scheme}://{host}{f':{port}' if port else ''}{self.path(environment_id)}"

    def ingress(self, name: str, environment_id: str, labels: dict[str, str]) -> dict[str, Any]:
        host = self.host(name)
        annotations = {
            "nginx.ingress.kubernetes.io/auth-url": f"{self.auth_url}?environment_id={environment_id}",
            # the check is a GET whatever the request's method (which it cannot refuse as a change from
            # another origin); nginx names the request's own in X-Original-Method
            "nginx.ingress.kubernetes.io/auth-method": "GET",
            # The request's Cookie and Authorization, as the check answers them: without the control
            # plane's session and tokens, which the environment's code must never see
            "nginx.ingress.kubernetes.io/auth-response-headers": "Cookie,Authorization",
            # the environment's own cookie, which the check answers to a ticket (host routing), reaches
            # the browser whatever the application answers (a 404 of its own, a 502 while it starts)
            "nginx.ingress.kubernetes.io/auth-always-set-cookie": "true",
            # notebooks keep websockets open for hours and upload large files
            "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
            "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
            "nginx.ingress.kubernetes.io/proxy-body-size": "0",
        }
        if self.public_url:
            # A browser without access goes to the control plane's enter, which signs it in to the
            # environment (on its own host: with a ticket, as the session cookie stays on the control
            # plane's); ingress-nginx adds next=<the address asked for>, escaped.
            enter = f"{self.public_url.rstrip('/')}/api/v1/environments/{environment_id}/enter"
            annotations["nginx.ingress.kubernetes.io/auth-signin"] = enter
            annotations["nginx.ingress.kubernetes.io/auth-signin-redirect-param"] = "next"
        annotations.update(self.extra_annotations)
        rule: dict[str, Any] = {
            "http": {
                "paths": [
                    {
                        "path": self.path(environment_id),
                        "pathType": "Prefix",
                        "backend": {"service": {"name": name, "port": {"number": SERVICE_PORT}}},
                    }
                ]
            }
        }
        if host:
            rule["host"] = host
        spec: dict[str, Any] = {"ingressClassName": self.ingress_class, "rules": [rule]}
        if self.tls_secret and host:
            tls_host = f"*.{self.environments_domain.strip('.')}" if self.environments_domain else host
            spec["tls"] = [{"hosts": [tls_host], "secretName": self.tls_secret}]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": name, "labels": dict(labels), "annotations": annotations},
            "spec": spec,
        }

    def network_policy(self) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": NETWORK_POLICY_NAME, "labels": {MANAGED_BY: MANAGED_BY_VALUE}},
            "spec": {
                "podSelector": {"matchLabels": {MANAGED_BY: MANAGED_BY_VALUE, COMPONENT_LABEL: USER_ENVIRONMENT}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": self._allowed_in()}],
                "egress": [
                    {
                        "to": [
                            {
                                "ipBlock": {
                                    "cidr": "0.0.0.0/0",
                                    "except": [a for a in METADATA_ADDRESSES if ":" not in a],
                                }
                            },
                            {"ipBlock": {"cidr": "::/0", "except": [a for a in METADATA_ADDRESSES if ":" in a]}},
                        ]
                    }
                ],
            },
        }

    def _allowed_in(self) -> list[dict[str, Any]]:
        """Who may open connections to user pods: the control plane, and the ingress controller
        when it routes to them."""
        control_plane = {"podSelector": {"matchLabels": dict(CONTROL_PLANE_SELECTOR)}}
        if self.proxied:
            return [control_plane]
        return [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: self.ingress_namespace}}}, control_plane]


def _scheme(url: str | None) -> str:
    return (urlsplit(url).scheme if url else "") or "https"
