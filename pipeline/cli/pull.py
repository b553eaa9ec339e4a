"""`quantforge pull RECIPE`: fetch a registered build (report.json + artifact files) from the tracking server.

For CI jobs on another machine (an eval job on a GPU runner): the build jobs registered
their artifacts; this brings the merged report and the registered files into the local
store, verified against their manifests, so `quantforge eval` and `quantforge register`
run there as if the build had run locally.

The command calls ``pipeline.workflow.run_pull``; its body (logic lives in pipeline.registry)::

    def run_pull(recipe_path: Path, artifacts_dir: Path, tracking_uri: str | None, log: Log) -> int:
        from pipeline.registry import pull_report

        loaded = load_recipe(recipe_path, check_source=False)
        pull_report(loaded.recipe.name, artifacts_dir, tracking_uri, recipe_sha256=loaded.recipe.sha256(), log=log)
        return EXIT_OK
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, TrackingUri, exits, log

app = typer.Typer()


@app.command()
def pull(
    recipe: Path = typer.Argument(..., help="The recipe YAML whose registered build to fetch (its name and sha256 pick the build run)."),
    artifacts_dir: Path = ArtifactsDir,
    tracking_uri: str = TrackingUri,
) -> None:
    """Download a registered build's report.json and artifact files into the local store (verified, idempotent)."""
    from pipeline.workflow import run_pull

    with exits():
        raise typer.Exit(run_pull(recipe, artifacts_dir, tracking_uri, log=log))
