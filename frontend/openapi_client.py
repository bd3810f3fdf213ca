"""Regenerate the web UI's typed API client from the control plane's OpenAPI document.

    python frontend/openapi_client.py           # rewrite frontend/src/api/schema.d.ts
    python frontend/openapi_client.py --check   # exit 1 when the checked-in file is stale (CI)

The OpenAPI document comes from ``create_app()`` itself (an embedded default in a throwaway data
directory), so the client always describes the routes of this checkout. The types are made by
``openapi-typescript`` (pinned in package-lock.json); ``openapi-fetch`` uses them at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FRONTEND = Path(__file__).resolve().parent
SCHEMA = FRONTEND / "src" / "api" / "schema.d.ts"


def openapi_document(data_dir: Path) -> dict[str, object]:
    """The app's OpenAPI document, from a fresh embedded default with no outside configuration."""
    from cmbcluster.app import create_app
    from cmbcluster.testing.process import clean_environ

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_environ({"CMBCLUSTER_DATA_DIR": str(data_dir)}))
    try:
        return create_app().openapi()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def generate(target: Path) -> None:
    """Write the TypeScript types for the current OpenAPI document to ``target``."""
    ensure_node_modules()
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "openapi.json"
        spec.write_text(json.dumps(openapi_document(Path(tmp) / "data"), indent=1, sort_keys=True))
        subprocess.run(
            [str(FRONTEND / "node_modules" / ".bin" / "openapi-typescript"), str(spec), "-o", str(target)],
            cwd=FRONTEND, check=True, capture_output=True,
        )  # fmt: skip


def ensure_node_modules() -> None:
    if not (FRONTEND / "node_modules" / ".bin" / "openapi-typescript").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=FRONTEND, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the checked-in client is stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(SCHEMA)
        print(f"wrote {SCHEMA.relative_to(FRONTEND.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "schema.d.ts"
        generate(fresh)
        if SCHEMA.exists() and fresh.read_text() == SCHEMA.read_text():
            print(f"{SCHEMA.relative_to(FRONTEND.parent)} matches the API")
            return 0
    print(
        f"{SCHEMA.relative_to(FRONTEND.parent)} is stale: the API changed. Regenerate it with "
        "`./run nox -s openapi-client` and commit the result.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
