from __future__ import annotations

import json

import typer

app = typer.Typer()


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editor completion)."""
    from pipeline.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
