"""A target kind that lives outside quantforge: a plain safetensors copy of the source.

It stands for any third-party package: quantforge finds it through the ``quantforge.kinds``
entry point in its ``.dist-info`` (what pip writes for ``[project.entry-points."quantforge.kinds"]``
``copy = "quantforge_copykind:COPY"``), with no edit to quantforge. Trivial on purpose: the
test is about the registry, so the artifact is the source's own files, which every runtime
that loads the source loads too.
"""

from __future__ import annotations

import shutil
from typing import Literal

from pipeline.core.stage import ArtifactInfo, Stage
from pipeline.targets.base import ArtifactFormat, KindDeclaration, TargetBase

MODEL_FILES = (".json", ".safetensors", ".jinja", ".txt", ".model")


class CopyTarget(TargetBase):
    """A copy of the source model's files.

    Example::

        - {name: copy, kind: copy}
    """

    kind: Literal["copy"]

    def needs_calibration(self) -> bool:
        return False


def run_copy(ctx) -> dict:
    source = ctx.input("source").model_dir
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix in MODEL_FILES and f.name != "manifest.json":
            shutil.copy2(f, ctx.out_dir / f.name)
            copied.append(f.name)
    ctx.log(f"copied {len(copied)} files from {source}")
    return {"files": copied}


def plan(target, ctx) -> list[Stage]:
    return [Stage(name=f"{target.name}/copy", kind="plugin-copy", version="1", params={}, run=run_copy,
                  inputs={"source": ctx.source_stage}, target=target.name, description="a copy of the source",
                  artifact=ArtifactInfo(name=target.name, target=target.name, kind="copy", format="safetensors copy",
                                        runtimes=("transformers",)))]


COPY = KindDeclaration(
    kind="copy",
    settings=CopyTarget,
    planner="quantforge_copykind:plan",
    summary="a copy of the source (a plugin kind)",
    formats=(ArtifactFormat(kind="copy", serves_with=("transformers",),
                            eval_runtimes={"cpu": ("transformers",), "cuda": ("transformers",)}),),
    ci_runner="cpu",
)
