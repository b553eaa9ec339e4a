from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import RecipeArg, console, exits

app = typer.Typer()


@app.command()
def validate(recipe: list[Path] = RecipeArg) -> None:
    """Check recipes; report every problem at once as FILE:LINE: path: message (exit 2)."""
    from pipeline.workflow import validate_all

    with exits():
        for loaded in validate_all(recipe):
            console.print(f"ok: {loaded.path} ({len(loaded.recipe.targets)} targets, sha256 {loaded.recipe.sha256()[:12]})")
