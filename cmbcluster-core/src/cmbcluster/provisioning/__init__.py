"""Core's side of ``cmbcluster infra``: the engine that drives any
:class:`~cmbcluster.interfaces.Provisioner`, the record of a deployment, and the helpers every
cloud's provisioner shares (helm add-ons, the kubeconfig of a new cluster, the data buckets
``down`` keeps unless told, the zone of DNS records). The contract itself is :mod:`cmbcluster.interfaces.provisioning`.
"""

from cmbcluster.provisioning.data import data_written_during_down, refuse_to_delete_data
from cmbcluster.provisioning.dns import Zone, best_zone, check_record, deployment_domains, fqdn
from cmbcluster.provisioning.engine import StepRun, check_tools, dns, down, retained, status, up
from cmbcluster.provisioning.helm import (
    CERT_MANAGER,
    CLUSTER_CONFIG_CHART,
    CLUSTER_ISSUER,
    INGRESS_NGINX,
    RELEASE_KIND,
    cluster_config_release,
    install_argv,
    install_release,
    release_step,
    uninstall_argv,
    uninstall_release,
)
from cmbcluster.provisioning.kubeconfig import addon_kubeconfig, kubeconfig_document, kubeconfig_path, write_kubeconfig
from cmbcluster.provisioning.record import ProvisioningRecord
from cmbcluster.provisioning.runner import run_tool

__all__ = [
    "CERT_MANAGER",
    "CLUSTER_CONFIG_CHART",
    "CLUSTER_ISSUER",
    "INGRESS_NGINX",
    "RELEASE_KIND",
    "ProvisioningRecord",
    "StepRun",
    "Zone",
    "addon_kubeconfig",
    "best_zone",
    "check_record",
    "check_tools",
    "cluster_config_release",
    "data_written_during_down",
    "deployment_domains",
    "dns",
    "down",
    "fqdn",
    "install_argv",
    "install_release",
    "kubeconfig_document",
    "kubeconfig_path",
    "refuse_to_delete_data",
    "release_step",
    "retained",
    "run_tool",
    "status",
    "uninstall_argv",
    "uninstall_release",
    "up",
    "write_kubeconfig",
]
