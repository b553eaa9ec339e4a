"""The target kinds: one registry line each.

``KINDS`` maps a recipe's ``kind:`` to ``"package:DECLARATION"``. The package's
``__init__`` imports only pydantic and :mod:`pipeline.targets.base`, so reading
every declaration (to build the recipe's target union, the CI runner map, the eval
runtime choice) costs milliseconds; planners and stage code are imported when
used, like lm-evaluation-harness's lazy registry.

Adding a kind: write ``pipeline/targets/<kind>/`` (settings class + declaration in
``__init__.py``, a ``plan.py`` with the planner) and add one line here. A package outside
this repository adds one with no edit here: an entry point in the ``quantforge.kinds`` group
(``copy = "my_pkg:DECLARATION"`` under ``[project.entry-points."quantforge.kinds"]`` in its
pyproject), read when the registry is first used.
"""

from __future__ import annotations

import difflib
import importlib
from functools import lru_cache
from typing import Callable

from pipeline.targets.base import ArtifactFormat, KindDeclaration

KINDS: dict[str, str] = {
    "gptq": "pipeline.targets.compressed:GPTQ",
    "awq": "pipeline.targets.compressed:AWQ",
    "autoround": "pipeline.targets.compressed:AUTOROUND",
    "fp8": "pipeline.targets.compressed:FP8",
    "gguf": "pipeline.targets.gguf:GGUF",
    "tensorrt": "pipeline.targets.tensorrt:TENSORRT",
    "budget": "pipeline.targets.budget:BUDGET",
}


ENTRY_POINT_GROUP = "quantforge.kinds"


@lru_cache(maxsize=1)
def registered() -> dict[str, str]:
    """Every kind: the ones above, then those installed packages declare as entry points
    (a plugin cannot replace a built-in kind: the built-in one wins, and it is an error)."""
    from importlib.metadata import entry_points

    out = dict(KINDS)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in KINDS:
            raise RuntimeError(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) names a built-in kind; rename it")
        out[ep.name] = ep.value
    return out


def unknown_kind_message(kind: str) -> str:
    kinds = registered()
    close = difflib.get_close_matches(str(kind), list(kinds), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown target kind {kind!r}{hint}; known kinds: {', '.join(kinds)}"


@lru_cache(maxsize=None)
def declaration(kind: str) -> KindDeclaration:
    kinds = registered()
    if kind not in kinds:
        raise KeyError(unknown_kind_message(kind))
    module, _, attr = kinds[kind].partition(":")
    decl = getattr(importlib.import_module(module), attr)
    assert decl.kind == kind, f"{kinds[kind]} declares kind {decl.kind!r}, registered as {kind!r}"
    return decl


def declarations() -> list[KindDeclaration]:
    return [declaration(k) for k in registered()]


def settings_classes() -> list[type]:
    return [d.settings for d in declarations()]


def planner_for(kind: str) -> Callable:
    module, _, attr = declaration(kind).planner.partition(":")
    return getattr(importlib.import_module(module), attr)


def artifact_format(artifact_kind: str) -> ArtifactFormat | None:
    """The declared format of an artifact kind (gptq, gguf, tensorrt-checkpoint, ...)."""
    for decl in declarations():
        for fmt in decl.formats:
            if fmt.kind == artifact_kind:
                return fmt
    return None


def ci_runner_classes() -> dict[str, str]:
    """kind -> CI runner class, for scripts/ci_matrix.py."""
    return {d.kind: d.ci_runner for d in declarations()}
