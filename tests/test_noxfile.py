"""The nox sessions' arguments: naming tests runs those tests only; options alone apply to the whole session."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture
def noxfile(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The repository's noxfile.py, loaded with a stand-in for nox (not installed in the test sessions)."""
    nox = types.ModuleType("nox")
    nox.options = types.SimpleNamespace()  # type: ignore[attr-defined]
    nox.session = lambda *args, **kwargs: args[0] if args else (lambda function: function)  # type: ignore[attr-defined]
    nox.Session = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nox", nox)
    spec = importlib.util.spec_from_file_location("repository_noxfile", ROOT / "noxfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("posargs", "pytest_args"),
    [
        ([], ["tests/browser"]),
        (["-k", "budget", "-x"], ["tests/browser", "-k", "budget", "-x"]),
        (["tests/browser/test_ui_phone.py"], ["tests/browser/test_ui_phone.py"]),
        (["-x", "tests/browser/test_ui.py::test_settings_show_a_new_api_token_once"],
         ["-x", "tests/browser/test_ui.py::test_settings_show_a_new_api_token_once"]),
        # a path that is an option's value chooses nothing
        (["--deselect", "tests/browser/test_notebook.py"],
         ["tests/browser", "--deselect", "tests/browser/test_notebook.py"]),
        (["-k", "no/such/file.py"], ["tests/browser", "-k", "no/such/file.py"]),
        (["-k", "helm"], ["tests/browser", "-k", "helm"]),  # helm/ exists: still the -k expression
    ],
)  # fmt: skip
def test_arguments_that_name_tests_replace_the_sessions_own(
    noxfile: Any, posargs: list[str], pytest_args: list[str]
) -> None:
    session = types.SimpleNamespace(posargs=posargs)
    assert noxfile.chosen_tests(session, "tests/browser") == pytest_args
