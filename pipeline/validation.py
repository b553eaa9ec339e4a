"""Every static check of a recipe, in one pass: what ``validate`` runs and what a build refuses.

:func:`load_recipe` parses the file (:func:`pipeline.recipe.parse_recipe`: YAML,
duplicate keys, types), then collects, all at once and each located at its YAML
path and line:

* checks that span fields (unique target names, calibration where a target needs
  it, gate devices among the eval devices);
* the source's own checks (a builtin name, a local folder or GGUF file that exists
  and is what it claims), and its config where it can be read here (a hub model
  that is not in the local cache is checked when it is downloaded);
* every target kind's checks (:meth:`TargetBase.problems`), with that config;
* data checks: the calibration and eval text exist, sizes fit the model.

The planner relies on these having passed and raises nothing of its own for bad
input, so ``quantforge validate`` and ``quantforge plan`` refuse the same recipes
(a test runs every shipped and broken recipe through both).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InvalidInput, Problem
from pipeline.recipe import LoadedRecipe, parse_recipe
from pipeline.targets.base import CheckContext


def load_recipe(path: str | Path, check_source: bool = True) -> LoadedRecipe:
    """Parse and check a recipe; raise InvalidInput carrying every problem found.

    ``check_source=False`` skips what needs the source model (for commands that work
    from report.json alone, such as ``register`` on a machine without the model).
    """
    loaded = parse_recipe(path)
    problems = recipe_problems(loaded, check_source=check_source)
    if problems:
        raise InvalidInput(problems)
    return loaded


def recipe_problems(loaded: LoadedRecipe, check_source: bool = True) -> list[Problem]:
    recipe = loaded.recipe
    problems = cross_field_problems(loaded)
    config = None
    if check_source:
        from pipeline.sources import peek_source_config

        try:
            config = peek_source_config(loaded)
        except InvalidInput as exc:
            problems += [loaded.problem(("source", "model"), p.message) for p in exc.problems]
    for i, target in enumerate(recipe.targets):
        ctx = CheckContext(recipe=recipe, index=i, source_config=config)
        problems += [loaded.problem(loc, msg) for loc, msg in target.problems(ctx)]
    problems += data_problems(loaded, config)
    return _unique(problems)


def cross_field_problems(loaded: LoadedRecipe) -> list[Problem]:
    recipe = loaded.recipe
    problems = []
    seen: dict[str, int] = {}
    for i, t in enumerate(recipe.targets):
        if t.name in seen:
            problems.append(loaded.problem(("targets", i, "name"), f"duplicate target name {t.name!r} (also targets.{seen[t.name]})"))
        else:
            seen[t.name] = i
        if t.needs_calibration() and recipe.calibration is None:
            problems.append(loaded.problem(("targets", i, "kind"), f"target {t.name!r} ({t.kind}) needs calibration data: add a `calibration:` section (e.g. `calibration: {{dataset: builtin}}`)"))
    for j, d in enumerate(recipe.gates.required_devices or []):
        if d not in recipe.evals.devices:
            problems.append(loaded.problem(("gates", "required_devices", j), f"device {d!r} is not in evals.devices {recipe.evals.devices}"))
    return problems


def data_problems(loaded: LoadedRecipe, config: dict | None) -> list[Problem]:
    """The calibration and eval text exist; windows fit the model's positions."""
    from pipeline.data.text import text_source_problem

    recipe = loaded.recipe
    base = loaded.path.parent
    problems = []
    cal = recipe.calibration
    if cal is not None:
        msg = text_source_problem(cal.dataset, base_dir=base, split=cal.split)
        if msg:
            problems.append(loaded.problem(("calibration", "dataset"), msg))
        else:
            problems += _calibration_size_problems(loaded)
    try:
        from pipeline.data.suites import resolve_suite

        spec = resolve_suite(recipe.evals.suite, base_dir=base, column=recipe.evals.column)
        msg = text_source_problem(spec.dataset, base_dir=base, split=spec.split)
        if msg:
            problems.append(loaded.problem(("evals", "suite"), msg))
    except InvalidInput as exc:
        problems += [loaded.problem(("evals", "suite"), p.message.removeprefix("evals.suite: ")) for p in exc.problems]
    if recipe.evals.tasks:
        from evals.tasks import problems as task_problems

        for i, msg in task_problems(recipe.evals.tasks, loaded.path.parent):
            problems.append(loaded.problem(("evals", "tasks") + ((i,) if i is not None else ()), msg))
    limit = _max_positions(config)
    if limit:
        if cal is not None and cal.seq_len > limit:
            problems.append(loaded.problem(("calibration", "seq_len"), f"seq_len {cal.seq_len} exceeds the model's {limit} positions (max_position_embeddings)"))
        if recipe.evals.context > limit:
            problems.append(loaded.problem(("evals", "context"), f"context {recipe.evals.context} exceeds the model's {limit} positions (max_position_embeddings)"))
        longest = max(recipe.evals.speed.prompt_lengths) + recipe.evals.speed.decode_tokens
        if longest > limit:
            problems.append(loaded.problem(("evals", "speed", "prompt_lengths"), f"the longest prompt plus decode_tokens is {longest} tokens, more than the model's {limit} positions"))
    return problems


def _calibration_size_problems(loaded: LoadedRecipe) -> list[Problem]:
    """Local calibration text must parse, and hold at least samples x seq_len characters: no
    tokenizer makes fewer than one character per token, so less text can never be enough
    (the exact token count is checked when the calibration stage tokenizes it)."""
    from pipeline.data.text import is_local, load_texts

    cal = loaded.recipe.calibration
    if not (cal.dataset == "builtin" or is_local(cal.dataset)):
        return []  # a hub dataset: checked when downloaded
    try:
        texts = load_texts(cal.dataset, base_dir=loaded.path.parent, split=cal.split, column=cal.column)
    except InvalidInput as exc:
        return [loaded.problem(("calibration", "dataset"), p.message.removeprefix("calibration.dataset: ")) for p in exc.problems]
    chars = sum(len(t) for t in texts)
    need = cal.samples * cal.seq_len
    if chars < need:
        return [loaded.problem(("calibration", "samples"), f"{cal.samples} samples of {cal.seq_len} tokens need at least {need} characters of "
                                                            f"text; {cal.dataset} has {chars}: lower samples or seq_len, or add data")]
    return []


def _max_positions(config: dict | None) -> int | None:
    if not config:
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _unique(problems: list[Problem]) -> list[Problem]:
    out, seen = [], set()
    for p in problems:
        key = (p.path, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def validate_all(paths: list[Path]) -> tuple[list[tuple[Path, LoadedRecipe]], list[Problem]]:
    """Every file checked as a build checks it: (each file that passed, with its recipe), every problem of every file."""
    loaded, problems = [], []
    for p in paths:
        try:
            loaded.append((p, load_recipe(p)))
        except InvalidInput as exc:
            problems.extend(exc.problems)
    return loaded, problems
