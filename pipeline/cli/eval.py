from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.verbosity import Quiet, Verbose, apply as apply_verbosity
from pipeline.cli.executor_options import Address, Executor, executor_for
from pipeline.cli.tables import TerminalUi
from pipeline.cli.common import ArtifactsDir, Device, RecipeArg, exits, log

app = typer.Typer()


@app.command(name="eval")
def eval_(
    recipe: Path = RecipeArg,
    device: str = Device,
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 3 when an artifact fails its gates."),
    artifacts_dir: Path = ArtifactsDir,
    verbose: int = Verbose,
    quiet: bool = Quiet,
    executor: str = Executor,
    address: str = Address,
) -> None:
    """Evaluate the source and every built artifact on a device; decide gates."""
    from pipeline.workflow import run_eval

    apply_verbosity(verbose, quiet)
    with exits(), executor_for(recipe, executor, address):
        raise typer.Exit(run_eval(recipe, artifacts_dir, device, fail_on_gate, log=log, ui=TerminalUi()))
