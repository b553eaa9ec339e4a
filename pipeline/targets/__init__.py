"""Target kinds, looked up lazily by name so the CLI starts without heavy imports.

Each module exposes ``plan_stages(target, ctx: PlanContext) -> list[Stage]``;
the stages' run functions import torch, llm-compressor, llama.cpp or ModelOpt
only when they run.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

PLANNERS: dict[str, str] = {
    "gptq": "pipeline.targets.gptq:plan_stages",
    "awq": "pipeline.targets.awq:plan_stages",
    "fp8": "pipeline.targets.fp8:plan_stages",
    "gguf": "pipeline.targets.gguf:plan_stages",
    "tensorrt": "pipeline.targets.tensorrt:plan_stages",
}


def planner_for(kind: str) -> Callable:
    if kind not in PLANNERS:
        close = difflib.get_close_matches(kind, PLANNERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown target kind {kind!r}{hint}; known: {', '.join(PLANNERS)}")
    module, attr = PLANNERS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return _not_available(kind)


def _not_available(kind: str) -> Callable:
    """A kind whose module this installation lacks: plan it as skipped, with the reason."""
    from pipeline.stage import ArtifactInfo, Stage

    def plan(target, ctx):
        return [
            Stage(
                name=f"{target.name}/{kind}",
                kind=kind,
                version="0",
                params={},
                run=None,
                target=target.name,
                artifact=ArtifactInfo(name=target.name, target=target.name, kind=kind),
                skip_reason=f"target kind {kind!r} is not built by this version of quantforge yet",
            )
        ]

    return plan
