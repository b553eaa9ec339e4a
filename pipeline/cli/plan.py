from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import ArtifactsDir, Device, Json, RecipeArg, Targets, console, exits, print_json

app = typer.Typer()


@app.command()
def plan(
    recipe: Path = RecipeArg,
    target: list[str] = Targets,
    device: str = Device,
    json_: bool = Json,
    artifacts_dir: Path = ArtifactsDir,
) -> None:
    """Show the build and eval stages a run would execute, with cache hit/miss and skip reasons."""
    from pipeline.cli.tables import plan_table
    from pipeline.workflow import plan_rows

    with exits():
        rows = plan_rows(recipe, artifacts_dir, target or None, device)
        if json_:
            print_json([{"stage": s.name, "kind": s.kind, "key": key, "status": status.split(":", 1)[0],
                         "reason": status.split(":", 1)[1].strip() if ":" in status else None, "what": s.description}
                        for s, key, status in rows])
        else:
            from evals.present import fit_width

            width = fit_width(console)
            console.print(plan_table(rows, width), width=width)
