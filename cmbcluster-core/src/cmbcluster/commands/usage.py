"""``cmbcluster usage report --month 2026-11 [--csv]``: the month's usage and estimated cost.

For the operator, on the server's own configuration and database, like the API's
``GET /api/v1/usage``. Amounts are estimates from list prices, and the report says whose and when.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Usage and estimated cost per user, group, application or day.", no_args_is_help=True)


@app.command("report")
def report(
    month: Annotated[str, typer.Option(help="The month, YYYY-MM (for example 2026-11).")],
    group_by: Annotated[str, typer.Option(help="user, group, application or day.")] = "user",
    csv: Annotated[bool, typer.Option("--csv", help="CSV on standard output instead of a table.")] = False,
) -> None:
    """Print MONTH's usage and estimated cost."""
    from rich.console import Console
    from rich.table import Table

    from cmbcluster.commands.common import operator_database
    from cmbcluster.services import accounting

    with operator_database() as (db, prices):
        start, end = accounting.month_period(month)
        result = accounting.report(db, prices, start, end, group_by)
    if csv:
        typer.echo(result.csv(), nl=False)
        return
    currency = prices.currency
    table = Table(title=f"Usage {month} by {group_by} ({prices.disclaimer})")
    for column in (group_by, "hours", "core-hours", "GiB-hours", "GB-months", f"cost ({currency})"):
        table.add_column(column, justify="left" if column == group_by else "right")
    for _key, label, usage in result.rows:
        figures = (usage.environment_hours, usage.core_hours, usage.memory_gib_hours)
        table.add_row(label, *(f"{f:.1f}" for f in figures), f"{usage.storage_gb_months:.3f}", f"{usage.cost:.2f}")
    if result.cluster_fee:
        table.add_row("cluster fee", "", "", "", "", f"{result.cluster_fee:.2f}")
    Console().print(table)
