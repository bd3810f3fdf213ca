"""The documentation keeps up with the code: hooks, their tests, and every setting."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cmbcluster import hookspecs
from cmbcluster.interfaces import StorageBackend
from cmbcluster.settings import CoreSettings, env_var_name

ROOT = Path(__file__).parent.parent
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cmbcluster_")}


def signature_line(name: str) -> str:
    sig = inspect.signature(HOOKS[name])
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def test_there_are_hooks() -> None:
    assert len(HOOKS) == 8


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    text = (ROOT / "docs" / "plugins" / "hooks.md").read_text()
    assert f"### `{name}`" in text
    assert signature_line(name) in text


STORAGE_DEFAULTS = sorted(
    name
    for name, fn in inspect.getmembers(StorageBackend, inspect.isfunction)
    if not name.startswith("_") and not getattr(fn, "__isabstractmethod__", False)
)


@pytest.mark.parametrize("name", STORAGE_DEFAULTS)
def test_storage_methods_with_defaults_are_documented_with_their_exact_signature(name: str) -> None:
    text = (ROOT / "docs" / "plugins" / "interfaces.md").read_text()
    signature = inspect.signature(getattr(StorageBackend, name), eval_str=True)
    assert f"def {name}{signature}" in text


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_has_a_test(name: str) -> None:
    test_files = [*ROOT.glob("cmbcluster-*/tests/test_*.py"), *ROOT.glob("tests/test_*.py")]
    users = [f for f in test_files if f.name != "test_docs.py" and name in f.read_text()]
    assert users, f"no test mentions {name}"


@pytest.mark.parametrize("field", sorted(CoreSettings.model_fields))
def test_every_core_setting_is_documented(field: str) -> None:
    text = (ROOT / "docs" / "operators" / "configuration.md").read_text()
    assert f"`{env_var_name(CoreSettings, field)}`" in text


def test_the_documented_kubernetes_permissions_are_rbac_py() -> None:
    """docs/operators/kubernetes.md lists exactly the rules of cmbcluster/kubernetes/rbac.py."""
    from cmbcluster.kubernetes import rbac

    text = (ROOT / "docs" / "operators" / "kubernetes.md").read_text()
    section = text.split("## The permissions it needs", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("Role", "ClusterRole"):
            group = "" if cells[1] == "core" else cells[1]
            resources = tuple(r.strip() for r in cells[2].split(","))
            verbs = tuple(v.strip() for v in cells[3].split(","))
            documented.add((cells[0], group, resources, verbs))
    expected = {("Role", r["apiGroups"][0], tuple(r["resources"]), tuple(r["verbs"])) for r in rbac.NAMESPACED_RULES}
    expected |= {
        ("ClusterRole", r["apiGroups"][0], tuple(r["resources"]), tuple(r["verbs"])) for r in rbac.CLUSTER_RULES
    }
    assert documented == expected


def _suites() -> list[str]:
    import importlib
    import pkgutil

    import cmbcluster.testing

    found = []
    for module in pkgutil.iter_modules(cmbcluster.testing.__path__):
        if module.name == "leftovers":  # a pytest plugin, not a suite
            continue
        loaded = importlib.import_module(f"cmbcluster.testing.{module.name}")
        found += [name for name, _ in inspect.getmembers(loaded, inspect.isclass) if name.endswith("Contract")]
    return sorted(set(found))


def test_testing_md_covers_every_contract_suite() -> None:
    text = (ROOT / "docs" / "plugins" / "testing.md").read_text()
    suites = _suites()
    assert len(suites) == 8, suites
    assert [s for s in suites if f"`{s}`" not in text] == []


def test_hooks_md_documents_the_lifecycle_order_core_follows() -> None:
    from cmbcluster.testing.lifecycle import LIFECYCLE

    section = (ROOT / "docs" / "plugins" / "hooks.md").read_text().split("## The order of calls", 1)[1]
    positions: list[int] = []
    for _, calls in LIFECYCLE:
        for call in calls:
            method = call.lstrip("*")
            start = positions[-1] if positions else 0
            found = section.find(f"`{method}(", start)
            assert found >= 0, f"{method} is not documented in its place"
            positions.append(found)
