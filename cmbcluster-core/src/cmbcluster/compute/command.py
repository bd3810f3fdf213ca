"""An application's command line and variables, as every compute backend runs it.

The catalog stores a command with placeholders; a backend renders it with :func:`render_command`
(the only place they are substituted) and gives the process :func:`standard_variables`:

===================== =================================================================================
``{host}``            the address to listen on: ``127.0.0.1`` locally, ``0.0.0.0`` in a pod
``{port}``            the port to listen on
``{base_url}``        the path the environment is served under, with both slashes:
                      ``/environments/<id>/`` behind the control plane's proxy (and with path routing)
``{token}``           a random token made for this start, which only the control plane's proxy sends
                      (``Authorization: token <token>``). A command line is visible to every user of the
                      machine (``ps``): where the application reads its token from a variable, the rule
                      below passes it that way instead (JupyterLab: ``JUPYTER_TOKEN``)
``{socket}``          a Unix socket to listen on instead of a port, where the backend offers one (the
                      embedded default does: only the server's own user can connect to it)
``{environment_id}``  the environment's id
===================== =================================================================================

Only these names are replaced; other braces (JSON, ``${VAR}``) stay as they are.

:data:`APPLICATION_RULES` holds what CMBCluster knows of a few programs, matched by the
command's program name: the arguments they need when the environment runs as root (JupyterLab
refuses to start as root without ``--allow-root``), the variable they read their token from, and
how to install them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cmbcluster.errors import InvalidRequest

PLACEHOLDERS = ("host", "port", "base_url", "token", "socket", "environment_id")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
#: How the control plane's proxy sends an application its token.
TOKEN_HEADER = "Authorization"  # noqa: S105 - a header's name
TOKEN_SCHEME = "token"  # noqa: S105 - the scheme word before the token
#: What replaces the application's token in the output users see.
REDACTED = "[token]"


def token_headers(token: str) -> dict[str, str]:
    """What a proxy sends an application to pass its ``token`` (none without one)."""
    return {TOKEN_HEADER: f"{TOKEN_SCHEME} {token}"} if token else {}


#: Where the control plane (and path routing) serves environments: each under its id.
ENVIRONMENTS_PATH = "/environments"


def environment_path(environment_id: str) -> str:
    """The path every environment is served under by the control plane (and by path routing)."""
    return f"{ENVIRONMENTS_PATH}/{environment_id}/"


@dataclass(frozen=True, kw_only=True)
class LaunchValues:
    """The values of the placeholders for one start of one environment."""

    environment_id: str
    host: str
    port: int | None
    base_url: str
    token: str = ""
    socket: str | None = None


def placeholders_in(command: Sequence[str]) -> set[str]:
    """The placeholder names a command uses."""
    return {match.group(1) for part in command for match in _PLACEHOLDER.finditer(part)}


def render_command(command: Sequence[str], values: LaunchValues) -> list[str]:
    """The command with its placeholders replaced (see the module's documentation).

    Raises InvalidRequest when the command needs a value the backend does not offer (a Unix
    socket on a backend without them, a port for an application that listens on a socket).
    """
    used = placeholders_in(command)
    if "socket" in used and values.socket is None:
        raise InvalidRequest("this compute backend cannot give an application a Unix socket ({socket} in its command)")
    if "port" in used and values.port is None:
        raise InvalidRequest("an application listens on {port} or on {socket}, not on both")
    replacements = {
        "host": values.host,
        "port": "" if values.port is None else str(values.port),
        "base_url": values.base_url,
        "token": values.token,
        "socket": values.socket or "",
        "environment_id": values.environment_id,
    }
    return [_PLACEHOLDER.sub(lambda match: replacements[match.group(1)], part) for part in command]


@dataclass(frozen=True, kw_only=True)
class ApplicationRule:
    """What CMBCluster knows of one program, found by :func:`rule_for`."""

    #: the command's first words that name the program: ``("jupyter-lab",)``, ``("jupyter", "lab")``
    programs: tuple[tuple[str, ...], ...]
    #: appended to the command when the environment runs as root (uid 0)
    root_arguments: tuple[str, ...] = ()
    #: the variable the program reads its token from (then the token never appears on a command line)
    token_variable: str | None = None
    #: appended where a backend gives no token (Kubernetes: the ingress checks access), so that the
    #: program does not invent one of its own (an empty JUPYTER_TOKEN makes JupyterLab pick one)
    without_token_arguments: tuple[str, ...] = ()
    #: cmbcluster-core's extra that installs the program, for the catalog's "not installed" notice
    extra: str = ""


APPLICATION_RULES: tuple[ApplicationRule, ...] = (
    ApplicationRule(
        programs=(("jupyter-lab",), ("jupyter", "lab"), ("jupyter-server",), ("jupyter", "server")),
        root_arguments=("--allow-root",),
        token_variable="JUPYTER_TOKEN",  # noqa: S106 - the variable's name
        without_token_arguments=("--IdentityProvider.token=",),
        extra="jupyter",
    ),
    ApplicationRule(programs=(("streamlit",),), extra="streamlit"),
)


#: Every variable an application's launch may set (:func:`standard_variables`: the standard ones and
#: the rules' token variables). The launch's value wins, so user settings refuse these names.
LAUNCH_VARIABLES = frozenset(
    {"HOST", "PORT", "CMBCLUSTER_ENVIRONMENT_ID", "CMBCLUSTER_BASE_PATH"}
    | {rule.token_variable for rule in APPLICATION_RULES if rule.token_variable}
)


def rule_for(command: Sequence[str]) -> ApplicationRule | None:
    """The rule of the command's program, matched on its file name (a full path works too)."""
    if not command:
        return None
    words = (Path(command[0]).name, *command[1:])
    for rule in APPLICATION_RULES:
        if any(tuple(words[: len(program)]) == program for program in rule.programs):
            return rule
    return None


def root_arguments(command: Sequence[str]) -> tuple[str, ...]:
    """What to append to the command when the environment runs as root."""
    rule = rule_for(command)
    if rule is None:
        return ()
    return tuple(arg for arg in rule.root_arguments if arg not in command)


def without_token_arguments(command: Sequence[str]) -> tuple[str, ...]:
    """What to append to the command when the backend gives the application no token."""
    rule = rule_for(command)
    if rule is None:
        return ()
    return tuple(arg for arg in rule.without_token_arguments if arg not in command)


def takes_token(command: Sequence[str]) -> bool:
    """Whether the application checks a token (given as {token} or through its own variable)."""
    rule = rule_for(command)
    return "token" in placeholders_in(command) or (rule is not None and rule.token_variable is not None)


def standard_variables(values: LaunchValues, command: Sequence[str]) -> dict[str, str]:
    """The variables every environment gets on every backend (a pod gets the same names), all of
    them in :data:`LAUNCH_VARIABLES`."""
    variables = {
        "HOST": values.host,
        "CMBCLUSTER_ENVIRONMENT_ID": values.environment_id,
        "CMBCLUSTER_BASE_PATH": values.base_url,
    }
    if values.port is not None:
        variables["PORT"] = str(values.port)
    rule = rule_for(command)
    if values.token and rule is not None and rule.token_variable:
        variables[rule.token_variable] = values.token
    return variables


def program_search_path() -> str:
    """Where the server finds programs: its own interpreter's folder first (a virtual environment
    that is not activated still finds what was installed into it), then PATH."""
    own = str(Path(sys.executable).parent)
    rest = [part for part in os.environ.get("PATH", os.defpath).split(os.pathsep) if part and part != own]
    return os.pathsep.join([own, *rest])


def missing_program(command: Sequence[str], search_path: str | None = None) -> str | None:
    """Why the command's program cannot run on this machine, with the fix; None when it can."""
    if not command:
        return "the application has no command"
    program = command[0]
    if "/" in program:
        found = os.access(program, os.X_OK) and Path(program).is_file()
    else:
        found = shutil.which(program, path=search_path or program_search_path()) is not None
    if found:
        return None
    rule = rule_for(command)
    # Every user of the catalog reads this: how to fix it, not where the server's files are.
    if rule is not None and rule.extra:
        extras = ",".join(dict.fromkeys(("jupyter", rule.extra)))  # ./run serve's default is jupyter
        fix = (
            f'an administrator can pip install "cmbcluster-core[{rule.extra}]" into the server\'s Python '
            f"environment (a server started from a clone: CMBCLUSTER_EXTRAS={extras} ./run serve)"
        )
    else:
        fix = "an administrator can install the program that provides it where the server runs"
    return f"{program} is not installed on this server: {fix}, then reload this page"
