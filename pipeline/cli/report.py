from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, Json, console, exits, print_json

app = typer.Typer()


@app.command()
def report(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML, or its report.json.", show_default=False),
    device: str = typer.Option(None, "--device", "-d", metavar="DEVICE", help="Only this device's results."),
    format_: str = typer.Option("table", "--format", "-f", metavar="FORMAT",
                                help="table (fitted to the terminal), markdown, csv or json: the results table's rows."),
    wide: bool = typer.Option(False, "--wide", "-w", help="Every column, whatever the terminal's width."),
    json_: bool = Json,
    artifacts_dir: Path = ArtifactsDir,
) -> None:
    """Print the results table again from report.json (no model is loaded, nothing is run).

    --json prints the whole report; --format json only the table's rows (numbers, not text).
    A device the report has no entry for is an error (exit 2).
    """
    from evals.present import FORMATS
    from pipeline.errors import InvalidInput
    from pipeline.workflow import load_report

    with exits():
        if format_ not in FORMATS:
            raise InvalidInput(f"--format {format_!r}: choose one of {', '.join(FORMATS)}")
        rep = load_report(recipe, artifacts_dir)
        if device and device not in rep.devices:
            have = ", ".join(rep.devices) or "none"
            raise InvalidInput(f"the report of {rep.recipe!r} has no results for device {device!r} (devices it has: {have}); "
                               f"evaluate there with `quantforge eval RECIPE --device {device}`")
        devices = [device] if device else None
        if json_:
            data = rep.model_dump(mode="json")
            if device:
                data["baseline"] = {k: v for k, v in data["baseline"].items() if k == device}
                data["devices"] = {k: v for k, v in data["devices"].items() if k == device}
                data["recommendations"] = {k: v for k, v in data["recommendations"].items() if k == device}
                for a in data["artifacts"]:
                    a["evals"] = {k: v for k, v in (a.get("evals") or {}).items() if k == device}
            print_json(data)
            return
        from evals import present

        if format_ == "json":
            print_json(present.json_rows(rep, devices))
        elif format_ == "csv":
            typer.echo(present.csv_text(rep, devices), nl=False)
        elif format_ == "markdown":
            typer.echo(present.markdown(rep, devices))
        else:
            present.render(rep, console, devices=devices, wide=wide)
