"""What each CLI command does, so commands only parse arguments.

Each function returns the process exit code (see pipeline.errors).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from pipeline.core.report import read_report, report_path
from pipeline.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED, InvalidInput
from pipeline.recipe import LoadedRecipe
from pipeline.validation import load_recipe

Log = Callable[[str], None]


def validate_report(paths: list[Path]) -> tuple[dict, list]:
    """Every recipe checked: ({"ok", "complete", "recipes": [...], "problems": [...]} for --json, the problems).

    ``complete`` is false when some check could not run (each recipe's ``skipped`` says which and why)."""
    from pipeline.validation import validate_all

    loaded, problems = validate_all(paths)
    recipes = [{"file": str(p), "name": lr.recipe.name, "targets": len(lr.recipe.targets), "sha256": lr.recipe.sha256(),
                "skipped": list(lr.skipped)} for p, lr in loaded]
    result = {"ok": not problems, "complete": not any(r["skipped"] for r in recipes), "recipes": recipes,
              "problems": [{"file": q.file, "line": q.line, "path": q.path, "message": q.message} for q in problems]}
    return result, problems


def report_file(path: Path, artifacts_dir: Path) -> Path:
    """Where the report of a recipe is (the path itself for a report.json)."""
    return Path(path) if Path(path).suffix == ".json" else report_path(artifacts_dir, load_recipe(path, check_source=False).recipe.name)


def load_report(path: Path, artifacts_dir: Path):
    """The report of a recipe (or a report.json path); InvalidInput when there is none yet."""
    rpath = report_file(path, artifacts_dir)
    report = read_report(rpath)
    if report is None:
        raise InvalidInput(f"{rpath} not found: run `quantforge run` (or build and eval) for this recipe first")
    return report


def plan_rows(recipe_path: Path, artifacts_dir: Path, targets: list[str] | None, device: str = "auto"):
    """(stage, key, status) for every build stage and every eval stage, without running anything."""
    from pipeline.plan import make_plan
    from pipeline.core.runner import stage_keys, stage_status

    loaded = load_recipe(recipe_path)
    plan = make_plan(loaded, artifacts_dir)
    stages = plan.select(targets)
    rows = stage_status(stages, artifacts_dir, stage_keys(plan.stages))
    return rows + eval_plan_rows(loaded, artifacts_dir, plan, device, targets)


def eval_plan_rows(loaded: LoadedRecipe, artifacts_dir: Path, plan, device: str, targets: list[str] | None):
    """The eval stages `quantforge eval` would run here. They are keyed by the artifacts'
    content, known once built: artifacts not built yet show as `after build`."""
    from pipeline.backends.devices import resolve_devices
    from evals.stages import eval_context, eval_stages
    from pipeline.core.report import read_report
    from pipeline.core.runner import stage_keys, stage_status
    from pipeline.core.stage import Stage

    recipe = loaded.recipe
    report = read_report(report_path(artifacts_dir, recipe.name))
    built_keys = stage_keys(plan.stages)
    now, pending = resolve_devices(device, recipe.evals.devices)
    artifacts = [(s.artifact.name, built_keys[s.name]) for s in plan.stages
                 if s.artifact and not s.artifact.internal and (not targets or s.target in targets)]
    skipped = _skipped_artifacts(plan.stages)
    rows = []
    for d in now:
        current = None
        if report is not None and report.source is not None and report.source.path:
            current = report.model_copy(deep=True)
            # Only artifacts whose report entry is this plan's build: others are stale.
            keep = {name for name, key in artifacts}
            current.artifacts = [a for a in current.built() if a.name in keep and a.stage_key == dict(artifacts).get(a.name)]
        stages = eval_stages(eval_context(loaded, d), current) if current is not None else []
        done = {s.target for s in stages if s.target}
        stages = [s for s in stages if not targets or s.target is None or s.target in targets]
        rows += stage_status(stages, artifacts_dir, stage_keys(stages))
        for name, _ in artifacts:
            if name not in done:
                # A build skipped here (an engine without TensorRT-LLM, say) is not evaluated after it.
                status = f"skip: its build is skipped ({skipped[name]})" if name in skipped else "after build"
                rows.append((Stage(name=f"eval/{d}/{name}", kind="eval-artifact", version="", params={}, run=None,
                                   description=f"{name} on {d}"), "-" * 12, status))
    for d in pending:
        rows.append((Stage(name=f"eval/{d}/*", kind="eval", version="", params={}, run=None,
                           description=f"every model on {d}"), "-" * 12, f"skip: device {d!r} is not on this machine; its CI eval job runs them"))
    return rows


def _skipped_artifacts(stages) -> dict[str, str]:
    """Artifact name -> why its build stage will not run here (skipped at plan time, or fed by one that is)."""
    why: dict[str, str] = {}
    for s in stages:  # in plan order: inputs come first
        reason = s.skip_reason or next((why[i] for i in s.inputs.values() if i in why), None)
        if reason:
            why[s.name] = reason
    return {s.artifact.name: why[s.name] for s in stages if s.artifact and not s.artifact.internal and s.name in why}


class Ui:
    """What a job shows besides its log lines: stage progress, the build summary, the results
    tables. The CLI hands its terminal one down (pipeline.cli.tables.TerminalUi); this default,
    for callers without a terminal, shows nothing more."""

    def progress(self):
        return contextlib.nullcontext(None)

    def build_summary(self, report, results, path: Path) -> None:
        pass

    def eval_tables(self, report) -> None:
        pass


def run_build(recipe_path: Path, artifacts_dir: Path, targets: list[str] | None, log: Log, ui: Ui = Ui()) -> int:
    return _build(load_recipe(recipe_path), artifacts_dir, targets, log, ui)


def _build(loaded: LoadedRecipe, artifacts_dir: Path, targets: list[str] | None, log: Log, ui: Ui) -> int:
    return _build_results(loaded, artifacts_dir, targets, log, ui)[0]


def _build_results(loaded: LoadedRecipe, artifacts_dir: Path, targets: list[str] | None, log: Log, ui: Ui):
    from pipeline.build import build

    artifacts_dir = Path(artifacts_dir).resolve()
    with ui.progress() as progress:
        report, results = build(loaded, artifacts_dir, targets, log=log, progress=progress)
    ui.build_summary(report, results, report_path(artifacts_dir, loaded.recipe.name))
    return (EXIT_STAGE_FAILED if any(r.status == "failed" for r in results.values()) else EXIT_OK), results


def run_eval(recipe_path: Path, artifacts_dir: Path, device: str, fail_on_gate: bool, log: Log, ui: Ui = Ui()) -> int:
    return _eval(load_recipe(recipe_path), recipe_path, artifacts_dir, device, fail_on_gate, log, ui)


def _eval(loaded: LoadedRecipe, recipe_path: Path, artifacts_dir: Path, device: str, fail_on_gate: bool, log: Log,
          ui: Ui) -> int:
    from evals.run import evaluate
    from pipeline.build import ensure_source

    if read_report(report_path(artifacts_dir, loaded.recipe.name)) is None:
        raise InvalidInput(f"no report for {loaded.recipe.name!r} under {artifacts_dir}: run `quantforge build {recipe_path}` (or `quantforge pull`) first")
    ensure_source(loaded, artifacts_dir, log)
    report = evaluate(loaded, artifacts_dir, device, log=log)
    ui.eval_tables(report)
    broken = [f"{a.name} on {d}" for a in report.built() for d, ev in a.evals.items() if ev.status == "failed"]
    if broken:
        log(f"evaluations failed: {', '.join(broken)} (their reasons are under the table)")
    failed = [a.name for a in report.built() if a.gates is not None and a.gates.passed is False]
    if broken and not fail_on_gate:
        return EXIT_STAGE_FAILED
    if failed:
        log(f"gates failed: {', '.join(failed)}")
        if fail_on_gate:
            return EXIT_GATE_FAILED
    return EXIT_OK


def run_register(path: Path, artifacts_dir: Path, tracking_uri: str | None, log: Log) -> int:
    return _register(report_file(path, artifacts_dir), tracking_uri, log)


def _register(rpath: Path, tracking_uri: str | None, log: Log) -> int:
    from pipeline.registry.register import register_report

    if not rpath.is_file():
        raise InvalidInput(f"{rpath} not found: build (and evaluate) before registering")
    if _registered_already(rpath, tracking_uri):
        log(f"register: nothing changed since the last registration of {rpath} into its local store")
        return EXIT_OK
    register_report(rpath, tracking_uri, log=log)
    _remember_registration(rpath, tracking_uri)
    return EXIT_OK


def _registration_state(rpath: Path, tracking_uri: str | None) -> dict | None:
    """What a registration into the local SQLite store depends on: the report's content and the store
    file itself. None for a tracking server (its state is not ours to know: always register)."""
    import os

    from pipeline.core.report import report_digest
    from pipeline.registry.tracking import local_db, tracking_uri_for

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    db = local_db(tracking_uri_for(rpath.parent.parent))  # the store register_report writes to
    report = read_report(rpath)
    if report is None or not db.is_file():
        return None
    st = db.stat()
    return {"report": report_digest(report), "db": str(db), "db_size": st.st_size, "db_mtime_ns": st.st_mtime_ns}


def _registered_already(rpath: Path, tracking_uri: str | None) -> bool:
    """An unchanged report into an untouched local store: registering again would change nothing
    (and importing mlflow alone takes seconds). A server is always asked."""
    import json

    marker = rpath.parent / ".registered.json"
    state = _registration_state(rpath, tracking_uri)
    try:
        return state is not None and json.loads(marker.read_text()) == state
    except (OSError, ValueError):
        return False


def _remember_registration(rpath: Path, tracking_uri: str | None) -> None:
    import json

    state = _registration_state(rpath, tracking_uri)
    marker = rpath.parent / ".registered.json"
    if state is None:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text(json.dumps(state))


def run_pull(recipe_path: Path, artifacts_dir: Path, tracking_uri: str | None, log: Log) -> int:
    from pipeline.registry.pull import pull_report

    loaded = load_recipe(recipe_path, check_source=False)
    pull_report(loaded.recipe.name, artifacts_dir, tracking_uri, recipe_sha256=loaded.recipe.sha256(), log=log)
    return EXIT_OK


def run_all(recipe_path: Path, artifacts_dir: Path, device: str, fail_on_gate: bool, register: bool, tracking_uri: str | None, log: Log,
            targets: list[str] | None = None, ui: Ui = Ui()) -> int:
    """Build (every target, or `targets`), evaluate, register. A failed target does not stop the
    others: what built is evaluated and registered (the failure is recorded on the build run),
    and the exit code still says a stage failed."""
    loaded = load_recipe(recipe_path)  # once: the checks read the source's config and the calibration text
    rpath = report_path(artifacts_dir, loaded.recipe.name)
    code, results = _build_results(loaded, artifacts_dir, targets, log, ui)
    source = results.get("source")
    if source is not None and source.status == "failed":
        # Evaluating would run the source stage again (to measure the source) and fail the same way.
        log(f"the source failed to build ({source.reason}): nothing to evaluate or register")
        return code
    eval_code = _eval(loaded, recipe_path, artifacts_dir, device, fail_on_gate, log, ui)
    if register:
        _register(rpath, tracking_uri, log)
    log(f"done: report {rpath} (and report.html beside it)")
    if code != EXIT_OK:
        log("a stage failed (see the build table above): the targets that built were evaluated and registered")
        return code
    return eval_code
