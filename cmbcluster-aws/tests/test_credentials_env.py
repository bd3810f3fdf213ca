"""AWS credentials written only in the deployment's `.env`: boto3 reads the process environment and ~/.aws,
never `.env`, so the plugin reads them with its settings and hands them to its one boto3 session; `config
check` says which credentials are used; `deploy` never sends them (the control plane has its own role)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cmbcluster.testing.process import clean_environ, run_cli

BUCKET = "cmbcluster-creds-db"
KEY_ID, SECRET, TOKEN = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEXAMPLETOKEN"


@pytest.fixture
def shell(moto_reset: str, tmp_path: Path, s3: Any) -> dict[str, str]:
    """An operator's shell with no AWS credentials anywhere: no variables, no ~/.aws, no metadata service."""
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    empty = tmp_path / "no-aws-config"
    return {
        **clean_environ(), "HOME": str(tmp_path / "home"), "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_EC2_METADATA_DISABLED": "true",
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip


def write_env(folder: Path, endpoint: str, **credentials: str) -> None:
    lines = {
        "CMBCLUSTER_STORAGE_BACKEND": "aws", "AWS_REGION": "eu-west-1", "AWS_ACCOUNT_ID": "123456789012",
        "AWS_ENDPOINT_URL": endpoint, "S3_DATABASE_BUCKET": BUCKET, **credentials,
    }  # fmt: skip
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))


def test_keys_in_dot_env_reach_aws(shell: dict[str, str], moto_reset: str, tmp_path: Path) -> None:
    write_env(tmp_path, moto_reset)
    without = run_cli("db", "backup", "--list", env=shell, cwd=tmp_path)
    assert without.returncode == 1 and "no usable AWS credentials" in without.stderr, without.stderr
    check = run_cli("config", "check", env=shell, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "AWS credentials: none in the environment, .env or ~/.aws" in " ".join(check.stdout.split())

    write_env(tmp_path, moto_reset, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    listed = run_cli("db", "backup", "--list", env=shell, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"no database backup in {BUCKET}" in listed.stdout  # S3 answered, with the keys of .env
    check = run_cli("config", "check", env=shell, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    said = " ".join(check.stdout.split())
    assert "AWS credentials: the access key AKIA...MPLE (AWS_ACCESS_KEY_ID with AWS_SESSION_TOKEN) from .env" in said
    assert SECRET not in check.stdout + check.stderr and TOKEN not in check.stdout + check.stderr
    # the same keys from the shell are said to come from there
    exported = run_cli("config", "check", env={**shell, "AWS_ACCESS_KEY_ID": KEY_ID}, cwd=tmp_path)
    assert "(AWS_ACCESS_KEY_ID with AWS_SESSION_TOKEN) from the environment" in " ".join(exported.stdout.split())


def test_a_profile_of_aws_config_is_named(shell: dict[str, str], moto_reset: str, tmp_path: Path) -> None:
    config = tmp_path / "aws-config"
    config.write_text(f"[profile research]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    write_env(tmp_path, moto_reset, AWS_PROFILE="research")
    env = {**shell, "AWS_CONFIG_FILE": str(config)}
    listed = run_cli("db", "backup", "--list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    check = run_cli("config", "check", env=env, cwd=tmp_path)
    assert "AWS credentials: ~/.aws/config (profile research)" in " ".join(check.stdout.split()), check.stdout
    write_env(tmp_path, moto_reset, AWS_PROFILE="nobody")
    unknown = run_cli("config", "check", env=env, cwd=tmp_path)
    assert "none usable (profile nobody)" in " ".join(unknown.stdout.split()), unknown.stdout


def test_half_a_key_is_refused(shell: dict[str, str], moto_reset: str, tmp_path: Path) -> None:
    write_env(tmp_path, moto_reset, AWS_ACCESS_KEY_ID=KEY_ID)
    check = run_cli("config", "check", env=shell, cwd=tmp_path)
    assert check.returncode == 1
    assert "AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY" in " ".join(check.stderr.split())
    assert "Traceback" not in check.stderr


def test_deploy_never_sends_the_operators_keys(shell: dict[str, str], moto_reset: str, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "CLOUD_PROVIDER=aws\nAWS_REGION=eu-west-1\nAWS_ACCOUNT_ID=123456789012\nEKS_CLUSTER_NAME=cmb-eks\n"
        "COGNITO_USER_POOL_ID=eu-west-1_AbCdEf\nCOGNITO_CLIENT_ID=cognito-client\n"
        f"AWS_ACCESS_KEY_ID={KEY_ID}\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_SESSION_TOKEN={TOKEN}\nAWS_PROFILE=research\n"
    )
    for args in (["--dry-run"], ["--print-values"]):
        result = run_cli("deploy", *args, env=shell, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        for leaked in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", KEY_ID,
                       SECRET, TOKEN):  # fmt: skip
            assert leaked not in result.stdout + result.stderr, (args, leaked)
