"""`quantforge`: the app assembles one typer app per command module."""

from __future__ import annotations

import typer

from pipeline.cli import build, eval, plan, pull, register, report, run, schema, validate

app = typer.Typer(
    name="quantforge",
    help="Build quantized artifacts from one checkpoint, evaluate them per device, register them in MLflow.\n\n"
    "Exit codes: 0 ok, 1 a stage failed (or the registry was unreachable), 2 invalid input, 3 a gate failed "
    "(with --fail-on-gate), 4 the model hub could not be reached (validate: the checks that need the model's "
    "config.json were skipped, and are named).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
for module in (validate, schema, plan, build, eval, register, pull, run, report):
    app.add_typer(module.app)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"quantforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Build quantized artifacts from one checkpoint, evaluate them per device, register them in MLflow."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
