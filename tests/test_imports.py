"""The core and the embedded default never import a cloud SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cmbcluster.testing.process import clean_environ

PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
import cmbcluster, cmbcluster.interfaces, cmbcluster.testing.storage
from cmbcluster.app import create_app
from cmbcluster.settings import CoreSettings
app = create_app(CoreSettings(data_dir=sys.argv[1]))
with TestClient(app) as client:
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/v1/auth/providers").status_code == 200
cloud = sorted(m for m in sys.modules if m.split(".")[0] in {"boto3", "botocore", "google", "s3transfer", "kubernetes"})
print(json.dumps({"cloud": cloud, "plugins": sorted(m for m in sys.modules if m.startswith("cmbcluster_"))}))
"""


def test_local_provider_imports_no_cloud_sdk(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "data")],
        env=clean_environ(), cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert modules["cloud"] == []
    # the cloud plugins were loaded (so this is a real check), just not their SDKs
    assert "cmbcluster_aws.plugin" in modules["plugins"] and "cmbcluster_gcp.plugin" in modules["plugins"]
