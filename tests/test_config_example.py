"""`cmbcluster config example`: the commented .env of every installed settings model, and the repository's
.env.example, which is its output with the first-party plugins installed."""

from __future__ import annotations

from pathlib import Path

from cmbcluster.testing.process import clean_environ, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_env_example_is_the_generated_one(tmp_path: Path) -> None:
    result = run_cli("config", "example", env=clean_environ(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (ROOT / ".env.example").read_text() == result.stdout, (
        "the settings changed: regenerate with `cmbcluster config example > .env.example`"
    )


def test_the_example_names_every_model_its_variables_defaults_and_who_needs_them(tmp_path: Path) -> None:
    text = run_cli("config", "example", env=clean_environ(), cwd=tmp_path).stdout
    for model in ("CoreSettings", "AwsSettings", "GcpSettings", "KubernetesSettings", "OidcSettings"):
        assert f"# ===== {model} (" in text
    assert "# ===== AwsSettings (used by the storage backend 'aws', auth provider 'aws', infra provider 'aws')" in text
    assert "# CMBCLUSTER_PORT=8000\n" in text and "# CMBCLUSTER_CLOUD_PROVIDER=local\n" in text
    assert " Required.\n# AWS_ACCOUNT_ID=\n" in text  # after its description
    # every line is a comment or blank: copied as it is, it sets nothing
    assert all(not line or line.startswith("#") for line in text.splitlines())


def test_one_cloud_only_and_an_unknown_one(tmp_path: Path) -> None:
    gcp = run_cli("config", "example", "--cloud", "gcp", env=clean_environ(), cwd=tmp_path)
    assert gcp.returncode == 0, gcp.stderr
    assert "GcpSettings" in gcp.stdout and "CoreSettings" in gcp.stdout and "AwsSettings" not in gcp.stdout
    azure = run_cli("config", "example", "--cloud", "azure", env=clean_environ(), cwd=tmp_path)
    assert azure.returncode == 1 and "Traceback" not in azure.stderr
    assert "no installed plugin or provider is called 'azure'" in azure.stderr
