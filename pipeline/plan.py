"""Recipe -> ordered stages, with what each consumes and produces.

The plan is pure: it imports no heavy library and runs nothing, so
`quantforge plan` is fast and shows hit/miss and skip reasons before any work.
Target kinds plug in through :mod:`pipeline.targets` (lazy lookup by kind).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pipeline.recipe import LoadedRecipe
from pipeline.core.stage import Stage

SOURCE_STAGE = "source"
CHECK_TEXT_CHARS = 200_000
CALIBRATION_STAGE = "calibration"


@dataclass
class PlanContext:
    """What target modules need to plan their stages."""

    loaded: LoadedRecipe
    artifacts_dir: Path
    source_stage: str = SOURCE_STAGE
    calibration_stage: str | None = CALIBRATION_STAGE

    @property
    def recipe(self):
        return self.loaded.recipe

    @cached_property
    def check_text(self) -> str:
        """Held-out text of the recipe's own eval suite, for checks inside build stages
        (tokenizer equality after GGUF conversion, a breakage bound on ModelOpt exports):
        build code reads what the recipe names, never a corpus of its own."""
        from pipeline.data.suites import load_suite

        spec = self.recipe.evals
        return load_suite(spec.suite, base_dir=self.loaded.path.parent, column=spec.column).text[:CHECK_TEXT_CHARS]


@dataclass
class Plan:
    loaded: LoadedRecipe
    stages: list[Stage] = field(default_factory=list)

    def by_name(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}

    def select(self, targets: list[str] | None) -> list[Stage]:
        """Stages needed for the given targets (all when None), in order, with their inputs."""
        if not targets:
            return list(self.stages)
        known = {s.target for s in self.stages if s.target}
        unknown = [t for t in targets if t not in known]
        if unknown:
            from pipeline.errors import InvalidInput

            raise InvalidInput(f"unknown target(s) {', '.join(unknown)}; this recipe has: {', '.join(sorted(known))}")
        index = self.by_name()
        wanted: set[str] = set()

        def add(name: str) -> None:
            if name in wanted:
                return
            wanted.add(name)
            for upstream in index[name].inputs.values():
                add(upstream)

        for s in self.stages:
            if s.target in targets:
                add(s.name)
        return [s for s in self.stages if s.name in wanted]


def make_plan(loaded: LoadedRecipe, artifacts_dir: Path) -> Plan:
    from pipeline.data.calibration import calibration_stage
    from pipeline.sources import source_stage
    from pipeline.targets import planner_for

    recipe = loaded.recipe
    ctx = PlanContext(loaded=loaded, artifacts_dir=Path(artifacts_dir))
    plan = Plan(loaded=loaded)
    plan.stages.append(source_stage(loaded))
    if recipe.calibration is not None:
        plan.stages.append(calibration_stage(loaded, SOURCE_STAGE))
    else:
        ctx.calibration_stage = None
    for target in recipe.targets:
        plan.stages.extend(planner_for(target.kind)(target, ctx))
    names = [s.name for s in plan.stages]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"stage names repeat: {dupes}"
    return plan
