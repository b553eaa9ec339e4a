"""-v / -q of the commands that run stages (build, eval, run).

Every stage writes its libraries' output and its own messages to ``<artifacts>/<recipe>/logs/<stage>.log``;
these options choose what the terminal shows of it.
"""

from __future__ import annotations

import typer

Verbose = typer.Option(0, "--verbose", "-v", count=True,
                       help="Also show each stage's messages and its libraries' output (always in the stage's log file).")
Quiet = typer.Option(False, "--quiet", "-q", help="Show only failures and the final tables.")


def apply(verbose: int, quiet: bool) -> None:
    """The runner's verbosity: -1 quiet, 0 one line per stage, 1 everything."""
    if verbose and quiet:
        raise typer.BadParameter("-v and -q together")
    from pipeline.core.runner import set_verbosity

    set_verbosity(-1 if quiet else min(verbose, 1))
