"""The kubernetes client's token refresh, run at most every few seconds (kubernetes/client.py).
The same with a real API server and an expiring exec-plugin token: tests/k8s/test_kubernetes_backend.py."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest

pytest.importorskip("kubernetes")

from cmbcluster.kubernetes.client import RefreshAtMostEvery, ThrottledConfiguration


class LoaderHook:
    """As the kubeconfig and in-cluster loaders' hooks: each run applies the configuration again and
    sets a new hook of its own (their _set_config)."""

    runs: list[LoaderHook] = []

    def __call__(self, configuration: Any) -> None:
        LoaderHook.runs.append(self)
        configuration.refresh_api_key_hook = LoaderHook()
        # whoever reads the hook meanwhile (another thread's call) still finds the throttle
        assert isinstance(configuration.refresh_api_key_hook, RefreshAtMostEvery)


def refresh(configuration: ThrottledConfiguration) -> None:
    """What the client does before every call (Configuration.get_api_key_with_prefix)."""
    configuration.refresh_api_key_hook(configuration)


def test_the_refresh_runs_once_for_many_calls_and_again_once_the_interval_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cmbcluster.kubernetes import client

    monkeypatch.setattr(client, "TOKEN_REFRESH_SECONDS", 0.3)
    LoaderHook.runs.clear()
    configuration = ThrottledConfiguration()
    first = LoaderHook()
    configuration.refresh_api_key_hook = first  # as a loader sets it
    throttle = configuration.refresh_api_key_hook
    assert isinstance(throttle, RefreshAtMostEvery)
    for _ in range(100):
        refresh(configuration)
    assert LoaderHook.runs == [first]
    # the hook the loader set as it ran is the one run next, and the throttle stays in place
    assert configuration.refresh_api_key_hook is throttle and throttle.hook is not first
    installed = throttle.hook
    time.sleep(0.35)
    refresh(configuration)
    refresh(configuration)
    assert LoaderHook.runs == [first, installed]
    throttle.expire()  # a call refused 401: renewed at the next call, due or not
    refresh(configuration)
    assert len(LoaderHook.runs) == 3


def test_threads_calling_at_once_run_the_refresh_once() -> None:
    LoaderHook.runs.clear()
    configuration = ThrottledConfiguration()
    configuration.refresh_api_key_hook = LoaderHook()
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        for _ in range(50):
            refresh(configuration)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(LoaderHook.runs) == 1
    assert isinstance(configuration.refresh_api_key_hook, RefreshAtMostEvery)


def test_a_copied_configuration_refreshes_on_its_own() -> None:
    """Configuration.set_default keeps a deep copy: the throttle's lock cannot be copied as such."""
    LoaderHook.runs.clear()
    configuration = ThrottledConfiguration()
    configuration.refresh_api_key_hook = LoaderHook()
    refresh(configuration)
    copied = copy.deepcopy(configuration)
    assert isinstance(copied.refresh_api_key_hook, RefreshAtMostEvery)
    assert copied.refresh_api_key_hook is not configuration.refresh_api_key_hook
    refresh(copied)  # its own clock: due at once
    assert len(LoaderHook.runs) == 2
