"""``cmbcluster users token EMAIL``: an API token for scripts, without a browser.

For the operator, on the server's own configuration and database. The token is printed once, alone
on standard output (``TOKEN=$(cmbcluster users token ada@example.org)``); what it is for goes to
standard error. On the embedded default (the development sign-in enabled) a user who does not
exist yet is created, as signing in would create them (the first user is an administrator).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(help="Users: API tokens for scripts.", no_args_is_help=True)


@app.command("token")
def token(
    email: Annotated[str, typer.Argument(help="The user's e-mail address.")],
    name: Annotated[str, typer.Option(help="A name to recognise the token by (1 to 100 characters).")] = "cli",
    expires_in_days: Annotated[
        int | None, typer.Option(help="Days until it expires (1 to 365); default: never.", min=1, max=365)
    ] = None,
) -> None:
    """Create an API token for EMAIL and print it, once (send it as `Authorization: Bearer <token>`)."""
    from cmbcluster.config import load_core_settings, resolve
    from cmbcluster.db import create_db_engine, session_factory, upgrade
    from cmbcluster.db.engine import opening
    from cmbcluster.security import secret_key
    from cmbcluster.services import users

    config = resolve(load_core_settings())
    core = config.core
    development_sign_in = any(registration.name == "local" for registration in config.auth)  # the embedded default
    engine = create_db_engine(core.effective_database_url)
    try:
        with opening(core.effective_database_url), session_factory(engine)() as db:
            upgrade(engine, secret_key=secret_key(core))
            user, issued, created = users.operator_token(
                db, email, name=name, expires_in_days=expires_in_days, create_local=development_sign_in,
                admin_emails=core.admin_emails,
            )  # fmt: skip
            who, role = user.email, user.role
    finally:
        engine.dispose()
    expiry = f"expires in {expires_in_days} days" if expires_in_days else "never expires"
    made = " (user created)" if created else ""
    print(f"API token {name!r} for {who}, {role}{made}; it {expiry}. It is shown once:", file=sys.stderr)
    print(issued)
