"""The base of every JSON body the API accepts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestBody(BaseModel):
    """A request's JSON body: an unknown field is refused (a misspelt ``read_only`` would leave a
    mount writable), and each field takes JSON's own type only: ``"yes"``, ``1`` or ``"true"`` are
    not ``true``, ``true`` is not the number ``1``, ``"2"`` is not ``2`` (a script's mistake is
    answered 422, never taken for something it did not say).

    FastAPI validates the parsed JSON as Python objects, where a strict enum field takes only the
    enum itself: such a field says ``Field(strict=False)`` (its JSON value is a string anyway)."""

    model_config = ConfigDict(extra="forbid", strict=True)
