"""The web UI: the static export of ``frontend/``, served at ``/`` by the process that serves the API.

The files live in the package (``cmbcluster/webui_static``, built by ``python frontend/build_ui.py``
or the ``frontend`` nox session, and included in the wheel). Each compressible file has a gzip
twin made at build time: the server picks the twin when the browser accepts gzip and never
compresses per request, so API answers, progress streams and object downloads are never touched.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from cmbcluster.api.errors import error_body
from cmbcluster.errors import NotFound

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).parent / "webui_static"
# Paths the UI never answers: an unknown API path stays a JSON 404, not an HTML page.
RESERVED_PREFIXES = ("api/", "healthz", "readyz", "metrics")
# Hashed build output never changes under the same name; everything else is revalidated.
IMMUTABLE_PREFIX = "_next/static/"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def ui_available(directory: Path = UI_DIR) -> bool:
    return (directory / "index.html").is_file()


def shows_ui(request: Request) -> bool:
    """A browser asking for a page, where the web UI can answer (to sign in, to start an environment):
    not a script, which gets the JSON error."""
    return "text/html" in request.headers.get("accept", "") and ui_available()


def page_of(request: Request) -> str:
    """The address asked for, on this host: its path as sent (escapes kept: decoded and escaped again,
    bytes that are no UTF-8 came back as another address) and its query."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


def sign_in_first(request: Request) -> RedirectResponse:
    """To the web UI's sign-in page, which comes back to this address."""
    return RedirectResponse(f"/signin/?next={quote(page_of(request), safe='')}", status_code=303)


def start_first(environment_id: str, page: str) -> RedirectResponse:
    """To the web UI's environments page, which offers to start the environment and then opens
    ``page`` (an address of it the browser asked for: a bookmark of a notebook) through its ``enter``
    path, which leads nowhere but into that environment. An id that is not the signed-in user's
    leads to their list: the page says no more than a 404 would."""
    query = f"resume={quote(environment_id, safe='')}" + (f"&next={quote(page, safe='')}" if page else "")
    return RedirectResponse(f"/environments/?{query}", status_code=303)


def mount_ui(app: FastAPI, directory: Path = UI_DIR) -> None:
    """Serve the UI at ``/`` for every path no API route answers; without a built UI, ``/`` shows the API docs."""
    if not ui_available(directory):
        log.warning(
            "the web UI is not built: / redirects to the API documentation "
            "(build it with `python frontend/build_ui.py` or `./run nox -s frontend`)"
        )

        @app.get("/", include_in_schema=False)
        def api_docs() -> RedirectResponse:
            return RedirectResponse("/api/docs")

        return

    root = directory.resolve()
    api_not_found = app.router.default

    async def serve_ui(scope: Scope, receive: Receive, send: Send) -> None:
        # The router's fallback, not a route: API routes (and their 405s) always win, and metrics
        # keep labelling unknown paths "unmatched" instead of growing a label per page.
        if scope["type"] != "http":
            await api_not_found(scope, receive, send)
            return
        response = ui_response(root, Request(scope, receive))
        await response(scope, receive, send)

    app.router.default = serve_ui


def ui_response(root: Path, request: Request) -> Response:
    """The UI's answer for a path no API route took: a file, the 404 page, or a JSON error."""
    path = request.url.path.lstrip("/")
    if path.startswith(RESERVED_PREFIXES):
        raise NotFound(f"no such API path: /{path}")
    if request.method not in ("GET", "HEAD"):
        return JSONResponse(
            error_body("method_not_allowed", f"{request.method} is not allowed on /{path}"),
            status_code=405, headers={"Allow": "GET, HEAD"},
        )  # fmt: skip
    gzip_ok = accepts_gzip(request.headers.get("accept-encoding", ""))
    found = resolve_file(root, path)
    if found is None:
        return file_response(root / "404.html", gzip_ok=gzip_ok, status_code=404, cache="no-cache")
    cache = "public, max-age=31536000, immutable" if path.startswith(IMMUTABLE_PREFIX) else "no-cache"
    return file_response(found, gzip_ok=gzip_ok, cache=cache)


def resolve_file(root: Path, path: str) -> Path | None:
    """The file for a URL path: itself, or its folder's index.html; None outside ``root`` or missing."""
    try:
        candidate = (root / path).resolve()
        if candidate != root and root not in candidate.parents:
            return None
        if candidate.is_dir():
            candidate = candidate / "index.html"
        if not candidate.is_file() or candidate.name.endswith(".gz"):
            return None
    except (OSError, ValueError):  # a name longer than the file system allows, or with a NUL: no such page
        return None
    return candidate


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip`` or ``*`` with a non-zero q)."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def file_response(path: Path, *, gzip_ok: bool, cache: str, status_code: int = 200) -> FileResponse:
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type in ("application/javascript", "image/svg+xml"):
        media_type += "; charset=utf-8"
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding", **SECURITY_HEADERS}
    packed = path.with_name(path.name + ".gz")
    if gzip_ok and packed.is_file():
        headers["Content-Encoding"] = "gzip"
        return FileResponse(packed, status_code=status_code, media_type=media_type, headers=headers)
    return FileResponse(path, status_code=status_code, media_type=media_type, headers=headers)
