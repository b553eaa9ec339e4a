"""What each CLI command does, so commands only parse arguments.

Each function returns the process exit code (see pipeline.errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED, InvalidInput
from pipeline.recipe import LoadedRecipe, load_recipe
from pipeline.report import read_report, report_path

Log = Callable[[str], None]


def validate_all(paths: list[Path]) -> list[LoadedRecipe]:
    """Validate every file; raise one InvalidInput carrying every problem of every file."""
    loaded, problems = [], []
    for p in paths:
        try:
            loaded.append(load_recipe(p))
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems)
    return loaded


def plan_rows(recipe_path: Path, artifacts_dir: Path, targets: list[str] | None):
    from pipeline.build import plan_status
    from pipeline.plan import make_plan

    loaded = load_recipe(recipe_path)
    return plan_status(make_plan(loaded, artifacts_dir), artifacts_dir, targets)


def run_build(recipe_path: Path, artifacts_dir: Path, targets: list[str] | None, log: Log) -> int:
    from pipeline.build import build
    from pipeline.summary import print_build_summary, stage_progress

    artifacts_dir = Path(artifacts_dir).resolve()
    loaded = load_recipe(recipe_path)
    with stage_progress() as progress:
        report, results = build(loaded, artifacts_dir, targets, log=log, progress=progress)
    print_build_summary(report, results, report_path(artifacts_dir, loaded.recipe.name))
    return EXIT_STAGE_FAILED if any(r.status == "failed" for r in results.values()) else EXIT_OK


def run_eval(recipe_path: Path, artifacts_dir: Path, device: str, fail_on_gate: bool, log: Log) -> int:
    from evals.present import print_eval_tables
    from evals.run import evaluate
    from pipeline.build import ensure_source

    loaded = load_recipe(recipe_path)
    if read_report(report_path(artifacts_dir, loaded.recipe.name)) is None:
        raise InvalidInput(f"no report for {loaded.recipe.name!r} under {artifacts_dir}: run `quantforge build {recipe_path}` (or `quantforge pull`) first")
    ensure_source(loaded, artifacts_dir, log)
    report = evaluate(loaded, artifacts_dir, device, log=log)
    print_eval_tables(report)
    failed = [a.name for a in report.artifacts if a.gates.get("passed") is False]
    if failed:
        log(f"gates failed: {', '.join(failed)}")
        if fail_on_gate:
            return EXIT_GATE_FAILED
    return EXIT_OK


def run_register(path: Path, artifacts_dir: Path, tracking_uri: str | None, log: Log) -> int:
    from pipeline.registry import register_report

    if path.suffix == ".json":
        rpath = path
    else:
        loaded = load_recipe(path, check_source=False)
        rpath = report_path(artifacts_dir, loaded.recipe.name)
    if not rpath.is_file():
        raise InvalidInput(f"{rpath} not found: build (and evaluate) before registering")
    register_report(rpath, tracking_uri, log=log)
    return EXIT_OK


def run_pull(recipe_path: Path, artifacts_dir: Path, tracking_uri: str | None, log: Log) -> int:
    from pipeline.registry import pull_report

    loaded = load_recipe(recipe_path, check_source=False)
    pull_report(loaded.recipe.name, artifacts_dir, tracking_uri, recipe_sha256=loaded.recipe.sha256(), log=log)
    return EXIT_OK


def run_all(recipe_path: Path, artifacts_dir: Path, device: str, fail_on_gate: bool, register: bool, tracking_uri: str | None, log: Log) -> int:
    code = run_build(recipe_path, artifacts_dir, None, log)
    eval_code = run_eval(recipe_path, artifacts_dir, device, fail_on_gate, log)
    if code != EXIT_OK:
        log("a stage failed: nothing is registered for this build (fix it and run again; built stages are cached)")
        return code
    if register:
        run_register(recipe_path, artifacts_dir, tracking_uri, log)
    name = load_recipe(recipe_path, check_source=False).recipe.name
    log(f"done: report {report_path(artifacts_dir, name)}" + ("; browse the registry with `make ui`" if register and not tracking_uri else ""))
    return eval_code
