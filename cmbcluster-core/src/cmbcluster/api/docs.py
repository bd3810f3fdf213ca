"""The OpenAPI document's customisations, and ``/api/docs``: Swagger UI over
``/api/v1/openapi.json``, from files in the package.

The assets come from the ``swagger-ui-bundle-v2`` wheel (Swagger UI 5, which reads OpenAPI 3.1),
so the page works without internet, where FastAPI's default would fetch them from a CDN.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/api/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"


def customise_openapi(app: FastAPI, step: Callable[[dict[str, Any]], None]) -> None:
    """Have ``step`` amend the OpenAPI document once, when it is first generated, after the steps
    installed before it (FastAPI's documented way to customise the document)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        step(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def mount_api_docs(app: FastAPI, openapi_url: str) -> None:
    """Serve the documentation page and its assets (create the app with ``docs_url=None``)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_dir()), name="api-docs-assets")

    # The app from the request, not from this closure: FastAPI keeps endpoints in a module-level cache
    # (4,096 entries), which would keep every app made in a process alive (the tests make hundreds).
    @app.get(DOCS_PATH, include_in_schema=False)
    def api_docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{request.app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )
