"""``cmbcluster images build | push``: the deployment's container images (:mod:`cmbcluster.images`),
for the active infra provider's registry.

The registry host and repository prefix come from the infra provider's ``registry()``
(ECR on AWS, Artifact Registry on GCP); ``push`` logs in with its short-lived
``registry_login()`` (an ECR authorization token, a Google access token), passed to
``docker login --password-stdin`` so it never appears on a command line.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from cmbcluster import __version__
from cmbcluster.commands.common import out, resolve_config, warning
from cmbcluster.errors import ConfigurationError, InvalidRequest, ProviderUnavailable
from cmbcluster.images import IMAGE_NAMES, IMAGES, ImageSpec, image_ref
from cmbcluster.interfaces import InfraProvider

app = typer.Typer(help="Build and push the control plane and environment images.", no_args_is_help=True)


Tag = Annotated[str, typer.Option(help="Image tag (default: this version of cmbcluster-core).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the docker commands instead of running them.")]
Only = Annotated[
    list[str] | None, typer.Option("--image", help="Only this image (repeatable): controlplane, environment.")
]
Source = Annotated[
    Path, typer.Option("--source", help="The repository checkout holding helm/images (the controlplane build context).")
]


def build_argv(spec: ImageSpec, ref: str, source: Path, platform: str) -> list[str]:
    return ["docker", "build", "--file", str(source / spec.dockerfile), "--tag", ref, "--platform", platform,
            str(source / spec.context)]  # fmt: skip


def _selected(only: list[str] | None) -> list[ImageSpec]:
    unknown = sorted(set(only or []) - set(IMAGES))
    if unknown:
        raise InvalidRequest(f"unknown image {', '.join(unknown)}: choose from {', '.join(IMAGES)}")
    return [spec for name, spec in IMAGES.items() if not only or name in only]


def _check_tag(tag: str) -> str:
    # Docker's tag grammar: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    if not tag or len(tag) > 128 or tag[0] in ".-" or not all(c.isalnum() or c in "_.-" for c in tag):
        raise InvalidRequest(f"{tag!r} is not a valid image tag")
    return tag


@contextlib.contextmanager
def _infra() -> Iterator[tuple[str, InfraProvider]]:
    """The active infra provider's name and instance, closed when the command is done."""
    config = resolve_config()
    infra = config.create(config.infra)
    try:
        yield config.infra.name, infra
    finally:
        infra.close()


def _run(argv: list[str], *, dry_run: bool, input_text: str | None = None, shown: str | None = None) -> None:
    out(("would run: " if dry_run else "+ ") + (shown or shlex.join(argv)), highlight=False, soft_wrap=True,
        markup=False)  # fmt: skip
    if dry_run:
        return
    executable = shutil.which(argv[0])
    if executable is None:
        raise ProviderUnavailable(
            f"`{argv[0]}` is not installed or not on PATH: install Docker, or use --dry-run to print the commands"
        )
    try:
        completed = subprocess.run([executable, *argv[1:]], input=input_text, text=True, check=False,
                                   capture_output=input_text is not None)  # fmt: skip
    except OSError as exc:
        raise ProviderUnavailable(f"could not run {argv[0]}: {exc}") from None
    if completed.returncode != 0:
        detail = (completed.stderr or "").strip().splitlines()[-3:] if completed.stderr else []
        raise ProviderUnavailable(
            f"`{shown or shlex.join(argv[:3])}` failed (exit {completed.returncode})"
            + (": " + " | ".join(detail) if detail else "")
        )


@app.command()
def build(
    tag: Tag = __version__,
    dry_run: DryRun = False,
    image: Only = None,
    source: Source = Path(),
    platform: Annotated[str, typer.Option(help="Target platform of the images.")] = "linux/amd64",
) -> None:
    """docker build each image, tagged for the active infra provider's registry."""
    specs = _selected(image)
    _check_tag(tag)
    with _infra() as (_provider, infra):
        registry = infra.registry()
    for spec in specs:
        dockerfile = source / spec.dockerfile
        if not dockerfile.is_file():
            if not dry_run:
                raise ConfigurationError([f"{dockerfile} not found: run from the repository root or pass --source"])
            warning(f"{dockerfile} does not exist (yet)")
        _run(build_argv(spec, image_ref(registry, spec.name, tag), source, platform), dry_run=dry_run)


@app.command()
def push(tag: Tag = __version__, dry_run: DryRun = False, image: Only = None) -> None:
    """Log in to the registry with the infra provider's short-lived token, then docker push each image."""
    specs = _selected(image)
    _check_tag(tag)
    with _infra() as (provider, infra):
        registry = infra.registry()
        login = infra.registry_login()  # read-only; also proves the credentials work before any push
    if login.username:
        argv = ["docker", "login", "--username", login.username, "--password-stdin", registry.host]
        # The token goes on standard input; the printed form only says where it comes from.
        shown = f"<{provider} registry token> | {shlex.join(argv)}"
        _run(argv, dry_run=dry_run, input_text=login.password + "\n", shown=shown)
    for spec in specs:
        _run(["docker", "push", image_ref(registry, spec.name, tag)], dry_run=dry_run)


__all__ = ["IMAGE_NAMES", "app"]
