"""`quantforge`: the app assembles one typer app per command module."""

from __future__ import annotations

import typer

from pipeline.cli import build, eval, plan, pull, register, run, schema, validate

app = typer.Typer(
    name="quantforge",
    help="Build quantized artifacts from one checkpoint, evaluate them per device, register them in MLflow.\n\n"
    "Exit codes: 0 ok, 1 a stage failed (or the registry was unreachable), 2 invalid input, 3 a gate failed (with --fail-on-gate).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (validate, schema, plan, build, eval, register, pull, run):
    app.add_typer(module.app)


def main() -> None:
    app()
