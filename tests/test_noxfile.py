"""The nox sessions' arguments: naming tests runs those tests only; options alone apply to the whole session.
What `./run serve` installs: the cloud plugin CLOUD_PROVIDER names, and no other."""

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


class FakeSession:
    """What the serve session asks of nox: what it installs and runs, in a virtual environment at ``venv``."""

    def __init__(self, venv: Path) -> None:
        self.posargs: list[str] = []
        self.bin = str(venv / "bin")
        self.venv_backend = "uv"
        self.installed: list[str] = []
        self.ran: list[tuple[str, ...]] = []

    def install(self, *args: str) -> None:
        self.installed += [Path(arg).name for arg in args if arg != "-e"]  # cmbcluster-core[jupyter]

    def run(self, *args: str, silent: bool = False) -> None:
        self.ran.append(args)


def served(noxfile: Any, monkeypatch: pytest.MonkeyPatch, venv: Path, **environ: str) -> FakeSession:
    """The serve session run with ``environ`` (the UI build and the server left out)."""
    monkeypatch.delenv("CLOUD_PROVIDER", raising=False)
    monkeypatch.delenv("CMBCLUSTER_CLOUD_PROVIDER", raising=False)
    monkeypatch.delenv("CMBCLUSTER_EXTRAS", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(noxfile, "build_ui", lambda session: None)
    monkeypatch.setattr(noxfile, "serve_until_stopped", lambda session, *args: None)
    session = FakeSession(venv)
    noxfile.serve(session)
    return session


def installed_earlier(venv: Path, *names: str) -> None:
    site_packages = venv / "lib" / "python3.11" / "site-packages"
    for name in names:
        (site_packages / f"{name.replace('-', '_')}-0.1.0.dist-info").mkdir(parents=True)


def test_run_serve_installs_no_cloud_plugin_for_the_embedded_default(
    noxfile: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # with a cloud plugin installed and CLOUD_PROVIDER unset, the server warns the operator who forgot to
    # choose it: the README's first command must not lead a newcomer there
    fresh = served(noxfile, monkeypatch, tmp_path / "fresh")
    assert fresh.installed == ["cmbcluster-core[jupyter]"]
    assert fresh.ran == []  # nothing to remove: nothing run
    # a clone set up before installed both: they go
    installed_earlier(tmp_path / "old", "cmbcluster-core", "cmbcluster-aws", "cmbcluster-gcp")
    old = served(noxfile, monkeypatch, tmp_path / "old")
    assert old.ran == [("uv", "pip", "uninstall", "cmbcluster-aws", "cmbcluster-gcp")]


def test_run_serve_installs_the_plugin_cloud_provider_names(
    noxfile: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed_earlier(tmp_path / "venv", "cmbcluster-core", "cmbcluster-aws", "cmbcluster-gcp")
    gcp = served(noxfile, monkeypatch, tmp_path / "venv", CLOUD_PROVIDER="gcp")
    assert gcp.installed == ["cmbcluster-core[jupyter]", "cmbcluster-gcp"]
    assert gcp.ran == [("uv", "pip", "uninstall", "cmbcluster-aws")]
    aws = served(noxfile, monkeypatch, tmp_path / "other", CMBCLUSTER_CLOUD_PROVIDER="aws", CMBCLUSTER_EXTRAS="")
    assert aws.installed == ["cmbcluster-core", "cmbcluster-aws"]
    # the test sessions still install every distribution
    everything = FakeSession(tmp_path / "tests")
    noxfile.install_packages(everything)
    assert everything.installed == ["cmbcluster-core[test]", "cmbcluster-aws[test]", "cmbcluster-gcp[test]"]
