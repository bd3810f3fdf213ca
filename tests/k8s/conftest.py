"""The Kubernetes test cluster's session fixture ``k8s_cluster`` for every test in tests/k8s."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

from tests.k8s.harness import k8s_cluster  # noqa: F401 - a fixture, registered by importing it
