"""Wall time of `cmbcluster infra plan` and `up` (and `down`) on AWS, against a moto server on 127.0.0.1.

moto answers at once, so this measures CMBCluster's own work: the calls it makes, their order,
the record written after every resource. A real deployment is dominated by AWS itself (EKS
control plane ~10-15 minutes, node group ~3-5, NAT gateway ~1-2); see
docs/operators/infrastructure.md for the expected breakdown. Prints the figures.

    python tests/benchmarks/bench_infra_aws.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from moto.server import ThreadedMotoServer

from cmbcluster import provisioning
from cmbcluster.interfaces import ProvisioningOptions
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster_aws.provisioning import AwsProvisioner
from cmbcluster_aws.settings import AwsSettings

REGION, ACCOUNT = "eu-west-1", "123456789012"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"  # real IAM has AmazonEKSClusterPolicy and friends
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT, endpoint_url=endpoint)  # type: ignore[call-arg]
    plans, ups, reruns, downs = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for run in range(args.runs):
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
                provisioner = AwsProvisioner(settings, poll_interval=0.01, propagation_delay=0)
                record = ProvisioningRecord.for_deployment(
                    Path(scratch) / str(run), provider="aws", deployment=provisioner.deployment
                )
                # moto builds its IAM backend (1,000+ AWS managed policies) on first use: not our time.
                provisioner.iam.list_roles(MaxItems=1)
                start = time.perf_counter()
                steps = provisioner.plan()
                plans.append(time.perf_counter() - start)
                start = time.perf_counter()
                provisioning.up(provisioner, record, ProvisioningOptions(addons="print"))
                ups.append(time.perf_counter() - start)
                start = time.perf_counter()
                provisioning.up(provisioner, record, ProvisioningOptions(addons="print"))
                reruns.append(time.perf_counter() - start)
                start = time.perf_counter()
                provisioning.down(provisioner, record)
                downs.append(time.perf_counter() - start)
                provisioner.close()
            # The operator's view: whole CLI processes (interpreter start, plugin loading, configuration).
            env = {**clean_environ(), "CLOUD_PROVIDER": "aws", "CMBCLUSTER_AUTH_PROVIDERS": "local",
                   "AWS_REGION": REGION, "AWS_ACCOUNT_ID": ACCOUNT, "AWS_ENDPOINT_URL": endpoint,
                   "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "CMBCLUSTER_DATA_DIR": str(Path(scratch) / "cli")}  # fmt: skip
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
            cli = {}
            for name, argv in (("plan", ["infra", "plan"]), ("up", ["infra", "up", "--addons", "print"]),
                               ("down", ["infra", "down", "--yes"])):  # fmt: skip
                start = time.perf_counter()
                result = run_cli(*argv, env=env, cwd=Path(scratch), timeout=300)
                cli[name] = time.perf_counter() - start
                if result.returncode != 0:
                    raise SystemExit(f"cmbcluster {' '.join(argv)} failed: {result.stderr}")
    finally:
        server.stop()

    resources = sum(len(s.creates) for s in steps if not s.external)
    print(f"AWS infra against moto ({args.runs} runs; {len(steps)} steps, {resources} cloud resources)")
    for label, values in (("plan", plans), ("up", ups), ("up again (nothing to do)", reruns), ("down", downs)):
        print(f"  {label:<26} median {statistics.median(values) * 1000:8.1f} ms   (min {min(values) * 1000:.1f}, "
              f"max {max(values) * 1000:.1f})")  # fmt: skip
    print("  whole CLI processes:       " + ", ".join(f"{k} {v:.2f} s" for k, v in cli.items()))
    print("  (on AWS itself `up` takes ~20-25 minutes, dominated by EKS: see docs/operators/infrastructure.md)")


if __name__ == "__main__":
    main()
