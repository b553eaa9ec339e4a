from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import Json, ListArgCommand, console, err_console, exits, print_json

app = typer.Typer()


@app.command(cls=ListArgCommand)
def validate(
    recipe: list[Path] = typer.Argument(..., metavar="RECIPE", help="Recipe YAML files.", show_default=False),
    json_: bool = Json,
) -> None:
    """Check recipes; report every problem at once as FILE:LINE: path: message (exit 2).

    A hub model's config.json is fetched alone (or read from the hub cache) to check the
    settings against the model's shape; when the hub cannot be reached those checks are
    skipped, named, and the exit code is 4.
    """
    from rich.text import Text

    from pipeline.errors import EXIT_HUB_UNREACHABLE, EXIT_INVALID_INPUT, InvalidInput
    from pipeline.workflow import validate_report

    with exits():
        result, problems = validate_report(recipe)
        skipped = [(r["file"], why) for r in result["recipes"] for why in r["skipped"]]
        if json_:
            print_json(result)
            if problems:
                raise typer.Exit(EXIT_INVALID_INPUT)
            if skipped:
                raise typer.Exit(EXIT_HUB_UNREACHABLE)
            return
        if problems:
            for file, why in skipped:  # other files' checks that could not run: said before the exit
                err_console.print(Text("skipped: ", style="yellow") + Text(f"{file}: {why}"), soft_wrap=True)
            raise InvalidInput(problems)
        for r in result["recipes"]:
            state = "ok" if not r["skipped"] else "ok so far"
            console.print(f"{state}: {r['file']} ({r['targets']} targets, sha256 {r['sha256'][:12]})", markup=False)
        for file, why in skipped:
            err_console.print(Text("skipped: ", style="yellow") + Text(f"{file}: {why}"), soft_wrap=True)
        if skipped:
            raise typer.Exit(EXIT_HUB_UNREACHABLE)
