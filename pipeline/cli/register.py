from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, TrackingUri, exits, log

app = typer.Typer()


@app.command()
def register(
    recipe: Path = typer.Argument(..., metavar="RECIPE", show_default=False, help="The recipe YAML, or a report.json (a CI job with only the report and artifacts)."),
    artifacts_dir: Path = ArtifactsDir,
    tracking_uri: str = TrackingUri,
) -> None:
    """Register the report's builds, evals and artifacts in MLflow (idempotent)."""
    from pipeline.workflow import run_register

    with exits():
        raise typer.Exit(run_register(recipe, artifacts_dir, tracking_uri, log=log))
