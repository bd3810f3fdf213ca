"""The one templating of application commands every compute backend uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cmbcluster.compute.command import (
    LaunchValues,
    missing_program,
    placeholders_in,
    render_command,
    root_arguments,
    rule_for,
    standard_variables,
    takes_token,
)
from cmbcluster.errors import InvalidRequest

VALUES = LaunchValues(environment_id="e1", host="127.0.0.1", port=20001, base_url="/environments/e1/", token="t0k")


def test_every_placeholder_is_replaced_and_nothing_else() -> None:
    command = [
        "app", "--ip={host}", "--port={port}", "--base={base_url}", "--token={token}", "--id={environment_id}",
        "{unknown}", "${HOME}", '{"json": "{port}"}',
    ]  # fmt: skip
    assert render_command(command, VALUES) == [
        "app", "--ip=127.0.0.1", "--port=20001", "--base=/environments/e1/", "--token=t0k", "--id=e1",
        "{unknown}", "${HOME}", '{"json": "20001"}',
    ]  # fmt: skip
    assert placeholders_in(command) == {"host", "port", "base_url", "token", "environment_id"}


def test_a_socket_is_given_where_the_backend_has_one_and_refused_where_it_has_none() -> None:
    on_socket = LaunchValues(environment_id="e1", host="127.0.0.1", port=None, base_url="/", socket="/run/e1.sock")
    assert render_command(["app", "--address=unix://{socket}"], on_socket) == ["app", "--address=unix:///run/e1.sock"]
    with pytest.raises(InvalidRequest, match="cannot give an application a Unix socket"):
        render_command(["app", "{socket}"], VALUES)
    with pytest.raises(InvalidRequest, match="not on both"):
        render_command(["app", "{socket}", "{port}"], on_socket)


@pytest.mark.parametrize(
    ("command", "root", "token"),
    [
        (["jupyter-lab", "--no-browser"], ("--allow-root",), True),
        (["/opt/conda/bin/jupyter-lab"], ("--allow-root",), True),
        (["jupyter", "lab"], ("--allow-root",), True),
        (["jupyter-lab", "--allow-root"], (), True),  # never twice
        (["jupyter", "console"], (), False),
        (["streamlit", "run", "app.py"], (), False),
        (["python", "-m", "http.server", "{port}"], (), False),
        (["myapp", "--token={token}"], (), True),
        ([], (), False),
    ],
)
def test_rules_recognise_programs_by_name(command: list[str], root: tuple[str, ...], token: bool) -> None:
    assert root_arguments(command) == root
    assert takes_token(command) is token


def test_the_standard_variables_match_a_pods_and_carry_the_token_only_where_the_program_reads_it() -> None:
    variables = standard_variables(VALUES, ["jupyter-lab"])
    assert variables == {
        "HOST": "127.0.0.1", "PORT": "20001", "CMBCLUSTER_ENVIRONMENT_ID": "e1",
        "CMBCLUSTER_BASE_PATH": "/environments/e1/", "JUPYTER_TOKEN": "t0k",
    }  # fmt: skip
    assert "JUPYTER_TOKEN" not in standard_variables(VALUES, ["python", "app.py"])
    on_socket = LaunchValues(environment_id="e1", host="127.0.0.1", port=None, base_url="/", socket="/s")
    assert "PORT" not in standard_variables(on_socket, ["app"])


def test_a_missing_program_is_named_with_the_exact_fix(tmp_path: Path) -> None:
    empty = str(tmp_path)
    assert missing_program([sys.executable]) is None
    assert missing_program(["python3"], search_path=str(Path(sys.executable).parent)) is None
    message = missing_program(["jupyter-lab", "--no-browser"], search_path=empty)
    assert message is not None
    assert message.startswith("jupyter-lab is not installed on this server: ")
    assert '"cmbcluster-core[jupyter]"' in message and "CMBCLUSTER_EXTRAS=jupyter ./run serve" in message
    streamlit = missing_program(["streamlit", "run", "x.py"], search_path=empty)
    assert streamlit is not None and '"cmbcluster-core[streamlit]"' in streamlit
    assert "CMBCLUSTER_EXTRAS=jupyter,streamlit ./run serve" in streamlit  # ./run serve's venv has no pip
    # every scientist reads it: nothing of the server's files (found by a newcomer)
    assert sys.prefix not in message and sys.prefix not in streamlit
    other = missing_program(["/nonexistent/tool"])
    assert other is not None and "install the program that provides it" in other
    assert rule_for(["streamlit", "run"]) is not None and rule_for(["ls"]) is None
