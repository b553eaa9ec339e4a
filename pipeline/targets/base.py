"""What every target kind declares, readable without importing any heavy library.

A kind is one package, ``pipeline/targets/<kind>/``, whose ``__init__`` holds its
recipe settings class (a :class:`TargetBase`) and a :class:`KindDeclaration`: what
it needs (calibration), which artifact formats it writes, which runtimes serve
them, which runtime quantforge evaluates each format with on each device class,
and which CI runner class builds it. The package's ``plan`` module (imported only
when a plan is made) turns one recipe target into stages; its stage code imports
torch, llm-compressor, llama.cpp or ModelOpt only when a stage runs.

Capabilities are data, as in Olive's ``olive_config.json``: the recipe's target
union, the CI runner map and the eval runtime choice are all read from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from pipeline.spec import NAME_MAX, NAME_PATTERN, GateOverride, Strict

GroupSize = Union[Annotated[int, Field(ge=1)], Literal["channel"]]


@dataclass(frozen=True)
class CheckContext:
    """What a kind's static checks may look at: the recipe and, when it is reachable, the source's config.json."""

    recipe: Any  # pipeline.recipe.Recipe
    index: int  # the target's position in `targets:` (problems are located under targets.<index>)
    source_config: dict | None  # None when the source cannot be inspected here (a hub model offline)


#: A problem found by a check: (YAML path below the recipe root, message).
Found = tuple[tuple, str]


class TargetBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    gates: GateOverride | None = None

    def needs_calibration(self) -> bool:
        """Whether this target (with these settings) reads the recipe's calibration data."""
        return True

    def problems(self, ctx: CheckContext) -> list[Found]:
        """Static checks that span fields or need the source's shape; every problem at once.

        Runs in ``quantforge validate`` and before any plan, so a CI validate job
        refuses exactly what a build job would. Paths are absolute YAML paths
        (``("targets", ctx.index, "group_size")``).
        """
        return []


@dataclass(frozen=True)
class ArtifactFormat:
    """One kind of artifact a target writes, and who runs it."""

    kind: str  # the artifact kind in report.json (gptq, gguf, tensorrt-checkpoint, ...)
    #: serving stacks that load it, for model cards and docs (not all have an eval adapter)
    serves_with: tuple[str, ...]
    #: device class ("cpu" or "cuda") -> eval runtimes to try, in order (names in evals.runtimes)
    eval_runtimes: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class KindDeclaration:
    kind: str
    settings: type[TargetBase]
    planner: str  # "module:function" -> list[Stage]; imported only when planning
    summary: str
    formats: tuple[ArtifactFormat, ...]
    #: the runner class CI builds it on: a key of build.classes in .github/runners.yml, which maps classes
    #: to runner labels (data: a new class is a line there, tests/ci checks every kind's class is one)
    ci_runner: str
    libraries: tuple[str, ...] = field(default=())  # Python distributions its stages import
    #: the distributions a build of this kind cannot do without, and the quantforge extra that
    #: installs them (`pip install 'quantforge[<extra>]'`; `make setup` installs every extra)
    requires: tuple[str, ...] = field(default=())
    extra: str = ""

    def missing(self) -> str | None:
        """Why this kind cannot build here (its extra is not installed), or None."""
        from importlib.metadata import PackageNotFoundError, version

        absent = []
        for dist in self.requires:
            try:
                version(dist)
            except PackageNotFoundError:
                absent.append(dist)
        if not absent:
            return None
        return (f"kind {self.kind!r} needs {', '.join(absent)}, not installed here: "
                f"pip install 'quantforge[{self.extra}]' (make setup installs every extra)")
