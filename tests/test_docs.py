"""The documentation keeps up with the code: hooks, their tests, and every setting."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cmbcluster import hookspecs
from cmbcluster.interfaces import StorageBackend
from cmbcluster.settings import CoreSettings, env_var_name
from cmbcluster.testing.process import clean_environ

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
    assert len(suites) == 9, suites
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


# -- the plugin guide's examples, run as a third party would copy them ---------------------------------
def python_blocks(path: Path, section: str) -> list[str]:
    """The ```python blocks of the ``## section`` (or ``### section``) of a page."""
    text = path.read_text()
    start = text.index(f"# {section}\n")
    body = text[start:].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


GUIDE = ROOT / "docs" / "plugins" / "writing-a-plugin.md"
TESTING = ROOT / "docs" / "plugins" / "testing.md"
HOOKS_MD = ROOT / "docs" / "plugins" / "hooks.md"


def guide_settings() -> dict[str, Any]:
    """The guide's ``AzureSettings`` (its ``cmbcluster_azure/settings.py``), defined."""
    (block,) = [b for b in python_blocks(GUIDE, "The package") if b.startswith("# cmbcluster_azure/settings.py")]
    namespace: dict[str, Any] = {}
    exec(compile(block, "settings.py", "exec", dont_inherit=True), namespace)  # the documentation's own example
    return namespace


def test_the_guides_settings_model_needs_no_variable_of_a_concern_not_in_use() -> None:
    """One model for every concern: the storage account is the storage's requirement (its registration's
    `requires`), not the model's, so the sign-in alone works without it."""
    azure_settings = guide_settings()["AzureSettings"]
    assert azure_settings().azure_storage_account is None
    (plugin,) = [b for b in python_blocks(GUIDE, "The package") if "def cmbcluster_storage_backends" in b]
    assert 'requires=("azure_storage_account",)' in plugin


def test_the_documented_deploy_hook_adds_nothing_when_only_its_sign_in_is_in_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cmbcluster import (
        AuthProviderRegistration,
        InfraProviderRegistration,
        ResolvedConfig,
        StorageBackendRegistration,
        hookimpl,
    )
    from cmbcluster.config import load_core_settings, resolve
    from cmbcluster.local import LocalInfra, LocalStorage
    from cmbcluster.plugins import PluginManager

    azure_settings = guide_settings()["AzureSettings"]
    (block,) = [b for b in python_blocks(HOOKS_MD, "`cmbcluster_deploy_values`") if "@hookimpl" in b]
    namespace: dict[str, Any] = {"hookimpl": hookimpl, "AzureSettings": azure_settings}
    exec(compile(block, "hooks.md", "exec", dont_inherit=True), namespace)  # the documentation's own example
    deploy_values = namespace["cmbcluster_deploy_values"]

    class Azure:  # an Azure plugin with the guide's settings model, on this machine's folders
        @hookimpl
        def cmbcluster_storage_backends(self) -> Any:
            yield StorageBackendRegistration(
                name="azure", factory=lambda ctx: LocalStorage(ctx.data_dir), settings_model=azure_settings
            )

        @hookimpl
        def cmbcluster_auth_providers(self) -> Any:
            yield AuthProviderRegistration(
                name="azure",
                factory=lambda ctx: None,  # type: ignore[arg-type,return-value]  # never built here
                settings_model=azure_settings,
            )

        @hookimpl
        def cmbcluster_infra_providers(self) -> Any:
            yield InfraProviderRegistration(
                name="azure", factory=lambda ctx: LocalInfra("localhost"), settings_model=azure_settings
            )

    def configured(**env: str) -> ResolvedConfig:
        for name, value in {"CMBCLUSTER_DATA_DIR": str(tmp_path), "AZURE_CLIENT_ID": "app-id", **env}.items():
            monkeypatch.setenv(name, value)
        manager = PluginManager(entry_points_enabled=False)
        manager.register(Azure(), name="azure")
        return resolve(load_core_settings(), manager)

    sign_in_only = configured(CMBCLUSTER_AUTH_PROVIDERS="azure", CMBCLUSTER_COMPUTE_BACKEND="kubernetes")
    assert sign_in_only.settings(azure_settings) is not None  # active: the sign-in uses the model
    assert deploy_values(sign_in_only) is None
    everything = configured(CLOUD_PROVIDER="azure")
    values = deploy_values(everything)
    assert values["storage"] == {"driver": "blob-csi"}
    assert values["serviceAccount"] == {"annotations": {"azure.workload.identity/client-id": "app-id"}}


def test_the_guides_sign_in_passes_the_auth_suite_as_testing_md_writes_it(tmp_path: Path) -> None:
    """writing-a-plugin.md's EntraProvider, tested by testing.md's TestEntraTokens: both followed, green."""
    package = tmp_path / "cmbcluster_azure"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (settings_block,) = [b for b in python_blocks(GUIDE, "The package") if "class AzureSettings" in b]
    (package / "settings.py").write_text(settings_block)
    (auth_block,) = [b for b in python_blocks(GUIDE, "Sign-in: build on `cmbcluster.oidc`") if "EntraProvider" in b]
    (package / "auth.py").write_text("from cmbcluster_azure.settings import AzureSettings\n" + auth_block)
    (test_block,) = [b for b in python_blocks(TESTING, "Sign-in") if "class TestEntraTokens" in b]
    (tmp_path / "test_entra.py").write_text(test_block)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_entra.py"],
        cwd=tmp_path, env=clean_environ({"PYTHONPATH": str(tmp_path)}), capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
