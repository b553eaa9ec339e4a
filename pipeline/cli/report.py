from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, Json, console, exits, print_json

app = typer.Typer()


@app.command()
def report(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML, or its report.json.", show_default=False),
    device: str = typer.Option(None, "--device", "-d", metavar="DEVICE", help="Only this device's results."),
    json_: bool = Json,
    artifacts_dir: Path = ArtifactsDir,
) -> None:
    """Print the results table again from report.json (no model is loaded, nothing is run)."""
    from pipeline.workflow import load_report

    with exits():
        rep = load_report(recipe, artifacts_dir)
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
        from evals.present import render

        render(rep, console, devices=[device] if device else None)
