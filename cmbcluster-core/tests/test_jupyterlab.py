"""JupyterLab from the embedded default's catalog, through the control plane's proxy: a kernel runs a
cell over the proxied WebSocket and writes into the mounted bucket.

The session installs ``cmbcluster-core[jupyter]``; without it, the catalog says JupyterLab is missing
(tested in test_applications_api) and this test has nothing to run.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_environments_api import create_env, make_bucket, wait_status

pytest.importorskip("jupyterlab", reason="the jupyter extra is not installed")


def execute(socket: Any, code: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Run ``code`` on the kernel behind ``socket`` (Jupyter's JSON protocol); its iopub messages."""
    msg_id = uuid.uuid4().hex
    socket.send_text(
        json.dumps(
            {
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": msg_id,
                           "version": "5.3", "date": ""},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True},
            }
        )
    )  # fmt: skip
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(socket.receive_text())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        seen.append(message)
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return seen
    raise AssertionError(f"the cell did not finish: {seen}")


def test_a_notebook_kernel_writes_into_the_mounted_bucket_through_the_proxy(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    storage_id = make_bucket(client, alice)
    env = create_env(
        client, alice, application="jupyterlab", mounts=[{"storage_id": storage_id, "mount_path": "/home/user/data"}]
    )
    url = wait_status(client, alice, env["id"], "running", timeout=90)["url"]
    deadline = time.monotonic() + 60
    while (lab := client.get(f"{url}lab", headers=alice)).status_code != 200:  # the port opens before it serves
        assert time.monotonic() < deadline, lab.text
        time.sleep(0.2)
    assert "jupyter-config-data" in lab.text and f'"baseUrl": "{url}"' in lab.text
    assert client.get(f"{url}lab", headers=bob).status_code == 404
    # No question about Jupyter's news at first open, no update check (the server's defaults for
    # JupyterLab, local/jupyter_config): the settings JupyterLab's page reads say "Never".
    notification = client.get(f"{url}lab/api/settings/@jupyterlab/apputils-extension:notification", headers=alice)
    assert notification.status_code == 200, notification.text
    defaults = notification.json()["schema"]["properties"]
    assert defaults["fetchNews"]["default"] == "false" and defaults["checkForUpdates"]["default"] is False
    kernel = client.post(f"{url}api/kernels", headers=alice, json={"name": "python3"})
    assert kernel.status_code == 201, kernel.text
    channels = f"{url}api/kernels/{kernel.json()['id']}/channels"
    with client.websocket_connect(channels, headers=alice) as socket:
        messages = execute(
            socket, "import os\nopen(os.path.expanduser('~/data/out.txt'), 'w').write('42')\nprint(os.getcwd())"
        )
    output = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
    assert output.strip().endswith(f"/homes/{env['id']}")  # the notebook runs in the environment's home
    stored = client.get(f"/api/v1/storages/{storage_id}/objects/out.txt", headers=alice)
    assert stored.status_code == 200 and stored.text == "42"
    # the file browser's Download of a file in the bucket (a link out of the home: Tornado 6.5.9 and
    # later refused it 403, found by an outsider's trial)
    downloaded = client.get(f"{url}files/data/out.txt", params={"download": 1}, headers=alice)
    assert downloaded.status_code == 200 and downloaded.text == "42", downloaded.text[:300]
