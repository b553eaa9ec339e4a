"""Options shared by commands, and the one place that turns errors into exit codes."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from typer.core import TyperArgument, TyperCommand

from pipeline.cli.tables import make_console
from pipeline.errors import EXIT_INVALID_INPUT, EXIT_STAGE_FAILED, QuantforgeError

console = make_console()
err_console = make_console(stderr=True)

RecipeArg = typer.Argument(..., help="The recipe YAML.", metavar="RECIPE", show_default=False)
ArtifactsDir = typer.Option(
    Path("artifacts"), "--artifacts-dir", metavar="DIR", envvar="QUANTFORGE_ARTIFACTS", show_envvar=True,
    help="Where the store, reports and the local MLflow store live.",
)
TrackingUri = typer.Option(
    None, "--tracking-uri", metavar="URI", envvar="MLFLOW_TRACKING_URI", show_envvar=True,
    help="MLflow tracking URI; unset: a SQLite store under the artifacts dir.",
)
Targets = typer.Option(None, "--target", "-t", metavar="NAME", help="Only this target (repeatable).")
Device = typer.Option(
    "auto", "--device", "-d", metavar="DEVICE",
    help="cpu, cuda, a GPU class the recipe names (h100, ...), or auto: every device of the recipe that is here.",
)
Json = typer.Option(False, "--json", help="Print JSON (for scripts and CI summaries) instead of tables.")


class ListArgCommand(TyperCommand):
    """A command whose list arguments show their element type in help (``RECIPE... <path>``):
    typer prints the Python annotation of a list argument (``<list[Path]>``)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            desc = getattr(p, "type_descriptor", None)
            if isinstance(p, TyperArgument) and desc is not None and desc.is_list:
                from typing import get_args

                label = f"<{p._bare_type(get_args(desc.annotation)[0]).lower()}>"
                p.display_type = p.display_type_rich = lambda ctx, label=label: label
        return params


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
    except OSError as exc:
        from pipeline.core.runner import disk_full

        if not disk_full(exc):
            raise
        err_console.print(f"error: the disk is full ({exc}); free space (or use another --artifacts-dir) and run again",
                          markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None


def log(msg: str) -> None:
    console.print(msg, markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()


def print_json(data) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
