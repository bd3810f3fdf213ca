"""What every command of the ``cmbcluster`` CLI shares: printing, and the validated configuration.

``cmbcluster.cli`` and the command groups in this package import it; it imports none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.plugins import Concern

__all__ = ["err", "out", "resolve_config"]


@functools.cache
def _console(stderr: bool = False) -> Any:
    from rich.console import Console  # imported when something is printed, not for every start

    return Console(stderr=stderr)


def out(*args: Any, **kwargs: Any) -> None:
    """Print to standard output (rich markup)."""
    _console().print(*args, **kwargs)


def err(*args: Any, **kwargs: Any) -> None:
    """Print to standard error (rich markup)."""
    _console(stderr=True).print(*args, **kwargs)


def print_json(text: str) -> None:
    """Print a JSON document, highlighted when standard output is a terminal."""
    _console().print_json(text)


def resolve_config(*, concerns: Iterable[Concern] | None = None, **overrides: Any) -> ResolvedConfig:
    """The whole configuration, validated (core settings from the environment with ``overrides``);
    ``concerns``: those the command uses, whose registrations' required variables are checked (all by default)."""
    core = load_core_settings(**overrides)
    return resolve(core) if concerns is None else resolve(core, concerns=concerns)
