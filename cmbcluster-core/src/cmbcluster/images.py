"""The deployment's container images: their names, Dockerfiles and references, in one place.

``cmbcluster images build|push`` tags and pushes them, ``cmbcluster deploy`` points the chart at
the control-plane image, and the catalog's JupyterLab runs the environment image: all three take
the reference from :func:`image_ref`, so what is pushed is what is pulled.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmbcluster import __version__
from cmbcluster.interfaces import RegistryInfo

#: Where images come from when the deployment has no registry of its own (the project's releases).
DEFAULT_REGISTRY = RegistryInfo(host="ghcr.io", repository_prefix="cmbcluster")


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """One image: its Dockerfile and build context, relative to the repository root."""

    name: str
    dockerfile: str
    context: str


CONTROL_PLANE = "controlplane"
ENVIRONMENT = "environment"
IMAGES = {
    CONTROL_PLANE: ImageSpec(name=CONTROL_PLANE, dockerfile="helm/images/controlplane/Dockerfile", context="."),
    ENVIRONMENT: ImageSpec(
        name=ENVIRONMENT, dockerfile="helm/images/environment/Dockerfile", context="helm/images/environment"
    ),
}
#: The images every deployment builds and pushes; the provisioners create one registry repository for each.
IMAGE_NAMES = tuple(IMAGES)


def repository(registry: RegistryInfo) -> str:
    """``host/prefix``: where the deployment's images live (the chart's ``image.registry``)."""
    prefix = registry.repository_prefix.strip("/")
    return f"{registry.host}/{prefix}" if prefix else registry.host


def image_ref(registry: RegistryInfo, name: str, tag: str = __version__) -> str:
    """The full reference of image ``name`` in ``registry``: ``host/prefix/name:tag``."""
    return f"{repository(registry)}/{name}:{tag}"
