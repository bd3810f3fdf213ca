"""Running an external tool (helm) for a provisioning step: one clear error, never a traceback."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence

from cmbcluster.errors import ProviderUnavailable

__all__ = ["run_tool"]


def run_tool(argv: Sequence[str], *, input_text: str | None = None, timeout: float = 1800) -> None:
    """Run ``argv`` to its end; a missing executable, a timeout or a failure is ProviderUnavailable
    with the command's last lines of output."""
    command = shlex.join(argv)
    executable = shutil.which(argv[0])
    if executable is None:
        raise ProviderUnavailable(
            f"`{argv[0]}` is not installed or not on PATH; install it, or rerun with --addons print "
            "to get the commands to run elsewhere"
        )
    try:
        completed = subprocess.run(
            [executable, *argv[1:]], input=input_text, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ProviderUnavailable(f"`{command}` did not finish within {timeout:.0f} s") from None
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise ProviderUnavailable(f"`{command}` failed (exit {completed.returncode}): " + " | ".join(output))
