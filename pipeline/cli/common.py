"""Options shared by commands, and the one place that turns errors into exit codes."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from pipeline.errors import EXIT_INVALID_INPUT, QuantforgeError
from pipeline.cli.tables import make_console

console = make_console()
err_console = make_console(stderr=True)

RecipeArg = typer.Argument(..., help="Path to the recipe YAML.", show_default=False)
ArtifactsDir = typer.Option(Path(os.environ.get("QUANTFORGE_ARTIFACTS", "artifacts")), "--artifacts-dir", help="Where the store, reports and the local MLflow store live.")
TrackingUri = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store under the artifacts dir).")


@contextmanager
def exits() -> Iterator[None]:
    """Print a QuantforgeError the way users should see it and exit with its code."""
    try:
        yield
    except QuantforgeError as exc:
        from rich.text import Text

        label = "invalid input" if exc.exit_code == EXIT_INVALID_INPUT else "error"
        for line in str(exc).splitlines() or [label]:
            # The message is plain text: rich markup would eat "[a-z0-9]" in a pattern, say.
            err_console.print(Text(f"{label}: ", style="red") + Text(line), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def log(msg: str) -> None:
    console.print(msg, markup=False, soft_wrap=True)
    sys.stdout.flush()
