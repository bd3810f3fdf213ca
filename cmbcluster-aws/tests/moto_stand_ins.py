"""AWS APIs that moto 5.2 does not implement (or not as we use them), added to moto's server in this
process (its ThreadedMotoServer runs here, so clients, the CLI in a subprocess included, reach them
over HTTP like the rest of moto):

- **EKS add-ons** (``CreateAddon``, ``DescribeAddon``, ``UpdateAddon``, ``DeleteAddon``, ``ListAddons``):
  kept per cluster, ``ACTIVE`` at once, 404/409 as EKS answers them. ``up`` makes the VPC CNI a
  managed add-on with its network policy agent.
- **The IAM policy simulator** (``SimulatePrincipalPolicy``): moto enforces no IAM permission at all,
  so every action is ``allowed``, except those a test puts in :data:`DENIED` (``implicitDeny``).
- **DataSync** as ``migrate run --managed-transfer`` from Cloud Storage calls it, whose executions
  really copy (:mod:`datasync_stand_in`).

Load it before the server handles its first EKS request: :func:`install` patches moto's URL table
and response classes (with ``monkeypatch``, so a test session can undo it).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import datasync_stand_in
import pytest
from moto.core.responses import ActionResult
from moto.eks import urls as eks_urls
from moto.eks.exceptions import ResourceInUseException, ResourceNotFoundException
from moto.eks.models import EKSBackend
from moto.eks.responses import EKSResponse
from moto.iam.responses import IamResponse

#: Actions the policy simulator answers ``implicitDeny`` for (a test's knob; empty: all allowed).
DENIED: set[str] = set()
VPC_CNI_VERSION = "v1.20.0-eksbuild.1"

_ADDON_PATHS = {
    "{0}/clusters/(?P<name>[^/]+)/addons$",
    "{0}/clusters/(?P<name>[^/]+)/addons/(?P<addonName>[^/]+)$",
    "{0}/clusters/(?P<name>[^/]+)/addons/(?P<addonName>[^/]+)/update$",
}


def _addons(backend: EKSBackend, cluster: str) -> dict[str, dict[str, Any]]:
    if cluster not in backend.clusters:
        raise ResourceNotFoundException(f"No cluster found for name: {cluster}.", clusterName=cluster)
    store: dict[str, dict[str, dict[str, Any]]] = backend.__dict__.setdefault("_cmbcluster_addons", {})
    return store.setdefault(cluster, {})


def _addon(self: EKSResponse, store: dict[str, dict[str, Any]], cluster: str, name: str) -> dict[str, Any]:
    if name not in store:
        raise ResourceNotFoundException(f"No addon: {name} found in cluster: {cluster}", clusterName=cluster,
                                        addonName=name)  # fmt: skip
    return store[name]


def create_addon(self: EKSResponse) -> ActionResult:
    cluster, name = self._get_param("name"), self._get_param("addonName")
    store = _addons(self.eks_backend, cluster)
    if name in store:
        raise ResourceInUseException(f"Addon already exists: {name}", clusterName=cluster, addonName=name)
    now = dt.datetime.now(dt.UTC)
    store[name] = {
        "addonName": name, "clusterName": cluster, "status": "ACTIVE",
        "addonVersion": self._get_param("addonVersion") or VPC_CNI_VERSION,
        "addonArn": f"arn:aws:eks:{self.region}:{self.current_account}:addon/{cluster}/{name}/cmbcluster",
        "configurationValues": self._get_param("configurationValues") or "", "tags": self._get_param("tags") or {},
        "createdAt": now, "modifiedAt": now, "health": {"issues": []},
    }  # fmt: skip
    return ActionResult({"addon": dict(store[name])})


def describe_addon(self: EKSResponse) -> ActionResult:
    cluster, name = self._get_param("name"), self._get_param("addonName")
    return ActionResult({"addon": dict(_addon(self, _addons(self.eks_backend, cluster), cluster, name))})


def update_addon(self: EKSResponse) -> ActionResult:
    cluster, name = self._get_param("name"), self._get_param("addonName")
    addon = _addon(self, _addons(self.eks_backend, cluster), cluster, name)
    values = self._get_param("configurationValues")
    if values is not None:
        addon["configurationValues"] = values
    addon["modifiedAt"] = dt.datetime.now(dt.UTC)
    update = {"id": f"update-{name}", "status": "Successful", "type": "AddonUpdate", "params": [], "errors": []}
    return ActionResult({"update": update})


def delete_addon(self: EKSResponse) -> ActionResult:
    cluster, name = self._get_param("name"), self._get_param("addonName")
    store = _addons(self.eks_backend, cluster)
    addon = _addon(self, store, cluster, name)
    del store[name]
    return ActionResult({"addon": {**addon, "status": "DELETING"}})


def list_addons(self: EKSResponse) -> ActionResult:
    return ActionResult({"addons": sorted(_addons(self.eks_backend, self._get_param("name")))})


def simulate_principal_policy(self: IamResponse) -> ActionResult:
    actions = self._get_param("ActionNames") or []
    results = [
        {"EvalActionName": action, "EvalResourceName": "*",
         "EvalDecision": "implicitDeny" if action in DENIED else "allowed"}
        for action in actions
    ]  # fmt: skip
    return ActionResult({"EvaluationResults": results, "IsTruncated": False})


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add the EKS add-on API and the IAM policy simulator to moto (in this process)."""
    for path in _ADDON_PATHS:
        monkeypatch.setitem(eks_urls.url_paths, path, eks_urls.response.dispatch)
    for function in (create_addon, describe_addon, update_addon, delete_addon, list_addons):
        monkeypatch.setattr(EKSResponse, function.__name__, function, raising=False)
    monkeypatch.setattr(IamResponse, "simulate_principal_policy", simulate_principal_policy, raising=False)
    DENIED.clear()
    datasync_stand_in.install(monkeypatch)
