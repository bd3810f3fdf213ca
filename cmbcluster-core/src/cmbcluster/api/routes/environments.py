"""Router stub: filled in by its resource's work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/environments", tags=["environments"])
