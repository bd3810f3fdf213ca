"""The documentation keeps up with the code: hooks, their tests, and every setting."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cmbcluster import hookspecs
from cmbcluster.settings import CoreSettings, env_var_name

ROOT = Path(__file__).parent.parent
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cmbcluster_")}


def signature_line(name: str) -> str:
    sig = inspect.signature(HOOKS[name])
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def test_there_are_hooks() -> None:
    assert len(HOOKS) == 6


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    text = (ROOT / "docs" / "plugins" / "hooks.md").read_text()
    assert f"### `{name}`" in text
    assert signature_line(name) in text


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_has_a_test(name: str) -> None:
    test_files = [*ROOT.glob("cmbcluster-*/tests/test_*.py"), *ROOT.glob("tests/test_*.py")]
    users = [f for f in test_files if f.name != "test_docs.py" and name in f.read_text()]
    assert users, f"no test mentions {name}"


@pytest.mark.parametrize("field", sorted(CoreSettings.model_fields))
def test_every_core_setting_is_documented(field: str) -> None:
    text = (ROOT / "docs" / "operators" / "configuration.md").read_text()
    assert f"`{env_var_name(CoreSettings, field)}`" in text
