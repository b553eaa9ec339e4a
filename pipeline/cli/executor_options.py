"""`--executor` and `--address`, shared by run, build and eval."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import typer

Executor = typer.Option(
    None, "--executor", metavar="local|ray", show_default=False,
    help="Where stages run: local (this process, the default) or ray (each stage a Ray task). Default: the recipe's execution.executor, else local.",
)
Address = typer.Option(
    None, "--address", metavar="ADDR", show_default=False,
    help="The Ray cluster to join with --executor ray (host:port of its head, or auto: the one started on this machine). Default: the recipe's execution.address, else RAY_ADDRESS, else a local cluster.",
)


@contextlib.contextmanager
def executor_for(recipe: Path, executor: str | None, address: str | None) -> Iterator[None]:
    """Every stage the command runs goes to the chosen executor."""
    from pipeline.executors import choose, using
    from pipeline.validation import load_recipe

    with using(choose(load_recipe(recipe, check_source=False).recipe, executor, address, str(recipe))):
        yield
