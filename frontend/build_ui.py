"""Build the web UI into cmbcluster-core's package data, where ``cmbcluster serve`` finds it.

    python frontend/build_ui.py             # npm ci (when needed), next build, copy, precompress
    python frontend/build_ui.py --if-stale  # the same, only when frontend/ changed since the last build

The static export (frontend/out) is copied to ``cmbcluster/webui_static`` (gitignored; a wheel
includes it) with a gzip twin of every compressible file, so the server sends compressed assets
without compressing anything per request. Standard library only: the build hook runs it too.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

FRONTEND = Path(__file__).resolve().parent
DEST = FRONTEND.parent / "cmbcluster-core" / "src" / "cmbcluster" / "webui_static"
STAMP = ".build-stamp"
# What the build reads; node_modules follows from package-lock.json.
SOURCES = ("src", "public", "package.json", "package-lock.json", "next.config.ts", "tsconfig.json", "build_ui.py")
COMPRESSIBLE = (".js", ".css", ".html", ".txt", ".svg", ".json", ".map", ".ico", ".webmanifest")
MIN_COMPRESS_BYTES = 512


def source_digest() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        root = FRONTEND / name
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if path.exists():
                digest.update(str(path.relative_to(FRONTEND)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def npm(*args: str) -> None:
    if shutil.which("npm") is None:
        sys.exit("Building the web UI needs Node.js 20 or newer with npm on the PATH (https://nodejs.org).")
    env = {**os.environ, "NEXT_TELEMETRY_DISABLED": "1"}
    subprocess.run(["npm", *args], cwd=FRONTEND, check=True, env=env)


def node_modules_current() -> bool:
    """npm ci writes node_modules/.package-lock.json; it matches package-lock.json when up to date."""
    installed = FRONTEND / "node_modules" / ".package-lock.json"
    return installed.exists() and installed.stat().st_mtime >= (FRONTEND / "package-lock.json").stat().st_mtime


def precompress(root: Path) -> int:
    """Write NAME.gz beside every compressible file worth it; returns how many."""
    count = 0
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in COMPRESSIBLE and path.stat().st_size >= MIN_COMPRESS_BYTES:
            data = path.read_bytes()
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < len(data):
                path.with_name(path.name + ".gz").write_bytes(packed)
                count += 1
    return count


def build(dest: Path = DEST, *, if_stale: bool = False) -> None:
    digest = source_digest()
    stamp = dest / STAMP
    if if_stale and (dest / "index.html").exists() and stamp.exists() and stamp.read_text() == digest:
        print(f"web UI up to date in {dest}")
        return
    if not node_modules_current():
        npm("ci", "--no-audit", "--no-fund")
    npm("run", "build")
    staging = dest.with_name(dest.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(FRONTEND / "out", staging)
    compressed = precompress(staging)
    (staging / STAMP).write_text(digest)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    print(f"web UI built into {dest} ({compressed} files precompressed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--if-stale", action="store_true", help="skip the build when frontend/ did not change")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where to put the UI (default {DEST})")
    args = parser.parse_args(argv)
    build(args.dest, if_stale=args.if_stale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
