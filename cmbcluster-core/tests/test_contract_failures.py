"""A plugin author's own test run of the contract suites: a failure shows the values compared and
every problem found, not a bare AssertionError (the suites' modules are rewritten by pytest), and
another installed plugin cannot fail the suite of the plugin under test."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from installed import install_plugin, with_site

from cmbcluster.testing.process import clean_environ

WRONG_PLUGIN = """
import pytest

from cmbcluster.interfaces import PriceTable
from cmbcluster.testing.deploy import DeployValuesContract, resolved_config
from cmbcluster.testing.prices import PriceTableContract


class TestAcmePrices(PriceTableContract):
    provider = "acme"

    @pytest.fixture
    def price_table(self):
        return lambda config: PriceTable(provider="acme-typo", cluster_hour=0.1)

    @pytest.fixture
    def active_config(self, monkeypatch, tmp_path):
        return resolved_config(monkeypatch, CMBCLUSTER_DATA_DIR=str(tmp_path))


class TestAcmeDeployValues(DeployValuesContract):
    @pytest.fixture
    def deploy_values(self):
        return lambda config: {"storage": {"driver": "Blob CSI"}, "controlPlane": {"podLabel": {"a": "b"}}}

    @pytest.fixture
    def active_config(self, monkeypatch, tmp_path):
        return resolved_config(monkeypatch, CMBCLUSTER_DATA_DIR=str(tmp_path))
"""


def run_plugin_tests(
    tmp_path: Path, tests: str, *selection: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_acme.py").write_text(textwrap.dedent(tests))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_acme.py", *selection],
        cwd=tmp_path, env=env or clean_environ(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def failures(tmp_path: Path, *selection: str) -> str:
    result = run_plugin_tests(tmp_path, WRONG_PLUGIN, *selection)
    assert result.returncode == 1, result.stdout[-3000:]
    return result.stdout


def test_a_failed_suite_assertion_shows_what_it_compared(tmp_path: Path) -> None:
    output = failures(tmp_path, "-k", "test_the_table_is_for_its_provider")
    assert "assert 'acme-typo' == 'acme'" in output


def test_a_schema_failure_lists_every_problem(tmp_path: Path) -> None:
    output = failures(tmp_path, "-k", "test_merged_values_satisfy_the_charts_schema")
    assert "the chart's values.schema.json refuses them" in output
    assert "storage.driver: 'Blob CSI' does not match" in output
    assert "controlPlane: Additional properties are not allowed ('podLabel' was unexpected)" in output


ACME_PLUGIN = """
from cmbcluster import hookimpl


@hookimpl
def cmbcluster_decorate_pod(draft, context):
    if context.serves("acme"):
        draft.labels["acme.example/identity"] = "on"
"""

BROKEN_NEIGHBOUR = """
from cmbcluster import hookimpl


@hookimpl
def cmbcluster_decorate_pod(draft, context):
    raise KeyError("another cloud's bug")
"""

ACME_POD_TESTS = """
import pytest

from cmbcluster.local import LocalStorage
from cmbcluster.testing.pods import PodDecorationContract


class TestAcmePods(PodDecorationContract):
    provider_name = "acme"

    @pytest.fixture
    def storage_backend(self, tmp_path):
        return LocalStorage(tmp_path / "buckets")

    def test_the_label_is_ours(self, storage_backend, user, decorate):
        from cmbcluster.testing.pods import environment_spec, pod_context, pod_draft

        spec = environment_spec(storage_backend, user)
        draft = pod_draft(spec)
        decorate(draft, pod_context(spec, storage_backend="acme", infra_provider="acme"))
        assert draft.labels["acme.example/identity"] == "on"
"""


def test_another_installed_plugins_decorator_cannot_fail_the_pod_suite(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_plugin(site, "cmbcluster-acme", {"acme_plugin": ACME_PLUGIN}, {"acme": "acme_plugin"})
    install_plugin(site, "neighbour", {"neighbour_plugin": BROKEN_NEIGHBOUR}, {"neighbour": "neighbour_plugin"})
    result = run_plugin_tests(tmp_path, ACME_POD_TESTS, env=with_site(clean_environ(), site))
    assert result.returncode == 0, result.stdout[-3000:]  # every test of the suite, and the label test, passed
    assert " passed" in result.stdout and "failed" not in result.stdout and "skipped" not in result.stdout
