"""``cmbcluster plugin new NAME``: a plugin package to start a cloud from.

The files come from :mod:`cmbcluster`'s ``plugin_template`` folder (``*.tmpl``, with ``__NAME__``,
``__MODULE__``, ``__DIST__``, ``__CLASS__``, ``__ENV__`` and ``__CORE_VERSION__`` filled in). As
generated, the package installs, appears in ``cmbcluster plugins`` and passes every contract suite.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit
from urllib.request import url2pathname

import typer

from cmbcluster import __version__
from cmbcluster.commands.common import error, out

app = typer.Typer(help="Write a plugin package for a new cloud.", no_args_is_help=True)

TEMPLATE = Path(__file__).resolve().parents[1] / "plugin_template"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")  # a registration's name (cmbcluster.registrations)


#: Where a generated package's CI gets core while it is not on PyPI: this repository, cloned.
CORE_REPOSITORY = "https://github.com/cmbcluster/cmbcluster.git"


def core_source() -> str:
    """Where this cmbcluster-core was installed from, as the generated noxfile's default source of
    core (``CMBCLUSTER_CORE``): a checkout's ``cmbcluster-core`` folder, a VCS URL, else this version
    (from a package index). Read from the installation's ``direct_url.json`` (PEP 610)."""
    try:
        direct = json.loads(importlib.metadata.distribution("cmbcluster-core").read_text("direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        direct = {}
    url = direct.get("url", "")
    if url.startswith("file://") and "dir_info" in direct:
        return url2pathname(urlsplit(url).path)
    vcs = direct.get("vcs_info")
    if url and isinstance(vcs, dict):
        subdirectory = f"#subdirectory={direct['subdirectory']}" if direct.get("subdirectory") else ""
        return f"cmbcluster-core @ {vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id', '')}{subdirectory}"
    return f"cmbcluster-core=={__version__}"


#: Names of CMBCluster's own plugins, installed or not.
FIRST_PARTY = {"aws": "cmbcluster-aws", "gcp": "cmbcluster-gcp"}


def name_taken(name: str) -> str | None:
    """Why ``name`` cannot be a new plugin's (a built-in provider's, CMBCluster's own cloud's, or an
    installed plugin's or provider's name: two of one name refuse to load), or None when it can."""
    from cmbcluster.errors import PluginError
    from cmbcluster.plugins import BUILTIN_PLUGINS, PluginManager

    manager = PluginManager()
    try:
        manager.load()
    except PluginError:  # a conflict among the installed ones: their names are known all the same
        pass
    if name in BUILTIN_PLUGINS:
        return "it is a provider built into cmbcluster-core"
    if name in FIRST_PARTY:
        return f"it is CMBCluster's own plugin, {FIRST_PARTY[name]}"
    for info in manager.plugins():
        if info.name == name:
            return f"the installed plugin {name!r} ({info.distribution} {info.version}) has it"
    for plugin, _, registration in manager.registered():
        if registration.name == name:
            return f"the installed plugin {plugin!r} registers a {registration.kind} of that name"
    return None


def substitutions(name: str) -> dict[str, str]:
    """The template's placeholders for plugin ``name`` (``azure``: ``cmbcluster_azure``, ``Azure``, ``AZURE``)."""
    words = re.split(r"[-_]", name)
    return {
        "__MODULE__": "cmbcluster_" + "_".join(words),
        "__DIST__": "cmbcluster-" + "-".join(words),
        "__CLASS__": "".join(w.capitalize() for w in words),
        "__ENV__": "_".join(words).upper(),
        "__NAME__": name,
        "__CORE_VERSION__": __version__,
        "__TODAY__": datetime.date.today().isoformat(),
        "__CORE_SOURCE__": core_source(),
        "__CORE_REPOSITORY__": CORE_REPOSITORY,
    }


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def write_plugin(name: str, target: Path) -> list[Path]:
    """Write the package for ``name`` into ``target`` (which must not exist or be empty); its files."""
    if not _NAME.match(name):
        raise typer.BadParameter(
            f"{name!r} is not a plugin name: lower-case letters, digits, '-' or '_', starting with a letter (max 40)"
        )
    taken = name_taken(name)
    if taken is not None:
        raise typer.BadParameter(f"{name!r} cannot be a new plugin's name: {taken}; choose another")
    if target.exists() and any(target.iterdir()):
        raise typer.BadParameter(f"{target} exists and is not empty: choose another --dir")
    values = substitutions(name)
    written = []
    for source in sorted(TEMPLATE.rglob("*.tmpl")):
        relative = fill(str(source.relative_to(TEMPLATE).with_suffix("")), values)
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill(source.read_text(), values))
        written.append(path)
    return written


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="The plugin's name: what CLOUD_PROVIDER selects (azure, ovh...).")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write it (default: ./cmbcluster-NAME).")
    ] = None,
) -> None:
    """Write a plugin package for a new cloud: every concern working on this machine, every contract suite
    in its tests, TODOs where your cloud's calls go."""
    target = directory or Path(substitutions(name)["__DIST__"] if _NAME.match(name) else name)
    try:
        written = write_plugin(name, target)
    except typer.BadParameter as exc:
        error(exc.message)
        raise typer.Exit(2) from None
    out(f"wrote {len(written)} files to {target}", markup=False)
    out(f"next: pip install -e '{target}[test]' && (cd {target} && pytest) && cmbcluster plugins", markup=False)
