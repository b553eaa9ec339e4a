from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.executor_options import Address, Executor, executor_for
from pipeline.cli.verbosity import Quiet, Verbose, apply as apply_verbosity
from pipeline.cli.tables import TerminalUi
from pipeline.cli.common import ArtifactsDir, Device, RecipeArg, Targets, TrackingUri, exits, log

app = typer.Typer()


@app.command()
def run(
    recipe: Path = RecipeArg,
    target: list[str] = Targets,
    device: str = Device,
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 3 when an artifact fails its gates."),
    no_register: bool = typer.Option(False, "--no-register", help="Build and evaluate only."),
    artifacts_dir: Path = ArtifactsDir,
    executor: str = Executor,
    address: str = Address,
    tracking_uri: str = TrackingUri,
    verbose: int = Verbose,
    quiet: bool = Quiet,
) -> None:
    """Build, evaluate and register: the whole recipe in one command (-t: build only those targets)."""
    from pipeline.workflow import run_all

    apply_verbosity(verbose, quiet)
    with exits(), executor_for(recipe, executor, address):
        raise typer.Exit(run_all(recipe, artifacts_dir, device, fail_on_gate, not no_register, tracking_uri, log=log,
                                   targets=target or None, ui=TerminalUi()))
