"""Where a plan's stages run: this process (``local``, the default) or a Ray cluster (``ray``).

quantforge has no scheduler of its own: on a cluster each stage becomes a Ray task, Ray
places it (CPUs, GPUs, memory) and retries it when its worker dies, and the stages
themselves run exactly the code they run locally (:func:`pipeline.core.runner.run_stage`),
through the same store. This module is light (no Ray import): it holds the choice,
made once by the CLI (``--executor``/``--address``, else the recipe's ``execution:``),
and what each stage asks the cluster for.

The choice is ambient (a context variable) rather than an argument threaded through
build, eval and the source check: every ``execute()`` under ``with using(choice):`` runs on
it, and code that never heard of executors keeps working unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import InvalidInput
# What a stage asks the cluster for lives beside the Ray executor's imports, not above them.
from pipeline.executors.resources import ExecutorChoice, task_resources  # noqa: F401 - part of this package's API

EXECUTORS = ("local", "ray")
#: Resource groups besides the recipe's target names: what `execution.resources` may name.
GROUPS = ("source", "calibration", "eval")


_CURRENT: contextvars.ContextVar[ExecutorChoice | None] = contextvars.ContextVar("quantforge_executor", default=None)


def current() -> ExecutorChoice | None:
    return _CURRENT.get()


@contextlib.contextmanager
def using(choice: ExecutorChoice | None) -> Iterator[ExecutorChoice | None]:
    """Run every ``execute()`` inside on `choice` (None or local: this process)."""
    token = _CURRENT.set(choice)
    try:
        yield choice
    finally:
        _CURRENT.reset(token)


def choose(recipe, executor: str | None, address: str | None, where: str = "the recipe") -> ExecutorChoice:
    """The executor for one command: the flag, else the recipe's ``execution.executor``, else local.
    `recipe` is the typed recipe (pipeline.recipe.Recipe); `where` names it in errors.

    An address (``--address``, the recipe's, or ``RAY_ADDRESS``) means a cluster to join; without
    one Ray starts a local cluster in this process's lifetime. Bad values exit 2 naming what is wrong.
    """
    if executor is not None and executor not in EXECUTORS:
        raise InvalidInput(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    spec = recipe.execution
    name = executor or (spec.executor if spec is not None else "local")
    if name == "local":
        if address:
            raise InvalidInput(f"--address {address!r} needs --executor ray (the local executor runs stages in this process)")
        return ExecutorChoice()
    kinds = {t.name: t.kind for t in recipe.targets}
    resources = {k: dict(v) for k, v in (spec.resources if spec is not None else {}).items()}
    unknown = [k for k in resources if k not in kinds and k not in GROUPS]
    if unknown:
        raise InvalidInput(f"{where}: execution.resources names {', '.join(map(repr, unknown))}, which is not a target of "
                           f"this recipe nor one of {', '.join(GROUPS)}; targets: {', '.join(kinds)}")
    _ray_installed()
    return ExecutorChoice(
        executor=name,
        address=address or (spec.address if spec is not None else None) or os.environ.get("RAY_ADDRESS") or None,
        target_kinds=kinds,
        resources=resources,
        workers=spec.workers if spec is not None else None,
        max_retries=spec.max_retries if spec is not None else 3,
    )


def _ray_installed() -> None:
    from importlib.util import find_spec

    if find_spec("ray") is None:
        raise InvalidInput("--executor ray needs Ray on this machine and on every node of the cluster: pip install 'quantforge[ray]'")


def execute(stages, artifacts_dir: Path, log=print, keys: dict[str, str] | None = None, logs_dir: Path | None = None,
            progress=None, inputs=None):
    """Run `stages` with the executor chosen by :func:`using` (this process, stage after stage, when
    none was chosen: the local executor, :func:`pipeline.core.runner.execute`)."""
    from pipeline.core.runner import execute as execute_here, stage_keys

    chosen = current()
    if chosen is None or chosen.executor == "local":
        return execute_here(stages, artifacts_dir, log=log, keys=keys, logs_dir=logs_dir, progress=progress, inputs=inputs)
    from pipeline.executors.ray_executor import execute_on_ray

    return execute_on_ray(chosen, stages, Path(artifacts_dir), log, keys or stage_keys(stages), logs_dir, progress, inputs or {})
