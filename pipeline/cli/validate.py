from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import Json, console, exits, print_json

app = typer.Typer()


@app.command()
def validate(
    recipe: list[Path] = typer.Argument(..., metavar="RECIPE...", help="Recipe YAML files.", show_default=False),
    json_: bool = Json,
) -> None:
    """Check recipes; report every problem at once as FILE:LINE: path: message (exit 2)."""
    from pipeline.errors import EXIT_INVALID_INPUT, InvalidInput
    from pipeline.workflow import validate_report

    with exits():
        result, problems = validate_report(recipe)
        if json_:
            print_json(result)
            if problems:
                raise typer.Exit(EXIT_INVALID_INPUT)
            return
        if problems:
            raise InvalidInput(problems)
        for r in result["recipes"]:
            console.print(f"ok: {r['file']} ({r['targets']} targets, sha256 {r['sha256'][:12]})", markup=False)
