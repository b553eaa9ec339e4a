"""The build job: plan a recipe, run its build stages, merge the results into report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pipeline
from pipeline.plan import Plan, make_plan
from pipeline.core.report import ArtifactReport, SourceReport, StageRecord, report_path, updating
from pipeline.core.runner import StageResult, stage_keys
from pipeline.executors import execute
from pipeline.errors import StageFailed
from pipeline.recipe import LoadedRecipe

Log = Callable[[str], None]
#: what a stage's result may say about the artifact it wrote (see write_build_report)
ARTIFACT_FIELDS = ("kind", "variant", "format", "runtimes", "bits", "group_size")


# ------------------------------------------------------------------ build command
def build(loaded: LoadedRecipe, artifacts_dir: Path, targets: list[str] | None = None, log: Log = print, progress=None):
    """Build the recipe's targets (or some of them) and merge the results into report.json.

    `progress(total)` may return a per-stage callback (the CLI's progress bar).
    """
    artifacts_dir = Path(artifacts_dir)
    plan = make_plan(loaded, artifacts_dir)
    stages = plan.select(targets)
    keys = stage_keys(plan.stages)
    recipe = loaded.recipe
    on_stage = progress(len(stages)) if progress else None
    results = execute(stages, artifacts_dir, log=log, keys=keys, logs_dir=artifacts_dir / recipe.name / "logs", progress=on_stage)
    return write_build_report(loaded, artifacts_dir, plan, results), results


def ensure_source(loaded: LoadedRecipe, artifacts_dir: Path, log: Log = print) -> None:
    """Make the source model present on this machine and point report.source at it.

    An eval job on another runner pulled the artifacts but not the source: the
    source stage is cached (a hit here, or a download or the demo training).
    """
    from pipeline.sources import source_stage

    rpath = report_path(artifacts_dir, loaded.recipe.name)
    with updating(rpath, loaded.recipe.name) as report:
        if report.source and report.source.path and Path(report.source.path).is_dir():
            return
        result = execute([source_stage(loaded)], Path(artifacts_dir), log=log)["source"]
        if result.output is None:
            raise StageFailed(f"the source model is not available here: {result.reason}")
        here = result.output.result.get("fingerprint")
        if report.source is not None and report.source.fingerprint and here and here != report.source.fingerprint:
            # Comparing artifacts with a different model would give confident, wrong numbers.
            raise StageFailed(
                f"the source model here (fingerprint {here[:12]}) is not the one the artifacts were built from "
                f"({report.source.fingerprint[:12]}); evaluate where that model is available, or rebuild"
            )
        if report.source is None:
            report.source = SourceReport(model=loaded.recipe.source.model, revision=loaded.recipe.source.revision, dtype=loaded.recipe.source.dtype)
        report.source.path = str(result.output.model_dir)
        report.source.fingerprint = report.source.fingerprint or result.output.result.get("fingerprint", result.key)


def write_build_report(loaded: LoadedRecipe, artifacts_dir: Path, plan: Plan, results: dict[str, StageResult]):
    from evals.bits import bits_fields

    recipe = loaded.recipe
    with updating(report_path(artifacts_dir, recipe.name), recipe.name) as report:
        if report.recipe_sha256 and report.recipe_sha256 != recipe.sha256():
            # A changed recipe starts a fresh report; old artifacts stay in the store.
            report.artifacts, report.baseline, report.devices, report.stages = [], {}, {}, []
        report.recipe_path = str(loaded.path)
        report.recipe_sha256 = recipe.sha256()
        report.recipe_config = recipe.model_dump(mode="json")
        report.quantforge_version = pipeline.__version__
        report.git_commit = _git_commit(loaded.path.parent)
        src = results.get("source")
        if src and src.output:
            r = src.output.result
            report.source = SourceReport(
                model=recipe.source.model,
                revision=recipe.source.revision,
                commit=r.get("revision") or src.output.manifest["params"].get("commit"),
                fingerprint=r.get("fingerprint", src.key),
                dtype=recipe.source.dtype,
                path=str(src.output.model_dir),
                config=_read_config(src.output.model_dir),
                lineage=r.get("lineage") or {},
                **bits_fields(src.output.model_dir),
            )
        for res in results.values():
            report.tools.update({k: v for k, v in res.stage.tools.items()})
            record = StageRecord(name=res.stage.name, kind=res.stage.kind, key=res.key, status=res.status, seconds=round(res.seconds, 3),
                                 built_seconds=res.output.manifest.get("seconds") if res.output else None,
                                 reason=res.reason, target=res.stage.target,
                                 log=str(res.log_file) if res.log_file and res.status == "failed" else None,
                                 host=res.host, node=res.node, pid=res.pid, started=_iso(res.started), ended=_iso(res.ended))
            report.stages = [s for s in report.stages if s.name != record.name] + [record]
            info = res.stage.artifact
            if info is None or info.internal:
                continue
            entry = ArtifactReport(
                name=info.name,
                target=info.target,
                kind=info.kind,
                variant=info.variant,
                status="built" if res.output else res.status if res.status in ("failed", "skipped") else "planned",
                reason=res.reason,
                format=info.format,
                runtimes=list(info.runtimes),
                bits=info.bits,
                group_size=info.group_size,
                stage_key=res.key,
            )
            if res.output:
                entry.path = str(res.output.path)
                entry.bytes = res.output.manifest.get("bytes")
                entry.content_sha256 = res.output.manifest.get("content_sha256")
                entry.build_seconds = res.output.manifest.get("seconds")
                entry.reason = None
                entry = entry.model_copy(update=bits_fields(res.output.path))
                # A stage that decides what it writes (the budget kind keeps one of its
                # candidates) says so in its result: its format is known after it ran.
                chosen = res.output.result.get("artifact")
                if chosen:
                    entry = entry.model_copy(update={k: v for k, v in chosen.items() if k in ARTIFACT_FIELDS})
            report.upsert_artifact(entry)
        # Targets the recipe no longer has don't linger in the report.
        names = {s.artifact.name for s in plan.stages if s.artifact and not s.artifact.internal}
        report.artifacts = [a for a in report.artifacts if a.name in names]
        return report


def _iso(t: float | None) -> str | None:
    import datetime

    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _read_config(model_dir: Path) -> dict:
    import json

    keep = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "torch_dtype", "dtype")
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: cfg[k] for k in keep if k in cfg}


def _git_commit(where: Path) -> str | None:
    from pipeline.core.proc import ChildFailed, run_tool

    try:
        return run_tool(["git", "rev-parse", "HEAD"], cwd=where, timeout=5, merge=False).strip() or None
    except ChildFailed:  # no git, or not a checkout
        return None
