"""The promotion policy: which registered-model aliases point where, and when they move.

Aliases, per registered model ``<model_name>-<target>[-<variant>]`` (one per artifact):

``candidate``
    the version of the content this build made (the newest registered build's bytes).
``production`` (the recipe's ``registry.promotion_alias``)
    the newest version whose gates **passed on every required device** with none
    pending (:attr:`GateResult.promotable`); a build that fails or is still pending
    leaves it where it was.
``recommended-<device>``
    the one artifact to ship on that device: the recipe's per-device recommendation
    (:mod:`evals.policy`: the smallest or fastest artifact whose gate checks pass
    there). Exactly one registered model of the recipe holds it: setting it on the
    recommended artifact's version removes it from the recipe's other models. When
    nothing passes on a device, it stays where it was.

``champion``
    a person's choice (set in MLflow's UI or API): quantforge never sets, moves or removes it,
    and refuses a recipe whose ``registry.promotion_alias`` is that name.

With ``QUANTFORGE_PROMOTE=false`` (CI builds of pull requests and side branches) no
alias moves; versions, metrics and tags are still registered.

The decision is a pure function of the merged report (every job's part, see
:mod:`pipeline.registry.parts`) and the canonical version of each artifact, so any
job that sees all parts computes the same aliases; :func:`decide` re-applies the
eval job's own gate and recommendation functions to the merged per-device results,
so results from devices evaluated by different jobs are judged together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.core.report import ArtifactReport, Report

CANDIDATE_ALIAS = "candidate"
#: Promoted by people only: never in a plan of quantforge's (see plan_aliases).
CHAMPION_ALIAS = "champion"
RECOMMENDED_PREFIX = "recommended-"


def recommended_alias(device: str) -> str:
    return f"{RECOMMENDED_PREFIX}{device}"


def promotion_enabled() -> bool:
    """False when QUANTFORGE_PROMOTE says so: CI builds of pull requests and side branches
    register their versions but must not move any alias."""
    return os.environ.get("QUANTFORGE_PROMOTE", "true").strip().lower() not in ("0", "false", "no", "off")


def recipe_of(report: Report):
    """The validated recipe the report was built from (None for reports without recipe_config)."""
    from pipeline.recipe import Recipe

    if not report.recipe_config:
        return None
    try:
        return Recipe.model_validate(report.recipe_config)
    except Exception:  # noqa: BLE001 - a config this version cannot read: keep the report's own decisions
        return None


def decide(report: Report) -> Report:
    """Gates and recommendations re-decided on the report's (merged) per-device results.

    The function the eval job runs (``evals.policy.judge``), so a report merged from
    several devices' jobs is judged as if one job had evaluated every device. Returns a
    new report.
    """
    from evals.policy import judge

    out = report.model_copy(deep=True)
    recipe = recipe_of(out)
    if recipe is None:
        return out
    judge(out, recipe)
    return out


def recommended_on(report: Report, artifact: str) -> dict[str, bool]:
    """device -> is this artifact the recommendation there (for tags)."""
    return {d: rec.artifact == artifact for d, rec in sorted(report.recommendations.items())}


@dataclass(frozen=True)
class AliasMove:
    model: str
    alias: str
    version: str | None  # None: remove the alias from this model
    why: str


def plan_aliases(report: Report, versions: dict[str, tuple[str, str]], recipe_models: list[str], promotion_alias: str) -> list[AliasMove]:
    """The alias state the merged report asks for.

    ``versions``: artifact name -> (registered model, canonical version) for artifacts
    registered so far; ``recipe_models``: every registered model of this recipe (the
    ones that may hold a ``recommended-<device>`` alias to be removed).
    """
    if promotion_alias == CHAMPION_ALIAS:
        raise ValueError(f"@{CHAMPION_ALIAS} is promoted by people only; quantforge does not move it")
    moves: list[AliasMove] = []
    for a in report.built():
        if a.name not in versions:
            continue
        model, version = versions[a.name]
        moves.append(AliasMove(model, CANDIDATE_ALIAS, version, "the content of this build"))
        if a.gates is not None and a.gates.promotable:
            moves.append(AliasMove(model, promotion_alias, version, "gates passed on every required device"))
    for device, rec in sorted(report.recommendations.items()):
        if not rec.artifact or rec.artifact not in versions:
            continue  # nothing passes there (or it is not registered yet): the alias stays
        model, version = versions[rec.artifact]
        alias = recommended_alias(device)
        moves.append(AliasMove(model, alias, version, f"recommended on {device}"))
        moves += [AliasMove(other, alias, None, f"{rec.artifact} is recommended on {device}") for other in recipe_models if other != model]
    return moves


def gate_word(passed: bool | None) -> str:
    return "true" if passed is True else ("false" if passed is False else "pending")


def gate_tags(a: ArtifactReport) -> dict[str, str]:
    """Gate results as tags: overall, per device, pending devices."""
    g = a.gates
    if g is None:
        return {"gate.status": "-", "gate.passed": "pending", "gate.pending_devices": "-"}
    return {
        "gate.status": g.status,
        "gate.passed": gate_word(g.passed),
        "gate.pending_devices": ",".join(g.pending_devices) or "-",
        **{f"gate.{d}.passed": gate_word(p) for d, p in g.per_device().items()},
    }


def apply_aliases(client: Any, moves: list[AliasMove], log: Callable[[str], Any]) -> int:
    """Make MLflow hold the planned aliases; returns how many changed. Each move is an upsert
    (or a delete) repeated when it loses a race with another job setting the same alias."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.tracking import retry_races

    if not promotion_enabled():
        if moves:
            log("register: QUANTFORGE_PROMOTE=false (e.g. a pull request build): no alias moved")
        return 0
    changed = 0
    current: dict[str, dict[str, str]] = {}
    for m in moves:
        if m.model not in current:
            try:
                current[m.model] = {k: str(v) for k, v in (client.get_registered_model(m.model).aliases or {}).items()}
            except MlflowException:
                current[m.model] = {}
        have = current[m.model].get(m.alias)
        if m.version is None:
            if have is None:
                continue
            try:
                retry_races(client.delete_registered_model_alias, m.model, m.alias)
            except MlflowException as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
            current[m.model].pop(m.alias, None)
            log(f"register: @{m.alias} removed from {m.model} v{have} ({m.why})")
        else:
            if have == str(m.version):
                continue
            retry_races(client.set_registered_model_alias, m.model, m.alias, str(m.version))
            current[m.model][m.alias] = str(m.version)
            log(f"register: @{m.alias} -> {m.model} v{m.version} (was {'v' + have if have else 'unset'}; {m.why})")
        changed += 1
    return changed
