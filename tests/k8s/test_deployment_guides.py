"""The deployment guides, walked: docs/DEPLOYMENT_AWS.md against moto, docs/DEPLOYMENT_GCP.md against the GCP
plugin's fake of Google's REST APIs (GOOGLE_API_ENDPOINT), the GCS emulator and the OIDC mock standing in for
Google's sign-in, both on the project's Kubernetes test cluster, every marked block in its order
(tests/k8s/guide_walk.py), so the guides cannot drift from the product.

The walk goes: settings, `config check`, `infra up`, `images push --dry-run`, `deploy`, `infra dns`, then a
user signs in, makes a bucket and starts an environment on the deployed control plane, a backup, the in-cluster
restore of operators/backup.md, and `infra down` (then `--delete-retained`). What the stand-ins cannot do is
declared per command (StandIn): no Docker engine (images: --dry-run), no network (git clone: this checkout), no
chart repositories (helm: remote charts recorded, CMBCluster's own chart installed for real), no EKS endpoint
(the test cluster's kubeconfig through CMBCLUSTER_INFRA_KUBECONFIG), no pod runs the control plane's image (the
control plane runs here as a process with exactly the environment, Secrets and ServiceAccount token the chart
gave its pod: `kubectl exec deploy/cmbcluster` and the restore Job's command run there), no CSI driver (a claim
placed on the node gets a volume, and the cloud's disk is recorded as the driver would make it); on GCP besides,
no `gcloud` (a stand-in on PATH answers the commands the guide runs, from the fake), and what a GKE cluster has
from the start (its default StorageClass, nodes running the GKE metadata server) is made on the test cluster.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

pytest.importorskip("kubernetes")
pytest.importorskip("cmbcluster_aws")
pytest.importorskip("cmbcluster_gcp")

import boto3
from kubernetes import client as k8s
from moto.core.base_backend import BackendDict
from moto.server import ThreadedMotoServer

from cmbcluster.testing.oidc import OidcMockServer
from cmbcluster.testing.process import ServeProcess, clean_environ
from tests.k8s.guide_walk import (
    LB_HOSTNAME,
    GuideWalk,
    StandIn,
    VolumeProvisioner,
    base_path,
    completed,
    control_plane_environment,
    helm_calls,
    install_application_stand_in,
    install_helm_stand_in,
    service_account_kubeconfig,
    walk_blocks,
)
from tests.k8s.harness import GcsEmulator, K8sCluster, wait_for

ROOT = Path(__file__).resolve().parents[2]
GUIDES = {"aws": ROOT / "docs" / "DEPLOYMENT_AWS.md", "gcp": ROOT / "docs" / "DEPLOYMENT_GCP.md"}
STEPS = ["settings", "configure", "infra-up", "images", "deploy", "dns", "backup", "restore", "down"]
IMAGES_CONFIGMAP = ("kube-system", "fake-kubelet-images")
TERMINAL = ("running", "failed", "stopped")


def _load(path: Path) -> ModuleType:
    """A test helper of a plugin's own tests (their folders are not packages)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


_load(ROOT / "cmbcluster-aws" / "tests" / "datasync_stand_in.py")  # moto_stand_ins imports it by name
moto_stand_ins = _load(ROOT / "cmbcluster-aws" / "tests" / "moto_stand_ins.py")
google_api_fake = _load(ROOT / "cmbcluster-gcp" / "tests" / "google_api_fake.py")


@pytest.mark.parametrize("cloud", sorted(GUIDES))
def test_each_guide_marks_the_steps_of_a_deployment_in_order(cloud: str) -> None:
    assert [b.step for b in walk_blocks(GUIDES[cloud])] == STEPS


# -- shared by both walks ----------------------------------------------------------------------------


@dataclasses.dataclass
class Deployment:
    """One walk's state: the guide being walked, the cluster, the control plane once deployed."""

    walk: GuideWalk
    cluster: K8sCluster
    admin: k8s.ApiClient
    tmp: Path
    values: dict[str, str]  # the operator's own values, as the settings block names them
    stand_in_env: dict[str, str]  # what only the stand-ins need (endpoints, credentials): not the guide's
    server: ServeProcess | None = None
    token: str = ""
    bucket: str = ""
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    pushed: list[str] = dataclasses.field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.values["NAMESPACE"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # the control plane, as the chart's pod runs it: its environment, Secrets and ServiceAccount token
    def control_plane_env(self) -> dict[str, str]:
        env = clean_environ(control_plane_environment(self.admin, self.namespace))
        kubeconfig = service_account_kubeconfig(
            self.admin, self.namespace, "cmbcluster-controlplane", self.cluster.server, self.cluster.ca_path,
            self.tmp / "controlplane.kubeconfig",
        )  # fmt: skip
        env.update(self.stand_in_env)
        env.update({
            "CMBCLUSTER_HOST": "127.0.0.1", "CMBCLUSTER_DATA_DIR": str(self.tmp / "controlplane-data"),
            "CMBCLUSTER_K8S_IN_CLUSTER": "false", "CMBCLUSTER_KUBECONFIG": str(kubeconfig),
            "CMBCLUSTER_LOG_FORMAT": "text", "HOME": str(self.tmp / "controlplane-home"),  # not the operator's
        })  # fmt: skip
        return env

    def start(self) -> None:
        (self.tmp / "controlplane").mkdir(exist_ok=True)
        self.server = ServeProcess(self.control_plane_env(), self.tmp / "controlplane")
        answer = self.server.wait_ready("/readyz", timeout=60)
        assert answer.status_code == 200, (answer.text, self.server.output()[-3000:])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def exec_in_control_plane(self, command: str) -> subprocess.CompletedProcess[str]:
        """`kubectl exec deploy/cmbcluster -- <command>`: the command in the control plane's environment."""
        argv = shlex.split(command)
        assert argv[0] == "cmbcluster", argv
        return subprocess.run([sys.executable, "-m", "cmbcluster.cli", *argv[1:]], env=self.control_plane_env(),
                              cwd=self.tmp / "controlplane", capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip

    def api(self) -> httpx.Client:
        assert self.server is not None, "the control plane is not running"
        return httpx.Client(base_url=self.server.url, timeout=60, headers=self.headers())


def settings_stand_in(deployment: Deployment) -> Callable[[re.Match[str], GuideWalk], subprocess.CompletedProcess[str]]:
    def run(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        names = [item.split("=", 1)[0] for item in shlex.split(match.group(1))]
        unknown = [n for n in names if n not in deployment.values]
        assert not unknown, f"the guide's settings name {unknown}, which this walk does not give a value"
        walk.env.update({n: deployment.values[n] for n in names})
        return completed()

    return run


def common_stand_ins(deployment: Deployment) -> list[StandIn]:
    def clone(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        (walk.workdir / match.group(1)).symlink_to(ROOT)
        return completed()

    def images(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        return walk.run_command(f"cmbcluster images {match.group(1)} --dry-run", stand_ins=False)

    def exec_(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        return deployment.exec_in_control_plane(match.group(1))

    def scale(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        if match.group(1) == "0":
            deployment.stop()  # a clean stop: the control plane backs up what changed, as its pod does
        else:
            deployment.start()
        return completed()

    jobs: dict[str, subprocess.CompletedProcess[str]] = {}

    def apply_job(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        # the Job operators/backup.md shows: what it names must be what the chart made; its command then
        # runs in the control plane's environment, on its volume (the process stands in for the pod)
        job = restore_job()
        spec = job["spec"]["template"]["spec"]
        core = k8s.CoreV1Api(deployment.admin)
        core.read_namespaced_service_account(spec["serviceAccountName"], deployment.namespace)
        (container,) = spec["containers"]
        for source in container["envFrom"]:
            core.read_namespaced_secret(source["secretRef"]["name"], deployment.namespace)
        (volume,) = spec["volumes"]
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert core.read_namespaced_persistent_volume_claim(claim, deployment.namespace).status.phase == "Bound"
        assert container["volumeMounts"][0]["name"] == volume["name"]
        jobs[job["metadata"]["name"]] = deployment.exec_in_control_plane(shlex.join(["cmbcluster", *container["args"]]))
        return completed(f"job.batch/{job['metadata']['name']} created\n")

    def wait_job(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        result = jobs[match.group(1)]
        met = f"job.batch/{match.group(1)} condition met\n" if result.returncode == 0 else ""
        return completed(met, result.returncode, result.stderr)

    def job_logs(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        return completed(jobs[match.group(1)].stdout + jobs[match.group(1)].stderr)

    def deploy(match: re.Match[str], walk: GuideWalk) -> subprocess.CompletedProcess[str]:
        # an operator's shell has no test endpoints: deploy runs without the stand-ins' variables (but the
        # helm stand-in's own)
        env = {k: v for k, v in walk.env.items() if k not in deployment.stand_in_env or k.startswith("WALK_")}
        return subprocess.run(["bash", "-c", match.group(0)], env=env, cwd=walk.workdir, capture_output=True,
                              text=True, timeout=900, check=False)  # fmt: skip

    return [
        StandIn(r"export ([^()]*)", "the operator's own values are the test's", settings_stand_in(deployment)),
        StandIn(r"git clone \S+ (\S+)", "no network here: the clone is this checkout", clone),
        StandIn(r"cmbcluster images (build(?: .*)?|push)", "no Docker engine here: the exact commands", images),
        StandIn(r"kubectl -n \S+ exec deploy/cmbcluster -- (.*)", "the control plane runs here", exec_),
        StandIn(r"kubectl -n \S+ scale deploy/cmbcluster --replicas=(\d)", "the control plane runs here", scale),
        StandIn(r"cmbcluster deploy.*", "the operator's shell, without test endpoints", deploy),
        StandIn(r"kubectl -n \S+ apply -f restore-job\.yaml", "no pod runs the control plane's image", apply_job),
        StandIn(r"kubectl -n \S+ wait --for=condition=complete job/(\S+) .*", "the Job ran here", wait_job),
        StandIn(r"kubectl -n \S+ logs job/(\S+)", "the Job ran here", job_logs),
    ]


def restore_job() -> dict[str, Any]:
    """operators/backup.md's restore-job.yaml, as an operator copies it."""
    text = (ROOT / "docs" / "operators" / "backup.md").read_text()
    (block,) = re.findall(r"```yaml\n# restore-job\.yaml\n(.*?)```", text, re.S)
    job: dict[str, Any] = yaml.safe_load(block)
    return job


def set_image_mapping(admin: k8s.ApiClient, folder: Path | None) -> None:
    """The test kubelet runs every new pod's image with ``folder`` first on PATH (None: no pod runs)."""
    core = k8s.CoreV1Api(admin)
    if folder is None:
        try:
            core.delete_namespaced_config_map(IMAGES_CONFIGMAP[1], IMAGES_CONFIGMAP[0])
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
        return
    body = {"metadata": {"name": IMAGES_CONFIGMAP[1]}, "data": {"images.json": json.dumps({"": str(folder)})}}
    try:
        core.create_namespaced_config_map(IMAGES_CONFIGMAP[0], body)
    except k8s.ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_config_map(IMAGES_CONFIGMAP[1], IMAGES_CONFIGMAP[0], body)


def cleanup_cluster(admin: k8s.ApiClient, namespace: str, storage_classes: tuple[str, ...]) -> None:
    core, storage = k8s.CoreV1Api(admin), k8s.StorageV1Api(admin)
    set_image_mapping(admin, None)
    for name, delete in ((namespace, core.delete_namespace), ("ingress-nginx", core.delete_namespace),
                         ("cert-manager", core.delete_namespace)):  # fmt: skip
        try:
            delete(name)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
    for name in storage_classes:
        try:
            storage.delete_storage_class(name)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
    for volume in core.list_persistent_volume().items:
        if volume.metadata.name.startswith("pvc-") and (volume.spec.claim_ref and volume.spec.claim_ref.namespace
                                                          == namespace):  # fmt: skip
            core.delete_persistent_volume(volume.metadata.name)
    try:
        k8s.ApiextensionsV1Api(admin).delete_custom_resource_definition("clusterissuers.cert-manager.io")
    except k8s.ApiException as exc:
        if exc.status != 404:
            raise


def settled(deployment: Deployment, environment_id: str) -> dict[str, Any]:
    with deployment.api() as api:

        def status() -> dict[str, Any] | None:
            env: dict[str, Any] = api.get(f"/api/v1/environments/{environment_id}").json()
            return env if env["status"] in TERMINAL else None

        result: dict[str, Any] = wait_for(status, 90, f"environment {environment_id} to settle")
        return result


def use_it(deployment: Deployment, sign_in: Callable[[httpx.Client], str]) -> None:
    """Step 6 of the guides: sign in, make a bucket, start JupyterLab with it mounted."""
    set_image_mapping(deployment.admin, install_application_stand_in(deployment.tmp / "application-bin"))
    deployment.start()
    assert deployment.server is not None
    with httpx.Client(base_url=deployment.server.url, timeout=60) as anonymous:
        deployment.token = sign_in(anonymous)
    with deployment.api() as api:
        me = api.get("/api/v1/auth/me").json()
        assert me["role"] == "admin", me  # CMBCLUSTER_ADMIN_EMAILS of the guide's .env
        bucket = api.post("/api/v1/storages", json={"display_name": "Planck maps"})
        assert bucket.status_code == 201, bucket.text
        deployment.bucket = bucket.json()["bucket_name"]
        mount = {"storage_id": bucket.json()["id"], "mount_path": "/home/jovyan/maps"}
        created = api.post("/api/v1/environments", json={"application": "jupyterlab", "mounts": [mount]})
        assert created.status_code == 201, created.text
    deployment.environment = settled(deployment, str(created.json()["id"]))


def reachable(deployment: Deployment) -> None:
    """The environment runs its application and answers on its port (what the ingress forwards to)."""
    assert deployment.environment.get("status") == "running", deployment.environment
    pod = k8s.CoreV1Api(deployment.admin).read_namespaced_pod(f"env-{deployment.environment['id']}",
                                                              deployment.namespace)  # fmt: skip
    port = pod.spec.containers[0].ports[0].container_port
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "the environment answers"


# -- AWS: docs/DEPLOYMENT_AWS.md against moto ------------------------------------------------------------
AWS_REGION, AWS_ACCOUNT = "eu-west-1", "123456789012"
AWS_CLUSTER = "cmbwalk-eks"
PASSWORD = "Sup3r-secret-passw0rd!"


@pytest.fixture(scope="module")
def aws_deployment(k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("aws-walk")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # moto knows AWS managed policies only with this
        # moto's backends live in this process: an earlier module's server may have made the account's IAM
        # backend before managed policies were asked for, so start from empty ones
        BackendDict.reset()
        moto_stand_ins.install(mp)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        moto = f"http://{host}:{port}"
        credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        cognito = boto3.client("cognito-idp", region_name=AWS_REGION, endpoint_url=moto, **credentials)
        pool = cognito.create_user_pool(PoolName="cmbwalk")["UserPool"]["Id"]
        app = cognito.create_user_pool_client(
            UserPoolId=pool, ClientName="cmbwalk", GenerateSecret=True,
            ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH"], ReadAttributes=["email", "email_verified"],
        )["UserPoolClient"]  # fmt: skip
        boto3.client("route53", region_name=AWS_REGION, endpoint_url=moto, **credentials).create_hosted_zone(
            Name="example.org", CallerReference="walk"
        )  # the operator's zone
        values = {
            "AWS_REGION": AWS_REGION, "AWS_ACCOUNT_ID": AWS_ACCOUNT, "EKS_CLUSTER_NAME": AWS_CLUSTER,
            "NAMESPACE": f"walk-aws-{secrets.token_hex(3)}", "COGNITO_USER_POOL_ID": pool,
            "COGNITO_CLIENT_ID": app["ClientId"], "COGNITO_CLIENT_SECRET": app["ClientSecret"],
            "COGNITO_DOMAIN": "cmbwalk.auth.eu-west-1.amazoncognito.com",
        }  # fmt: skip
        bin_dir, state = tmp / "bin", tmp / "state"
        state.mkdir()
        stand_in_env = {
            "AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"),
            "COGNITO_JWKS_URL": f"{moto}/{pool}/.well-known/jwks.json",  # moto's; the issuer stays AWS's
            "CMBCLUSTER_INFRA_KUBECONFIG": str(k8s_cluster.kubeconfig),  # EKS's endpoint: the test cluster
            **install_helm_stand_in(bin_dir, k8s_cluster.bin_dir / "helm", state), "WALK_LB": LB_HOSTNAME,
        }  # fmt: skip
        workdir = tmp / "operator"
        workdir.mkdir()
        env = clean_environ({**stand_in_env, "PATH": f"{bin_dir}{os.pathsep}{base_path()}",
                             "HOME": str(tmp / "home"), "CMBCLUSTER_DATA_DIR": str(tmp / "operator-data")})  # fmt: skip
        admin = k8s_cluster.api_client()
        set_image_mapping(admin, None)  # no pod runs until step 6 says what: an earlier walk may have said
        walk = GuideWalk(GUIDES["aws"], workdir, env)
        deployment = Deployment(walk, k8s_cluster, admin, tmp, values, stand_in_env)
        walk.stand_ins = common_stand_ins(deployment)
        ec2 = boto3.client("ec2", region_name=AWS_REGION, endpoint_url=moto, **credentials)

        def ebs_volume(claim: Any, name: str) -> None:  # what EBS CSI makes with the gp3 class's parameters
            ec2.create_volume(Size=1, AvailabilityZone=f"{AWS_REGION}a", TagSpecifications=[{
                "ResourceType": "volume", "Tags": [{"Key": "cmbcluster:deployment", "Value": AWS_CLUSTER},
                                                   {"Key": "kubernetes.io/created-for/pvc/name",
                                                    "Value": claim.metadata.name}]}])  # fmt: skip

        try:
            with VolumeProvisioner(admin, "gp3", ebs_volume):
                yield deployment
        finally:
            deployment.stop()
            cleanup_cluster(admin, values["NAMESPACE"], ("gp3",))
            admin.close()
            server.stop()


def aws(deployment: Deployment, service: str) -> Any:
    return boto3.client(service, region_name=AWS_REGION, endpoint_url=deployment.stand_in_env["AWS_ENDPOINT_URL"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


def test_aws_1_configure_and_check(aws_deployment: Deployment) -> None:
    walk = aws_deployment.walk
    walk.run("settings")
    assert walk.env["EKS_CLUSTER_NAME"] == AWS_CLUSTER
    _written, check = walk.run("configure")
    assert f"EKS_CLUSTER_NAME={AWS_CLUSTER}" in (walk.workdir / ".env").read_text().splitlines()
    assert "configuration OK" in check.stdout and "Traceback" not in check.stderr


def test_aws_2_infra_up_builds_what_the_chart_needs(aws_deployment: Deployment) -> None:
    walk = aws_deployment.walk
    plan, up, _kubeconfig = walk.run("infra-up", timeout=900)
    assert f"eks/cluster {AWS_CLUSTER}" in plan.stdout and "up: done" in up.stdout
    assert walk.env["KUBECONFIG"] == str(aws_deployment.cluster.kubeconfig)  # what `infra kubeconfig` printed
    # the cloud: isolation enforced, roles bounded
    eks, iam = aws(aws_deployment, "eks"), aws(aws_deployment, "iam")
    addon = eks.describe_addon(clusterName=AWS_CLUSTER, addonName="vpc-cni")["addon"]
    assert json.loads(addon["configurationValues"]) == {"enableNetworkPolicy": "true"}
    role = iam.get_role(RoleName=f"{AWS_CLUSTER}-controlplane")["Role"]
    assert role["Path"] == f"/cmbcluster-infra/{AWS_CLUSTER}/"
    assert iam.get_policy(PolicyArn=f"arn:aws:iam::{AWS_ACCOUNT}:policy/cmbcluster-infra/{AWS_CLUSTER}/"
                                    f"{AWS_CLUSTER}-user-boundary")  # fmt: skip
    # the cluster: CMBCluster's own chart installed for real (the default StorageClass, the ClusterIssuer)
    storage_class = k8s.StorageV1Api(aws_deployment.admin).read_storage_class("gp3")
    assert storage_class.provisioner == "ebs.csi.aws.com"
    assert storage_class.metadata.annotations["storageclass.kubernetes.io/is-default-class"] == "true"
    issuer = k8s.CustomObjectsApi(aws_deployment.admin).get_cluster_custom_object(
        "cert-manager.io", "v1", "clusterissuers", "letsencrypt")  # fmt: skip
    zone = aws(aws_deployment, "route53").list_hosted_zones()["HostedZones"][0]["Id"].removeprefix("/hostedzone/")
    assert issuer["spec"]["acme"]["solvers"][0]["dns01"] == {"route53": {"region": AWS_REGION, "hostedZoneID": zone}}
    installed = [c[2] for c in helm_calls(walk.env) if c[:2] == ["upgrade", "--install"]]
    assert installed == ["aws-load-balancer-controller", "aws-ebs-csi-driver", "aws-mountpoint-s3-csi-driver",
                         "cert-manager", "ingress-nginx", "cmbcluster-cluster-config"]  # fmt: skip


def test_aws_3_images_are_pushed_to_the_deployments_repositories(aws_deployment: Deployment) -> None:
    results = aws_deployment.walk.run("images")
    pushed = [line.split()[-1] for line in results[0].stdout.splitlines() if "docker push" in line]
    registry = f"{AWS_ACCOUNT}.dkr.ecr.{AWS_REGION}.amazonaws.com/{AWS_CLUSTER}"
    assert pushed and all(p.startswith(f"{registry}/") for p in pushed), pushed
    repositories = {r["repositoryName"] for r in aws(aws_deployment, "ecr").describe_repositories()["repositories"]}
    assert {p.removeprefix(f"{AWS_ACCOUNT}.dkr.ecr.{AWS_REGION}.amazonaws.com/").split(":")[0] for p in pushed} <= (
        repositories
    )
    aws_deployment.pushed = pushed


def test_aws_4_deploy_binds_the_claim_and_names_the_role_infra_up_made(aws_deployment: Deployment) -> None:
    _dry_run, deploy = aws_deployment.walk.run("deploy", timeout=900)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    core = k8s.CoreV1Api(aws_deployment.admin)
    claim = core.read_namespaced_persistent_volume_claim("cmbcluster-data", aws_deployment.namespace)
    assert claim.status.phase == "Bound" and claim.spec.storage_class_name == "gp3"  # the default infra up made
    account = core.read_namespaced_service_account("cmbcluster-controlplane", aws_deployment.namespace)
    role = aws(aws_deployment, "iam").get_role(RoleName=f"{AWS_CLUSTER}-controlplane")["Role"]
    assert account.metadata.annotations["eks.amazonaws.com/role-arn"] == role["Arn"]


def test_aws_4b_the_control_plane_runs_the_image_pushed(aws_deployment: Deployment) -> None:
    deployment = k8s.AppsV1Api(aws_deployment.admin).read_namespaced_deployment("cmbcluster", aws_deployment.namespace)
    assert deployment.spec.template.spec.containers[0].image in aws_deployment.pushed


def test_aws_5_dns_points_both_names_at_the_load_balancer(aws_deployment: Deployment) -> None:
    aws_deployment.walk.run("dns")
    route53 = aws(aws_deployment, "route53")
    zone = route53.list_hosted_zones()["HostedZones"][0]["Id"]
    records = {(r["Name"].replace("\\052", "*"), r["Type"]): [v["Value"] for v in r.get("ResourceRecords", [])]
               for r in route53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]}  # fmt: skip
    assert records[("cmb.example.org.", "CNAME")] == [LB_HOSTNAME]
    assert records[("*.envs.example.org.", "CNAME")] == [LB_HOSTNAME]


def cognito_sign_in(deployment: Deployment) -> Callable[[httpx.Client], str]:
    def sign_in(anonymous: httpx.Client) -> str:
        cognito = aws(deployment, "cognito-idp")
        pool, client_id = deployment.values["COGNITO_USER_POOL_ID"], deployment.values["COGNITO_CLIENT_ID"]
        cognito.admin_create_user(UserPoolId=pool, Username="pi", MessageAction="SUPPRESS", UserAttributes=[
            {"Name": "email", "Value": "pi@example.org"}, {"Name": "email_verified", "Value": "true"}])  # fmt: skip
        cognito.admin_set_user_password(UserPoolId=pool, Username="pi", Password=PASSWORD, Permanent=True)
        token = cognito.initiate_auth(
            ClientId=client_id, AuthFlow="USER_PASSWORD_AUTH", AuthParameters={"USERNAME": "pi", "PASSWORD": PASSWORD}
        )["AuthenticationResult"]
        exchanged = anonymous.post("/api/v1/auth/exchange", json={"provider": "aws", "token": token["IdToken"]})
        assert exchanged.status_code == 200, exchanged.text
        return str(exchanged.json()["token"])

    return sign_in


def test_aws_6_a_user_signs_in_makes_a_bucket_and_starts_an_environment(aws_deployment: Deployment) -> None:
    use_it(aws_deployment, cognito_sign_in(aws_deployment))
    iam, s3 = aws(aws_deployment, "iam"), aws(aws_deployment, "s3")
    assert aws_deployment.bucket.startswith(f"{AWS_CLUSTER}-user-")  # the deployment's prefix
    (role,) = iam.list_roles(PathPrefix=f"/cmbcluster-users/{AWS_CLUSTER}/")["Roles"]
    boundary = iam.get_role(RoleName=role["RoleName"])["Role"]["PermissionsBoundary"]["PermissionsBoundaryArn"]
    assert boundary.endswith(f"/cmbcluster-infra/{AWS_CLUSTER}/{AWS_CLUSTER}-user-boundary")
    assert role["Arn"] in s3.get_bucket_policy(Bucket=aws_deployment.bucket)["Policy"]


def test_aws_6b_the_environment_runs_and_is_reachable(aws_deployment: Deployment) -> None:
    reachable(aws_deployment)


def test_aws_7_a_backup_lands_in_the_database_bucket(aws_deployment: Deployment) -> None:
    backup, listing = aws_deployment.walk.run("backup")
    bucket = f"{AWS_CLUSTER}-db-{AWS_ACCOUNT}"
    objects = aws(aws_deployment, "s3").list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects and objects[-1]["Key"].endswith(".sqlite3.gz"), (backup.stdout, objects)
    assert objects[-1]["Key"].rsplit("/", 1)[-1].removeprefix("cmbcluster-").split(".")[0] in listing.stdout


def test_aws_8_restore_brings_the_database_back(aws_deployment: Deployment) -> None:
    results = aws_deployment.walk.run("restore")
    logs = results[3].stdout
    assert "restored" in logs, logs
    # the database the Job replaced is set aside, never deleted
    assert list((aws_deployment.tmp / "controlplane-data").glob("*.before-restore-*")), logs
    with aws_deployment.api() as api:
        buckets = api.get("/api/v1/storages").json()
    assert aws_deployment.bucket in json.dumps(buckets)


def test_aws_9_down_deletes_what_up_made_lists_what_it_keeps_and_then_deletes_it(aws_deployment: Deployment) -> None:
    aws_deployment.stop()  # the control plane goes with the cluster
    down, retained = aws_deployment.walk.run("down", timeout=900)
    for kept in ("keeping iam/user-role", "keeping s3/user-bucket", "keeping ec2/volume"):
        assert kept in down.stdout, down.stdout
    ec2, iam, s3 = aws(aws_deployment, "ec2"), aws(aws_deployment, "iam"), aws(aws_deployment, "s3")
    mine = [{"Name": "tag:cmbcluster:deployment", "Values": [AWS_CLUSTER]}]
    assert (
        ec2.describe_vpcs(Filters=mine)["Vpcs"] == [] and aws(aws_deployment, "eks").list_clusters()["clusters"] == []
    )
    assert iam.list_roles(PathPrefix="/cmbcluster-infra/")["Roles"] == []
    # the backups' bucket too, as --delete-data said
    assert f"{AWS_CLUSTER}-db-{AWS_ACCOUNT}" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    route53 = aws(aws_deployment, "route53")
    zone = route53.list_hosted_zones()["HostedZones"][0]["Id"]
    assert {r["Type"] for r in route53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]} == {
        "SOA", "NS"}  # the records infra dns wrote are gone  # fmt: skip
    assert k8s.StorageV1Api(aws_deployment.admin).list_storage_class().items == [] or all(
        c.metadata.name != "gp3" for c in k8s.StorageV1Api(aws_deployment.admin).list_storage_class().items
    )  # helm uninstalled CMBCluster's own chart
    assert "deleting" in retained.stdout
    assert iam.list_roles(PathPrefix="/cmbcluster-users/")["Roles"] == []
    assert not [b for b in s3.list_buckets()["Buckets"] if b["Name"].startswith(f"{AWS_CLUSTER}-user-")]
    assert ec2.describe_volumes(Filters=mine)["Volumes"] == []


# -- GCP: docs/DEPLOYMENT_GCP.md against the Google API fake, the GCS emulator and the OIDC mock ------------
GCP_PROJECT, GCP_REGION, GCP_CLUSTER = "cmbwalk-project", "europe-west1", "cmbwalk-gke"
GCP_LB = "203.0.113.30"  # the address Google gives ingress-nginx's regional load balancer
GCP_CONTROL_PLANE = f"{GCP_CLUSTER}-controlplane@{GCP_PROJECT}.iam.gserviceaccount.com"
GKE_METADATA_SERVER = "iam.gke.io/gke-metadata-server-enabled"  # the label of GKE nodes running it

GCLOUD_STAND_IN = '''#!{python}
"""gcloud for the GCP walk: the commands docs/DEPLOYMENT_GCP.md runs, answered from the fake of Google's APIs
(WALK_GOOGLE_API, with the token gcloud's own sign-in would hold); any other command fails the walk."""
import json, os, sys, urllib.request
args, api = sys.argv[1:], os.environ["WALK_GOOGLE_API"]
if args[:2] == ["projects", "describe"] and args[3:] == ["--format=value(projectNumber)"]:
    request = urllib.request.Request(f"{{api}}/v3/projects/{{args[2]}}",
                                     headers={{"Authorization": "Bearer " + os.environ["WALK_GCLOUD_TOKEN"]}})
    with urllib.request.urlopen(request, timeout=10) as answer:
        print(json.load(answer)["name"].removeprefix("projects/"))
elif args == ["auth", "application-default", "login"]:
    # where gcloud writes the person's credentials, which the application default credentials read; gcloud
    # writes a refresh token, which google-auth sends only to Google's own token endpoint, so here a key whose
    # token endpoint is the fake's (google-auth trades a JWT signed with it for an access token there)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    folder = os.path.join(os.environ["HOME"], ".config", "gcloud")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "application_default_credentials.json")
    with open(path, "w") as out:
        json.dump({{"type": "service_account", "project_id": "walk", "private_key_id": "k1",
                   "private_key": key.decode(), "client_email": "operator@walk.iam.gserviceaccount.com",
                   "client_id": "1", "token_uri": api + "/token"}}, out)
    print(f"Credentials saved to file: [{{path}}]")
else:
    sys.exit(f"gcloud (walk stand-in): `gcloud {{' '.join(args)}}` is not a command the guide runs")
'''


@dataclasses.dataclass
class GcpDeployment(Deployment):
    """A GCP walk's state, with the stand-ins the tests read back (what Google's APIs, Cloud Storage hold)."""

    google: Any = None  # google_api_fake.GoogleApiFake
    gcs: GcsEmulator | None = None
    oidc: OidcMockServer | None = None

    def storage(self, path: str) -> Any:
        """The GCS emulator's JSON API: what is really in Cloud Storage."""
        assert self.gcs is not None
        return self.gcs.json(path)


@pytest.fixture(scope="module")
def gcp_deployment(k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcpDeployment]:
    tmp = tmp_path_factory.mktemp("gcp-walk")
    fake = google_api_fake.GoogleApiFake(project=GCP_PROJECT)
    fake.add_zone("example-org", "example.org.")  # the operator's public zone
    api_server = google_api_fake.FakeServer(fake).start()
    admin = k8s_cluster.api_client()
    core, storage = k8s.CoreV1Api(admin), k8s.StorageV1Api(admin)
    node = core.list_node().items[0].metadata.name
    set_image_mapping(admin, None)  # no pod runs until step 6 says what: the AWS walk before this one said
    with GcsEmulator(tmp / "gcs-emulator.log") as gcs, OidcMockServer() as oidc:
        try:
            values = {
                "PROJECT_ID": GCP_PROJECT, "REGION": GCP_REGION, "CLUSTER_NAME": GCP_CLUSTER,
                "NAMESPACE": f"walk-gcp-{secrets.token_hex(3)}",
                "GOOGLE_CLIENT_ID": "walk-client.apps.googleusercontent.com", "GOOGLE_CLIENT_SECRET": "walk-secret",
            }  # fmt: skip
            bin_dir, state = tmp / "bin", tmp / "state"
            state.mkdir()
            bin_dir.mkdir()
            (bin_dir / "gcloud").write_text(GCLOUD_STAND_IN.format(python=sys.executable))
            (bin_dir / "gcloud").chmod(0o755)
            stand_in_env = {
                "GOOGLE_API_ENDPOINT": api_server.url, "STORAGE_EMULATOR_HOST": gcs.url,
                "GOOGLE_ISSUER": oidc.issuer,  # Google's sign-in: the OIDC mock
                "CMBCLUSTER_INFRA_KUBECONFIG": str(k8s_cluster.kubeconfig),  # GKE's endpoint: the test cluster
                "WALK_GOOGLE_API": api_server.url, "WALK_GCLOUD_TOKEN": google_api_fake.TOKEN,
                **install_helm_stand_in(bin_dir, k8s_cluster.bin_dir / "helm", state), "WALK_LB": GCP_LB,
            }  # fmt: skip
            workdir = tmp / "operator"
            workdir.mkdir()
            path = f"{bin_dir}{os.pathsep}{base_path()}"
            env = clean_environ({**stand_in_env, "PATH": path, "HOME": str(tmp / "home"),
                                 "CMBCLUSTER_DATA_DIR": str(tmp / "operator-data")})  # fmt: skip
            env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)  # the operator signs in as the guide says
            walk = GuideWalk(GUIDES["gcp"], workdir, env)
            deployment = GcpDeployment(walk, k8s_cluster, admin, tmp, values, stand_in_env, google=fake, gcs=gcs,
                                       oidc=oidc)  # fmt: skip
            walk.stand_ins = common_stand_ins(deployment)
            # what a GKE cluster has from the start: the default StorageClass of the persistent disk CSI
            # driver, and nodes running the GKE metadata server (the node pool's GKE_METADATA mode)
            storage.create_storage_class({
                "metadata": {"name": "standard-rwo",
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": "pd.csi.storage.gke.io", "volumeBindingMode": "WaitForFirstConsumer",
                "parameters": {"type": "pd-balanced"},
            })  # fmt: skip
            core.patch_node(node, {"metadata": {"labels": {GKE_METADATA_SERVER: "true"}}})

            def persistent_disk(claim: Any, name: str) -> None:  # GKE labels a cluster's disks as the cluster
                labels = fake.clusters[GCP_CLUSTER].get("resourceLabels", {})
                fake.add_disk(f"{GCP_REGION}-b", name, dict(labels), size_gb=1)

            with VolumeProvisioner(admin, "standard-rwo", persistent_disk):
                yield deployment
        finally:
            if "deployment" in locals():
                deployment.stop()
            core.patch_node(node, {"metadata": {"labels": {GKE_METADATA_SERVER: None}}})
            cleanup_cluster(admin, values["NAMESPACE"], ("standard-rwo",))
            admin.close()
            api_server.stop()


def test_gcp_1_configure_and_check(gcp_deployment: GcpDeployment) -> None:
    walk = gcp_deployment.walk
    walk.run("settings")
    assert walk.env["PROJECT_NUMBER"] == gcp_deployment.google.project_number
    assert (Path(walk.env["HOME"]) / ".config/gcloud/application_default_credentials.json").exists()
    _written, check = walk.run("configure")
    written = (walk.workdir / ".env").read_text().splitlines()
    assert f"PROJECT_NUMBER={gcp_deployment.google.project_number}" in written
    assert "configuration OK" in check.stdout and "Traceback" not in check.stderr
    assert "storage=gcp, compute=kubernetes, infra=gcp, auth=gcp" in check.stdout


def test_gcp_2_infra_up_builds_what_the_chart_needs(gcp_deployment: GcpDeployment) -> None:
    walk, fake = gcp_deployment.walk, gcp_deployment.google
    plan, up, _kubeconfig = walk.run("infra-up", timeout=900)
    assert f"container/cluster {GCP_CLUSTER}" in plan.stdout and "up: done" in up.stdout
    assert walk.env["KUBECONFIG"] == str(gcp_deployment.cluster.kubeconfig)  # what `infra kubeconfig` printed
    assert fake.calls("POST", r"^/token$")  # with the credentials `gcloud auth application-default login` left
    # the cloud: isolation enforced, the control plane's identity bound to its ServiceAccount only
    cluster = fake.clusters[GCP_CLUSTER]
    assert cluster["networkConfig"] == {"datapathProvider": "ADVANCED_DATAPATH"}
    assert cluster["nodePools"][0]["config"]["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}
    assert fake.members(f"sa:{GCP_CONTROL_PLANE}", "roles/iam.workloadIdentityUser") == [
        f"serviceAccount:{GCP_PROJECT}.svc.id.goog[{gcp_deployment.namespace}/cmbcluster-controlplane]"
    ]
    cert_manager = f"{GCP_CLUSTER}-cert-manager@{GCP_PROJECT}.iam.gserviceaccount.com"
    assert fake.members("zone:example-org", "roles/dns.admin") == [f"serviceAccount:{cert_manager}"]
    # the database bucket, in Cloud Storage itself (the emulator), where the control plane backs up
    bucket = gcp_deployment.storage(f"/storage/v1/b/{GCP_CLUSTER}-db-{GCP_PROJECT}")
    assert bucket["name"] == f"{GCP_CLUSTER}-db-{GCP_PROJECT}"
    # the cluster: CMBCluster's own chart installed for real, its ClusterIssuer answering in Cloud DNS
    issuer = k8s.CustomObjectsApi(gcp_deployment.admin).get_cluster_custom_object(
        "cert-manager.io", "v1", "clusterissuers", "letsencrypt")  # fmt: skip
    assert issuer["spec"]["acme"]["solvers"][0]["dns01"] == {
        "cloudDNS": {"project": GCP_PROJECT, "hostedZoneName": "example-org"}}  # fmt: skip
    installed = [c[2] for c in helm_calls(walk.env) if c[:2] == ["upgrade", "--install"]]
    assert installed == ["cert-manager", "ingress-nginx", "cmbcluster-cluster-config"]
    cert_manager_call = next(c for c in helm_calls(walk.env) if c[2:3] == ["cert-manager"])
    assert rf"serviceAccount.annotations.iam\.gke\.io/gcp-service-account={cert_manager}" in cert_manager_call


def test_gcp_3_images_are_pushed_to_the_deployments_repository(gcp_deployment: GcpDeployment) -> None:
    results = gcp_deployment.walk.run("images")
    pushed = [line.split()[-1] for line in results[0].stdout.splitlines() if "docker push" in line]
    registry = f"{GCP_REGION}-docker.pkg.dev/{GCP_PROJECT}/{GCP_CLUSTER}"
    assert pushed and all(p.startswith(f"{registry}/") for p in pushed), pushed
    assert GCP_CLUSTER in gcp_deployment.google.repositories  # the one `up` made
    gcp_deployment.pushed = pushed


def test_gcp_4_deploy_binds_the_claim_and_names_the_service_account_infra_up_made(
    gcp_deployment: GcpDeployment,
) -> None:
    _dry_run, deploy = gcp_deployment.walk.run("deploy", timeout=900)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    core = k8s.CoreV1Api(gcp_deployment.admin)
    claim = core.read_namespaced_persistent_volume_claim("cmbcluster-data", gcp_deployment.namespace)
    assert claim.status.phase == "Bound" and claim.spec.storage_class_name == "standard-rwo"  # GKE's default
    account = core.read_namespaced_service_account("cmbcluster-controlplane", gcp_deployment.namespace)
    assert account.metadata.annotations["iam.gke.io/gcp-service-account"] == GCP_CONTROL_PLANE
    deployment = k8s.AppsV1Api(gcp_deployment.admin).read_namespaced_deployment("cmbcluster", gcp_deployment.namespace)
    assert deployment.spec.template.spec.containers[0].image in gcp_deployment.pushed


def test_gcp_5_dns_points_both_names_at_the_load_balancer(gcp_deployment: GcpDeployment) -> None:
    gcp_deployment.walk.run("dns")
    records = {(r["name"], r["type"]): r["rrdatas"] for r in gcp_deployment.google.rrsets["example-org"]}
    assert records[("cmb.example.org.", "A")] == [GCP_LB]
    assert records[("*.envs.example.org.", "A")] == [GCP_LB]


def google_sign_in(deployment: GcpDeployment) -> Callable[[httpx.Client], str]:
    """Sign in with Google as a browser does: the control plane's login, Google's form (the OIDC mock), back to
    the redirect URI registered with Google (on the public URL), and the session cookie for the guide's domain."""

    def sign_in(anonymous: httpx.Client) -> str:
        from http.cookies import SimpleCookie

        oidc = deployment.oidc
        assert oidc is not None
        oidc.put_user("g-pi", {"email": "pi@example.org", "email_verified": True, "name": "The PI"})
        start = anonymous.get("/api/v1/auth/gcp/login", follow_redirects=False)
        assert start.status_code == 303, start.text
        login = SimpleCookie(start.headers["set-cookie"])
        callback = urllib.parse.urlsplit(oidc.authorize(start.headers["location"], "g-pi"))
        assert f"{callback.scheme}://{callback.netloc}{callback.path}" == (
            "https://cmb.example.org/api/v1/auth/gcp/callback")  # the guide's redirect URI  # fmt: skip
        cookies = "; ".join(f"{k}={m.value}" for k, m in login.items())  # a Secure cookie, sent back over https
        done = anonymous.get(f"{callback.path}?{callback.query}", headers={"Cookie": cookies}, follow_redirects=False)
        assert done.status_code == 303, done.text
        name = "__Host-cmbcluster_session"  # the public URL is https: this host's alone, Secure
        (morsel,) = [SimpleCookie(h)[name] for h in done.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
        assert morsel["secure"] and not morsel["domain"]  # environments' hosts sign in through enter
        return str(morsel.value)

    return sign_in


def test_gcp_6_a_user_signs_in_makes_a_bucket_and_starts_an_environment(gcp_deployment: GcpDeployment) -> None:
    use_it(gcp_deployment, google_sign_in(gcp_deployment))
    assert gcp_deployment.bucket.startswith(f"{GCP_CLUSTER}-user-")  # the deployment's prefix
    policy = gcp_deployment.storage(f"/storage/v1/b/{gcp_deployment.bucket}/iam")
    (binding,) = policy["bindings"]
    number = gcp_deployment.google.project_number
    assert binding["members"][0].startswith(  # the user's own ServiceAccount, in the project `gcloud` described
        f"principal://iam.googleapis.com/projects/{number}/locations/global/workloadIdentityPools/"
        f"{GCP_PROJECT}.svc.id.goog/subject/ns/{gcp_deployment.namespace}/sa/cmbcluster-user-"
    )


def test_gcp_6b_the_environment_runs_and_is_reachable(gcp_deployment: GcpDeployment) -> None:
    reachable(gcp_deployment)


def test_gcp_7_a_backup_lands_in_the_database_bucket(gcp_deployment: GcpDeployment) -> None:
    backup, listing = gcp_deployment.walk.run("backup")
    objects = gcp_deployment.storage(f"/storage/v1/b/{GCP_CLUSTER}-db-{GCP_PROJECT}/o").get("items", [])
    names = sorted(o["name"] for o in objects)
    assert names and names[-1].endswith(".sqlite3.gz"), (backup.stdout, names)
    assert names[-1].rsplit("/", 1)[-1].removeprefix("cmbcluster-").split(".")[0] in listing.stdout


def test_gcp_8_restore_brings_the_database_back(gcp_deployment: GcpDeployment) -> None:
    results = gcp_deployment.walk.run("restore")
    logs = results[3].stdout
    assert "restored" in logs, logs
    assert list((gcp_deployment.tmp / "controlplane-data").glob("*.before-restore-*")), logs
    with gcp_deployment.api() as api:
        buckets = api.get("/api/v1/storages").json()
    assert gcp_deployment.bucket in json.dumps(buckets)


def test_gcp_9_down_deletes_what_up_made_lists_what_it_keeps_and_then_deletes_it(gcp_deployment: GcpDeployment) -> None:
    fake = gcp_deployment.google
    gcp_deployment.stop()  # the control plane goes with the cluster
    down, retained = gcp_deployment.walk.run("down", timeout=900)
    for kept in ("keeping storage/user-bucket", "keeping compute/disk"):
        assert kept in down.stdout, down.stdout
    assert fake.resource_count() == 0, (fake.clusters, fake.service_accounts)
    assert fake.members("project", "roles/storage.admin") == []
    buckets = {b["name"] for b in gcp_deployment.storage(f"/storage/v1/b?project={GCP_PROJECT}").get("items", [])}
    assert f"{GCP_CLUSTER}-db-{GCP_PROJECT}" not in buckets  # the backups' bucket too, as --delete-data said
    assert {r["type"] for r in fake.rrsets["example-org"]} == {"SOA"}  # the records infra dns wrote are gone
    with pytest.raises(k8s.ApiException) as gone:  # helm uninstalled CMBCluster's own chart, its ClusterIssuer too
        k8s.CustomObjectsApi(gcp_deployment.admin).get_cluster_custom_object(
            "cert-manager.io", "v1", "clusterissuers", "letsencrypt")  # fmt: skip
    assert gone.value.status == 404
    assert "deleting" in retained.stdout
    buckets = {b["name"] for b in gcp_deployment.storage(f"/storage/v1/b?project={GCP_PROJECT}").get("items", [])}
    assert not [b for b in buckets if b.startswith(f"{GCP_CLUSTER}-user-")]
    assert fake.disks == {}
