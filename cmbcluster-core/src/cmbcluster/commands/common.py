"""What every command of the ``cmbcluster`` CLI shares: printing, and the validated configuration.

``cmbcluster.cli`` and the command groups in this package import it; it imports none of them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.registrations import Concern

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from cmbcluster.pricing import PriceTable

__all__ = ["err", "error", "operator_database", "out", "resolve_config"]


#: The width of tables printed to a pipe or a file (a terminal's own width otherwise).
PIPED_WIDTH = 160


@functools.cache
def _console(stderr: bool = False) -> Any:
    from rich.console import Console  # imported when something is printed, not for every start

    console = Console(stderr=stderr)
    if not console.is_terminal:
        # Piped or captured, lines are never cut (a path or a command to copy stays whole, whatever
        # COLUMNS a login shell or a CI runner exports), and tables are as wide as COLUMNS says, else
        # wider than rich's 80 columns, so that their cells are not broken mid-word.
        console.soft_wrap = True
        if "COLUMNS" not in os.environ:
            console.width = PIPED_WIDTH
    return console


def out(*args: Any, **kwargs: Any) -> None:
    """Print to standard output (rich markup)."""
    _console().print(*args, **kwargs)


def err(*args: Any, **kwargs: Any) -> None:
    """Print to standard error (rich markup)."""
    _console(stderr=True).print(*args, **kwargs)


def error(message: object) -> None:
    """Print one error to standard error as every command does: ``error: <message>``. The message
    is plain text, never markup: an option or a path in brackets is printed as it is."""
    from rich.text import Text

    err(Text.assemble(("error:", "red"), " ", str(message)), soft_wrap=True)


def warning(message: object) -> None:
    """Print one warning to standard error, ``warning: <message>``, the message plain text as
    :func:`error`'s (``pip install 'cmbcluster-core[kubernetes]'`` lost its extra as markup)."""
    from rich.text import Text

    err(Text.assemble(("warning:", "yellow"), " ", str(message)), soft_wrap=True)


def print_json(text: str) -> None:
    """Print a JSON document, highlighted when standard output is a terminal."""
    _console().print_json(text)


def resolve_config(*, concerns: Iterable[Concern] | None = None, **overrides: Any) -> ResolvedConfig:
    """The whole configuration, validated (core settings from the environment with ``overrides``);
    ``concerns``: those the command uses, whose registrations' required variables are checked (all by default)."""
    core = load_core_settings(**overrides)
    return resolve(core) if concerns is None else resolve(core, concerns=concerns)


@contextmanager
def operator_database() -> Iterator[tuple[Session, PriceTable]]:
    """The server's own database (migrated) and price table, for the operator's commands; a
    refusal (a :class:`~cmbcluster.errors.CmbclusterError`: bad input, nothing found) is printed
    as one line and exits with status 2, never a traceback."""
    from cmbcluster.db import create_db_engine, session_factory, upgrade
    from cmbcluster.db.engine import opening
    from cmbcluster.errors import CmbclusterError
    from cmbcluster.pricing import PriceOverrides, resolve_price_table
    from cmbcluster.security import secret_key

    try:
        config = resolve(load_core_settings())
        prices = resolve_price_table(
            config.infra.name, config.plugins.price_tables(config), PriceOverrides.parse(config.core.prices)
        )
        engine = create_db_engine(config.core.effective_database_url)
        try:
            with opening(config.core.effective_database_url):
                upgrade(engine, secret_key=secret_key(config.core))
            with session_factory(engine)() as db:
                yield db, prices
        finally:
            engine.dispose()
    except CmbclusterError as exc:
        error(exc)
        raise typer.Exit(2) from None
