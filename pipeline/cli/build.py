from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.verbosity import Quiet, Verbose, apply as apply_verbosity
from pipeline.cli.executor_options import Address, Executor, executor_for
from pipeline.cli.tables import TerminalUi
from pipeline.cli.common import ArtifactsDir, RecipeArg, Targets, exits, log

app = typer.Typer()


@app.command()
def build(
    recipe: Path = RecipeArg,
    target: list[str] = Targets,
    artifacts_dir: Path = ArtifactsDir,
    verbose: int = Verbose,
    quiet: bool = Quiet,
    executor: str = Executor,
    address: str = Address,
) -> None:
    """Build artifacts (cached: unchanged stages are not rebuilt) and write report.json."""
    from pipeline.workflow import run_build

    apply_verbosity(verbose, quiet)
    with exits(), executor_for(recipe, executor, address):
        raise typer.Exit(run_build(recipe, artifacts_dir, target or None, log=log, ui=TerminalUi()))
