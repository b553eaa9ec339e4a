#!/usr/bin/env python3
"""Decide what CI builds and where: recipes -> GitHub Actions matrices (JSON).

    scripts/ci_matrix.py RECIPE...                  # these recipes
    scripts/ci_matrix.py --all                      # every recipes/*.yaml (schedule, workflow_dispatch)
    scripts/ci_matrix.py --changed-files FILE       # recipes among the paths in FILE (push, pull_request)
    scripts/ci_matrix.py --github-event             # in a workflow: decide from the event (below)
    scripts/ci_matrix.py ... --github-output PATH   # also append key=<json> lines for $GITHUB_OUTPUT

Prints one JSON object::

    {"recipes":  [{"recipe": "recipes/demo.yaml", "name": "demo", "devices": ["cpu"], "required_devices": ["cpu"]}],
     "build":    {"include": [{"recipe": ..., "name": "demo", "target": "gguf", "kind": "gguf", "runs_on": "ubuntu-latest"}, ...]},
     "eval":     {"include": [{"recipe": ..., "name": "demo", "device": "cpu", "runs_on": "ubuntu-latest"}, ...]},
     "finalize": {"include": [recipes whose gates need more than one device]},
     "has_builds": true, "has_finalize": false}

``--github-event`` reads ``$GITHUB_EVENT_NAME`` and the event payload at
``$GITHUB_EVENT_PATH`` (never values pasted into a script) and picks:

* ``schedule``: every recipe; ``workflow_dispatch``: the ``recipes`` input
  (space-separated paths), else every recipe;
* ``pull_request`` from this repository: recipes changed between the base and
  the head (``git diff base...head``); from a fork: none (no secrets there, and
  untrusted code must not reach self-hosted GPU runners);
* ``push`` to the default branch: recipes changed since ``before`` (every
  recipe on a new branch or when ``before`` is not in the history); a push to
  another branch: none (its pull request builds it);
* none at all when ``$QF_CI_HAVE_TRACKING`` is not ``true`` (no tracking
  server configured: validate only).

It adds ``reason`` and ``promote`` (``true`` only on the default branch and on
``schedule``): pull-request builds must not move the promotion alias.

One build job per (recipe, target), on the runner labels of the runner class the
target's kind declares (``ci_runner`` in ``pipeline/targets/<kind>/__init__.py``);
one eval job per (recipe, device in ``evals.devices``), on the device's labels.
The labels come from ``.github/runners.yml`` (the only place they are written).
Recipes are read with quantforge's own loader, so defaults (``evals.devices``
is ``[cpu]`` when unset) are the product's. Exit 2 on an invalid recipe, an
unknown target kind, or a matrix over GitHub's 256-job limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_MATRIX_JOBS = 256  # GitHub Actions' limit per matrix


class MatrixError(Exception):
    pass


def load_runners(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    for key in ("build", "eval"):
        if not isinstance(data.get(key), dict):
            raise MatrixError(f"{path}: missing '{key}:' section")
    if not isinstance(data["build"].get("classes"), dict) or not isinstance(data["eval"].get("devices"), dict):
        raise MatrixError(f"{path}: needs build.classes and eval.devices mappings")
    return data


def _labels(value: Any, where: str) -> Any:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise MatrixError(f"runner labels for {where} must be a string or a non-empty list of strings, got {value!r}")


def build_labels(runners: dict, kind: str) -> Any:
    """Labels for building a kind: its declared runner class, mapped by runners.yml."""
    from pipeline.targets import ci_runner_classes

    runner_class = ci_runner_classes().get(kind)
    if runner_class is None:
        raise MatrixError(f"unknown target kind {kind!r}")
    classes = runners["build"]["classes"]
    if runner_class not in classes:
        raise MatrixError(f"target kind {kind!r} builds on runner class {runner_class!r}, which .github/runners.yml build.classes lacks (has: {', '.join(sorted(classes))})")
    return _labels(classes[runner_class], f"build.classes.{runner_class}")


def eval_labels(runners: dict, device: str) -> Any:
    devices = runners["eval"]["devices"]
    if device in devices:
        return _labels(devices[device], f"eval.devices.{device}")
    default = runners["eval"].get("gpu_class_default")
    if default is None:
        raise MatrixError(f"no runner for eval device {device!r} in .github/runners.yml eval.devices and no gpu_class_default")
    default = _labels(default, "eval.gpu_class_default")
    if isinstance(default, str):
        return default.replace("{device}", device)
    return [label.replace("{device}", device) for label in default]


def select_recipes(args: argparse.Namespace, recipes_dir: Path) -> list[Path]:
    if args.all:
        return _all_recipes(recipes_dir)
    if args.changed_files:
        return _recipes_in(Path(args.changed_files).read_text().splitlines(), recipes_dir)
    return [Path(r) for r in args.recipes]


ZERO_SHA = "0" * 40


def _git_changed(*rev_args: str) -> list[str] | None:
    """Paths changed between revisions (deleted files excluded), or None if git can't tell."""
    import subprocess

    try:
        out = subprocess.run(["git", "diff", "--name-only", "--no-renames", "--diff-filter=d", *rev_args],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [line for line in out.stdout.splitlines() if line.strip()]


def _recipes_in(paths: list[str], recipes_dir: Path) -> list[Path]:
    root = recipes_dir.resolve()
    picked = set()
    for rel in paths:
        rel = rel.strip()
        if not rel or Path(rel).suffix not in (".yaml", ".yml"):
            continue
        p = Path(rel) if Path(rel).is_absolute() else Path.cwd() / rel
        # Only recipes directly in the recipes folder; deleted ones have nothing to build.
        if p.resolve().parent == root and p.is_file():
            picked.add(Path(rel))
    return sorted(picked)


def _all_recipes(recipes_dir: Path) -> list[Path]:
    return sorted(p for p in recipes_dir.glob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def from_github_event(recipes_dir: Path, environ: dict[str, str] | None = None) -> tuple[list[Path], str, bool]:
    """(recipes to build, why, promote?) for the workflow run described by the environment."""
    env = os.environ if environ is None else environ
    event = env.get("GITHUB_EVENT_NAME", "")
    payload: dict[str, Any] = {}
    if env.get("GITHUB_EVENT_PATH"):
        payload = json.loads(Path(env["GITHUB_EVENT_PATH"]).read_text())
    repo = payload.get("repository") or {}
    default_ref = f"refs/heads/{repo.get('default_branch')}" if repo.get("default_branch") else None
    ref = payload.get("ref") or env.get("GITHUB_REF", "")
    on_default = event == "schedule" or (default_ref is not None and ref == default_ref)
    if env.get("QF_CI_HAVE_TRACKING", "").lower() != "true":
        return [], "no MLFLOW_TRACKING_URI secret: validate only (see docs/ci.md)", False
    if event == "schedule":
        return _all_recipes(recipes_dir), "schedule: every recipe", True
    if event == "workflow_dispatch":
        wanted = str((payload.get("inputs") or {}).get("recipes") or "").split()
        if not wanted:
            return _all_recipes(recipes_dir), "workflow_dispatch: every recipe", on_default
        missing = [w for w in wanted if not Path(w).is_file()]
        if missing:
            raise MatrixError(f"workflow_dispatch input recipes: no such file {', '.join(missing)}")
        return sorted({Path(w) for w in wanted}), "workflow_dispatch: the recipes asked for", on_default
    if event == "pull_request":
        pr = payload.get("pull_request") or {}
        head_repo = ((pr.get("head") or {}).get("repo") or {}).get("full_name")
        if head_repo != repo.get("full_name"):
            return [], f"pull request from {head_repo or 'a fork'}: validate only (no secrets, no self-hosted runners for fork code)", False
        base, head = (pr.get("base") or {}).get("sha"), (pr.get("head") or {}).get("sha")
        changed = _git_changed(f"{base}...{head}") if base and head else None
        if changed is None:
            return _all_recipes(recipes_dir), "pull_request: git could not diff base...head, so every recipe", False
        return _recipes_in(changed, recipes_dir), f"pull_request: recipes changed in {base[:12]}...{head[:12]}", False
    if event == "push":
        if not on_default:
            return [], f"push to {ref}: validate only (its pull request builds it)", False
        before, after = payload.get("before") or "", payload.get("after") or "HEAD"
        if not before or before == ZERO_SHA:
            return _all_recipes(recipes_dir), "push: new branch, every recipe", True
        changed = _git_changed(before, after)
        if changed is None:
            return _all_recipes(recipes_dir), f"push: {before[:12]} is not in the history (force push?), every recipe", True
        return _recipes_in(changed, recipes_dir), f"push: recipes changed in {before[:12]}..{after[:12]}", True
    return [], f"event {event or '(none)'}: validate only", False


def make_matrices(recipe_paths: list[Path], runners: dict) -> dict[str, Any]:
    from pipeline.errors import InvalidInput
    from pipeline.validation import load_recipe

    recipes, builds, evals, finalize = [], [], [], []
    seen_names: dict[str, str] = {}
    problems: list[str] = []
    for path in recipe_paths:
        try:
            # The validate step checks sources; here only the recipe's shape matters.
            recipe = load_recipe(path, check_source=False).recipe
        except InvalidInput as exc:
            problems.append(str(exc))
            continue
        rel = path.as_posix()
        if recipe.name in seen_names:
            problems.append(f"{rel}: recipe name {recipe.name!r} is also used by {seen_names[recipe.name]} (one report and experiment per name)")
            continue
        seen_names[recipe.name] = rel
        required = list(recipe.gates.required_devices or recipe.evals.devices)
        entry = {"recipe": rel, "name": recipe.name, "devices": list(recipe.evals.devices), "required_devices": required}
        recipes.append(entry)
        for t in recipe.targets:
            try:
                builds.append({"recipe": rel, "name": recipe.name, "target": t.name, "kind": t.kind, "runs_on": build_labels(runners, t.kind)})
            except MatrixError as exc:
                problems.append(f"{rel}: targets.{t.name}: {exc}")
        for d in recipe.evals.devices:
            evals.append({"recipe": rel, "name": recipe.name, "device": d, "runs_on": eval_labels(runners, d)})
        if len(required) > 1:
            # Parallel eval jobs can't see each other's results: one job after all of them
            # pulls the merged report and re-decides promotion (see docs/ci.md).
            finalize.append({"recipe": rel, "name": recipe.name, "runs_on": eval_labels(runners, "cpu")})
    for label, rows in (("build", builds), ("eval", evals)):
        if len(rows) > MAX_MATRIX_JOBS:
            problems.append(f"the {label} matrix has {len(rows)} jobs, over GitHub's limit of {MAX_MATRIX_JOBS}: split the recipes across runs")
    if problems:
        raise MatrixError("\n".join(problems))
    return {
        "recipes": recipes,
        "build": {"include": builds},
        "eval": {"include": evals},
        "finalize": {"include": finalize},
        "has_builds": bool(builds),
        "has_finalize": bool(finalize),
    }


def github_output_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for key, value in result.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = " ".join(value.split())  # one line: a newline would end the output value
        else:
            text = json.dumps(value, separators=(",", ":"))
        out.append(f"{key}={text}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", help="recipe files (default: none, unless --all or --changed-files)")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--all", action="store_true", help="every recipe in --recipes-dir")
    pick.add_argument("--changed-files", metavar="FILE", help="a file listing changed paths (git diff --name-only); picks the recipes among them")
    pick.add_argument("--github-event", action="store_true", help="decide from $GITHUB_EVENT_NAME and the payload at $GITHUB_EVENT_PATH")
    ap.add_argument("--recipes-dir", default="recipes", type=Path)
    ap.add_argument("--runners", default=REPO / ".github" / "runners.yml", type=Path, help="runner label mapping (default: .github/runners.yml)")
    ap.add_argument("--github-output", metavar="PATH", help="append key=<json> lines to this file ($GITHUB_OUTPUT)")
    ap.add_argument("--indent", type=int, default=None)
    args = ap.parse_args(argv)
    if (args.all or args.changed_files or args.github_event) and args.recipes:
        ap.error("give recipe files, or --all, or --changed-files, or --github-event, not several")
    try:
        runners = load_runners(args.runners)
        reason, promote = "recipes named on the command line", False
        if args.github_event:
            paths, reason, promote = from_github_event(args.recipes_dir)
        else:
            paths = select_recipes(args, args.recipes_dir)
            reason = "every recipe" if args.all else "changed recipes" if args.changed_files else reason
        result = make_matrices(paths, runners)
        result["reason"] = reason
        result["promote"] = promote
    except (MatrixError, OSError, ValueError) as exc:
        print(f"ci_matrix: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=args.indent))
    if args.github_output:
        with open(args.github_output, "a") as f:
            f.write("\n".join(github_output_lines(result)) + "\n")
    names = ", ".join(r["name"] for r in result["recipes"]) or "none"
    print(f"ci_matrix: {reason}: recipes: {names}; {len(result['build']['include'])} build job(s), "
          f"{len(result['eval']['include'])} eval job(s), {len(result['finalize']['include'])} finalize job(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
