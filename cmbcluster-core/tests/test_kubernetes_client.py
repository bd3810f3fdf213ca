"""The kubernetes client's token refresh, run at most every few seconds (kubernetes/client.py).
The same with a real API server and an expiring exec-plugin token: tests/k8s/test_kubernetes_backend.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

pytest.importorskip("kubernetes")

from cmbcluster.kubernetes.client import RefreshAtMostEvery


class LoaderHook:
    """As the kubeconfig and in-cluster loaders' hooks: each run applies the configuration again and
    installs a new hook of its own (their _set_config)."""

    runs: list[LoaderHook] = []

    def __call__(self, configuration: Any) -> None:
        LoaderHook.runs.append(self)
        configuration.refresh_api_key_hook = LoaderHook()


class Configuration:
    refresh_api_key_hook: Any = None


def test_the_refresh_runs_once_for_many_calls_and_again_once_the_interval_is_over() -> None:
    LoaderHook.runs.clear()
    configuration = Configuration()
    first = LoaderHook()
    configuration.refresh_api_key_hook = throttle = RefreshAtMostEvery(first, seconds=0.3)
    for _ in range(100):
        configuration.refresh_api_key_hook(configuration)
    assert LoaderHook.runs == [first]
    # the hook the loader installed is the one run next, and the throttle stays in place
    assert configuration.refresh_api_key_hook is throttle
    installed = throttle.hook
    assert installed is not first
    time.sleep(0.35)
    configuration.refresh_api_key_hook(configuration)
    configuration.refresh_api_key_hook(configuration)
    assert LoaderHook.runs == [first, installed]
    assert configuration.refresh_api_key_hook is throttle


def test_threads_calling_at_once_run_the_refresh_once() -> None:
    LoaderHook.runs.clear()
    configuration = Configuration()
    configuration.refresh_api_key_hook = RefreshAtMostEvery(LoaderHook(), seconds=60)
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        for _ in range(50):
            configuration.refresh_api_key_hook(configuration)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(LoaderHook.runs) == 1
