"""`quantforge pull RECIPE`: fetch a registered build (report.json + artifact files) from the tracking server.

For CI jobs on another machine (an eval job on a GPU runner): the build jobs registered
their artifacts; this brings the merged report and the registered files into the local
store, verified against their manifests, so `quantforge eval` and `quantforge register`
run there as if the build had run locally.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, TrackingUri, exits, log

app = typer.Typer()


@app.command()
def pull(
    recipe: Path = typer.Argument(..., metavar="RECIPE", show_default=False, help="The recipe YAML whose registered build to fetch (its name and sha256 pick the build run)."),
    artifacts_dir: Path = ArtifactsDir,
    tracking_uri: str = TrackingUri,
) -> None:
    """Download a registered build's report.json and artifact files into the local store (verified, idempotent)."""
    from pipeline.workflow import run_pull

    with exits():
        raise typer.Exit(run_pull(recipe, artifacts_dir, tracking_uri, log=log))
