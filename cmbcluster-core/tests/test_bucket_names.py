"""Bucket names under the rules a storage backend declares (``StorageBackend.bucket_names``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import BucketOptions, StorageBackend, UserRef
from cmbcluster.local import LocalStorage
from cmbcluster.naming import DEFAULT_BUCKET_NAMES, BucketNameRules, owner_name_prefix
from cmbcluster.testing.storage import StorageContract

USER = "0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b"
#: Azure Blob containers: like S3's and GCS's common rules, but no "--".
AZURE = BucketNameRules(
    pattern=r"[a-z0-9]+(?:-[a-z0-9]+)*",
    description="3-63 lower-case letters, digits and '-', starting and ending with a letter or digit, no '--'",
)


class AzureNamedStorage(LocalStorage):
    """Folders, named as a third party's Azure backend names its containers."""

    bucket_names = AZURE


class TestAzureNamedStorageContract(StorageContract):
    """A backend that declares stricter rules passes the storage suite with them."""

    supports_versioning = False
    keeps_content_type = False

    @pytest.fixture
    def storage_backend(self, tmp_path: Path) -> StorageBackend:
        return AzureNamedStorage(tmp_path / "buckets")


def test_new_names_are_prefix_user_and_random() -> None:
    name = DEFAULT_BUCKET_NAMES.new_name("team-", USER)
    assert re.fullmatch(r"team-0f3a9c1e7b-[0-9a-f]{8}", name), name
    assert name.startswith(owner_name_prefix("team-", USER)) and owner_name_prefix("team", USER) == "team-0f3a9c1e7b-"
    assert DEFAULT_BUCKET_NAMES.new_name("team", USER) != DEFAULT_BUCKET_NAMES.new_name("team", USER)
    assert DEFAULT_BUCKET_NAMES.new_name("t", "Ada.Lovelace@example.org").startswith("t-adalovelac-")  # no '@', no '.'


def test_a_prefix_is_refused_where_the_names_it_makes_would_be() -> None:
    # the S3/GCS default takes "--"; Azure does not, whatever the user and the random part
    assert DEFAULT_BUCKET_NAMES.new_name("cmb--lab", USER).startswith("cmb--lab-")
    assert AZURE.prefix_problem("cmb--lab") == (
        "bucket prefix 'cmb--lab' makes bucket names the storage service refuses: " + AZURE.description
    )
    with pytest.raises(InvalidRequest, match="bucket prefix 'cmb--lab'"):
        AZURE.new_name("cmb--lab", USER)
    for prefix in ("", "-", "Lab", "lab_1", "x" * 44):  # 44 + 20 characters: over 63
        assert DEFAULT_BUCKET_NAMES.prefix_problem(prefix) is not None, prefix
    assert DEFAULT_BUCKET_NAMES.prefix_problem("x" * 43) is None


def test_names_are_checked_against_the_rules() -> None:
    assert AZURE.problem("lab-data") is None and AZURE.check("lab-data") == "lab-data"
    assert AZURE.problem("lab--data") == f"'lab--data' is not a valid bucket name: {AZURE.description}"
    with pytest.raises(InvalidRequest, match="'ab' is not a valid bucket name"):
        AZURE.check("ab")


def test_a_backend_names_its_buckets_under_the_rules_it_declares(tmp_path: Path) -> None:
    class ShortNames(LocalStorage):
        bucket_names = BucketNameRules(pattern=r"[a-z0-9-]+", description="at most 12 characters", max_length=12)

    with pytest.raises(InvalidRequest, match="bucket prefix 'cmb' makes bucket names the storage service refuses"):
        ShortNames(tmp_path / "short").create_bucket(UserRef(id=USER), BucketOptions(display_name="maps"))
    made = AzureNamedStorage(tmp_path / "azure").create_bucket(UserRef(id=USER), BucketOptions(display_name="maps"))
    assert AZURE.problem(made.name) is None
