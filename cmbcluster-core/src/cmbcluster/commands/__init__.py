"""Command groups of the ``cmbcluster`` CLI that have grown beyond a few lines.

Each module holds one group as a ``typer.Typer`` named ``app``; ``cmbcluster.cli`` adds it.
What they share (printing, the validated configuration) is in :mod:`cmbcluster.commands.common`.
"""
