"""FastAPI dependencies, as ``Annotated`` aliases used by every router."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from cmbcluster.context import AppContext


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Context = Annotated[AppContext, Depends(get_context)]


def get_db(context: Context) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(get_db)]
