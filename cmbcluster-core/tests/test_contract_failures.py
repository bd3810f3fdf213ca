"""What a plugin author sees when a contract suite fails in their own test run: the values compared
and every problem found, not a bare AssertionError (the suites' modules are rewritten by pytest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from cmbcluster.testing.process import clean_environ

WRONG_PLUGIN = '''
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
'''


def run_plugin_tests(tmp_path: Path, *selection: str) -> str:
    (tmp_path / "test_acme.py").write_text(textwrap.dedent(WRONG_PLUGIN))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_acme.py", *selection],
        cwd=tmp_path, env=clean_environ(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    return result.stdout


def test_a_failed_suite_assertion_shows_what_it_compared(tmp_path: Path) -> None:
    output = run_plugin_tests(tmp_path, "-k", "test_the_table_is_for_its_provider")
    assert "assert 'acme-typo' == 'acme'" in output


def test_a_schema_failure_lists_every_problem(tmp_path: Path) -> None:
    output = run_plugin_tests(tmp_path, "-k", "test_merged_values_satisfy_the_charts_schema")
    assert "the chart's values.schema.json refuses them" in output
    assert "storage.driver: 'Blob CSI' does not match" in output
    assert "controlPlane: Additional properties are not allowed ('podLabel' was unexpected)" in output
