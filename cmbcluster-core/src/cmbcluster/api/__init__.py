"""The HTTP API: ``/api/v1`` routers by resource, plus health and metrics endpoints."""
