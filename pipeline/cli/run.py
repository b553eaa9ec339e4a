from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.executor_options import Address, Executor, executor_for
from pipeline.cli.common import ArtifactsDir, Device, RecipeArg, TrackingUri, exits, log

app = typer.Typer()


@app.command()
def run(
    recipe: Path = RecipeArg,
    device: str = Device,
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 3 when an artifact fails its gates."),
    no_register: bool = typer.Option(False, "--no-register", help="Build and evaluate only."),
    artifacts_dir: Path = ArtifactsDir,
    executor: str = Executor,
    address: str = Address,
    tracking_uri: str = TrackingUri,
) -> None:
    """Build, evaluate and register: the whole recipe in one command."""
    from pipeline.workflow import run_all

    with exits(), executor_for(recipe, executor, address):
        raise typer.Exit(run_all(recipe, artifacts_dir, device, fail_on_gate, not no_register, tracking_uri, log=log))
