"""Run the real ``cmbcluster`` command and server in subprocesses, as an operator would.

Used by core's tests and available to plugin authors for end-to-end tests of their plugin
inside a served control plane.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import httpx

#: Core's own variables, and those the clouds' SDKs read on their own, outside any settings model
#: (credentials, profiles, endpoints): a developer's must never reach a test.
CORE_PREFIX = "CMBCLUSTER_"
SDK_PREFIXES = ("AWS_", "GOOGLE_", "CLOUDSDK_", "AZURE_")


#: Kept: where a tool is, which changes nothing a test sees (the deploy-values suite's helm).
KEPT = frozenset({"CMBCLUSTER_HELM"})


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any CMBCluster or cloud configuration, plus ``extra``.

    Removed: every variable that core's settings and the settings model of every installed plugin
    read (their names and aliases, and anything under a model's ``env_prefix``), whatever plugin
    it is: a plugin's tests start clean without listing its variables. Also ``CMBCLUSTER_*`` and
    the cloud SDKs' own variables (:data:`SDK_PREFIXES`). Kept: :data:`KEPT`.
    """
    names, prefixes = configuration_variables()
    env = {
        k: v for k, v in os.environ.items()
        if k in KEPT or (k.upper() not in names and not k.upper().startswith(prefixes))
    }  # fmt: skip
    env.update(extra or {})
    return env


@functools.cache
def configuration_variables() -> tuple[frozenset[str], tuple[str, ...]]:
    """The variable names and prefixes :func:`clean_environ` removes, from the installed plugins
    (found once per process, through their entry points)."""
    from pydantic_settings import BaseSettings

    from cmbcluster.errors import PluginError
    from cmbcluster.plugins import PluginManager
    from cmbcluster.settings import CoreSettings, env_var_names

    plugins = PluginManager()
    with contextlib.suppress(PluginError):  # two plugins registering one name: still, strip both's variables
        plugins.load()
    names: set[str] = set()
    prefixes = {CORE_PREFIX, *SDK_PREFIXES}
    models: list[type[BaseSettings]] = [CoreSettings, *plugins.settings_models()]
    for model in models:
        model_names, prefix = env_var_names(model)
        names |= model_names
        if prefix:
            prefixes.add(prefix)
    return frozenset(names), tuple(sorted(prefixes))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def run_cli(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 60, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Run ``cmbcluster ARGS`` with ``python`` and return what it printed."""
    return subprocess.run(
        [python, "-m", "cmbcluster.cli", *args],
        env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def first_answer(
    url: str, process: subprocess.Popen[bytes], timeout: float, *, request_timeout: float
) -> httpx.Response | None:
    """The first answer of ``url`` while ``process`` (the server) runs, within ``timeout`` seconds;
    None if it exits or never answers. One client for every try: a client per try built a TLS
    context each time (about 20 ms of CPU, twenty times a second, beside the server starting up)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=request_timeout) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                return client.get(url)
            except httpx.TransportError:
                time.sleep(0.05)
    return None


class BackgroundProcess:
    """A server started by a test; ``stop()`` (or leaving the ``with`` block) ends it by its PID."""

    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess(BackgroundProcess):
    """``cmbcluster serve`` on a free loopback port."""

    def __init__(self, env: Mapping[str, str], cwd: Path, *, python: str = sys.executable, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [python, "-m", "cmbcluster.cli", "serve", "--port", str(self.port)],
                env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, path: str = "/healthz", timeout: float = 60) -> httpx.Response:
        """The first answer of ``path``; AssertionError with the server's output if it never comes."""
        answer = first_answer(self.url + path, self.process, timeout, request_timeout=2)
        if answer is not None:
            return answer
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.output()}")
        raise AssertionError(f"serve did not answer within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ToolServer(BackgroundProcess):
    """A stand-in for a cloud (``moto_server``, ``gcp-storage-emulator``) run from this interpreter's
    environment, on loopback: ``command`` is the executable beside ``sys.executable`` and its
    arguments, where ``{port}`` becomes a free port; its output goes to ``log``. Ready once ``url`` +
    ``probe`` answers (RuntimeError with the end of its log if it exits or stays silent for 30 s)."""

    def __init__(self, command: list[str], env: Mapping[str, str], log: Path, probe: str = "/") -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        executable = Path(sys.executable).with_name(command[0])
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(executable), *(arg.format(port=port) for arg in command[1:])],
                env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        if first_answer(self.url + probe, self.process, 30, request_timeout=1) is not None:
            return
        if self.process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {self.process.returncode}: {log.read_text()[-2000:]}")
        self.stop()
        raise RuntimeError(f"{command[0]} did not answer within 30 s: {log.read_text()[-2000:]}")
