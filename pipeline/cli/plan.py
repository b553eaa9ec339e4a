from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, RecipeArg, console, exits

app = typer.Typer()


@app.command()
def plan(
    recipe: Path = RecipeArg,
    target: list[str] = typer.Option(None, "--target", "-t", help="Only these targets (repeatable)."),
    device: str = typer.Option("auto", "--device", "-d", help="Devices whose eval stages to show (auto: the recipe's devices that are here)."),
    artifacts_dir: Path = ArtifactsDir,
) -> None:
    """Show the build and eval stages a run would execute, with cache hit/miss and skip reasons."""
    from pipeline.cli.tables import plan_table
    from pipeline.workflow import plan_rows

    with exits():
        console.print(plan_table(plan_rows(recipe, artifacts_dir, target or None, device)))
