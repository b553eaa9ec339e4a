"""The budget kind's stages (:mod:`pipeline.targets.budget` declares it), for a target named ``best``::

    best/candidates/<j>/...        each candidate's own stages (its kind's planner), cached like any build
    best/select/<device>/source    the source on the selection text: reference distributions and token ids
    best/select/<device>/<j>[-Q]   one candidate: its bits from its files, and when within budget its
                                   accuracy against that reference (the eval's own scoring, in a worker)
    best/pick                      the winner's files and selection.json: the artifact

Every stage is keyed by what it depends on, so a rerun, or a new candidate beside old ones,
builds and scores only what is new. A candidate whose configuration equals another
target's builds once: the stage key does not contain the target's name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from evals import table
from pipeline.core.stage import ArtifactInfo, Stage, StageContext
from pipeline.core.store import MANIFEST
from pipeline.errors import InvalidInput, StageFailed

VERSION = "1"
SCORE_VERSION = "2"  # 2: bits compared as the table prints them (two decimals)
SELECTION_FILE = "selection.json"
METRICS = {"kl": ("kl_mean", "kl_mean_err", "mean KL divergence"), "ppl": ("ppl_ratio", "ppl_ratio_err", "perplexity ratio")}


# ------------------------------------------------------------------ planning
def _candidate_stages(target, ctx) -> list[tuple[int, list[Stage]]]:
    """Each candidate (its index, its stages) planned by its own kind, renamed under ``<target>/candidates/<j>/``."""
    from pipeline.targets import planner_for

    planned = []
    for j, cand, errors in target.candidate_targets():
        if cand is None:  # validation refuses this recipe before any plan; a guard for direct callers
            raise InvalidInput(f"targets {target.name!r}: candidate {j}: {errors[0][1]}")
        stages = planner_for(cand.kind)(cand, ctx)
        renames = {s.name: f"{target.name}/candidates/{j}/{s.name.split('/', 1)[1] if '/' in s.name else s.name}" for s in stages}
        for s in stages:
            s.name = renames[s.name]
            s.inputs = {k: renames.get(v, v) for k, v in s.inputs.items()}
            # `build --target best` builds them, and a kind's run function rebuilds its target under this
            # name (a valid target name, which the winner's model card then carries)
            s.target = target.name
            if s.artifact is not None:
                s.artifact = replace(s.artifact, internal=True)
        planned.append((j, stages))
    return planned


def _selection_text(target, ctx) -> tuple[object, int, str]:
    """(suite, windows to skip, how the text was chosen)."""
    from pipeline.data.suites import load_suite

    spec = ctx.recipe.evals
    base = ctx.loaded.path.parent
    if target.selection_suite is not None:
        suite = load_suite(target.selection_suite, base_dir=base, column=spec.column)
        return suite, 0, f"suite {suite.spec.name!r}"
    suite = load_suite(spec.suite, base_dir=base, column=spec.column)
    # The final eval scores the first evals.max_windows windows of this text: selection starts after them.
    return suite, spec.max_windows, f"suite {suite.spec.name!r} after the final eval's {spec.max_windows} windows"


def plan_stages(target, ctx) -> list[Stage]:
    from evals.stages import RuntimeChoice, runtime_tools, choose_runtimes
    from pipeline.backends.devices import fingerprint, fingerprint_hash, present_devices

    stages: list[Stage] = []
    candidates = _candidate_stages(target, ctx)
    for _, cs in candidates:
        stages.extend(cs)
    device = target.device
    absent = None if device in present_devices() else f"device {device!r} is not present here (scoring candidates needs it)"
    fp_hash = fingerprint_hash(fingerprint(device)) if absent is None else None
    suite, skip, how = _selection_text(target, ctx)
    common = {"suite": suite.fingerprint, "context": ctx.recipe.evals.context, "max_windows": target.selection_windows,
              "skip_windows": skip}
    src_choice = choose_runtimes("source", device)
    reference = Stage(
        name=f"{target.name}/select/{device}/source",
        kind="budget-reference",
        version=VERSION,
        params={**common, "accuracy_runtime": src_choice.accuracy},
        inputs={"source": ctx.source_stage},
        run=partial(run_reference, choice=RuntimeChoice(src_choice.accuracy, None, src_choice.reasons), suite_text=suite.text, device=device),
        tools=runtime_tools(src_choice.accuracy),
        device_fingerprint=fp_hash,
        skip_reason=absent or (src_choice.skip_reason if src_choice.accuracy is None else None),
        target=target.name,
        description=f"the source on {device}, {target.selection_windows} windows of {how}",
    )
    stages.append(reference)
    budget = {"max_bpw": target.max_bpw, "max_size_mib": target.max_size_mib}
    picks: dict[str, str] = {}
    labels = []
    for j, cs in candidates:
        for s in cs:
            if s.artifact is None:
                continue
            label = f"{j}-{s.artifact.variant}" if s.artifact.variant else str(j)
            choice = choose_runtimes(s.artifact.kind, device)
            score = Stage(
                name=f"{target.name}/select/{device}/{label}",
                kind="budget-score",
                version=SCORE_VERSION,
                params={**common, **budget, "accuracy_runtime": choice.accuracy, "artifact_kind": s.artifact.kind},
                inputs={"reference": reference.name, "candidate": s.name},
                run=partial(run_score, choice=RuntimeChoice(choice.accuracy, None, choice.reasons), suite_text=suite.text, device=device),
                tools=runtime_tools(choice.accuracy),
                device_fingerprint=fp_hash,
                skip_reason=absent or reference.skip_reason or (choice.skip_reason if choice.accuracy is None else None),
                target=target.name,
                description=f"candidate {label} ({s.artifact.format}): bits, and its accuracy on {device} when within budget",
            )
            stages.append(score)
            picks[f"build:{label}"] = s.name
            picks[f"score:{label}"] = score.name
            labels.append({"label": label, "built_by": s.description, "config": target.candidates[j], **asdict(s.artifact)})
    what = f"<= {target.max_bpw} linear-layer bpw" if target.max_bpw is not None else f"<= {target.max_size_mib} MiB"
    stages.append(Stage(
        name=f"{target.name}/pick",
        kind="budget-pick",
        version=VERSION,
        params={**budget, "metric": target.metric, "device": device, "candidates": [
            {k: c[k] for k in ("label", "kind", "variant", "format")} for c in labels]},
        inputs=picks,
        run=partial(run_pick, candidates=labels, name=target.name),
        target=target.name,
        skip_reason=reference.skip_reason,
        artifact=ArtifactInfo(name=target.name, target=target.name, kind="budget",
                              format=f"the best of {len(labels)} candidates {what} (by {METRICS[target.metric][2]} on {device})"),
        description=f"the best of {len(labels)} candidates {what}, by {METRICS[target.metric][2]} on {device}",
    ))
    return stages


# ---------------------------------------------------------------- running
def run_reference(ctx: StageContext, *, choice, suite_text: str, device: str) -> dict:
    from evals.stages import run_model_eval

    return run_model_eval(ctx, path=ctx.input("source").model_dir, choice=choice, is_source=True, suite_text=suite_text, device=device)


def _within(budget: dict, bpw: float | None, mib: float) -> tuple[bool, str]:
    """Whether a candidate fits, compared as the table prints it (its own formatters): W4A16 group
    32 stores 4.5003 bits per weight with its packed-shape tensors, and a user who asks for 4.5
    means it."""
    if budget.get("max_bpw") is not None:
        if bpw is None:
            return False, "its bits per weight cannot be counted from its files"
        shown = table.bpw(bpw)
        return float(shown) <= budget["max_bpw"], f"{shown} linear-layer bpw against {budget['max_bpw']:g}"
    shown = table.num(mib, ".1f")
    return float(shown) <= budget["max_size_mib"], f"{shown} MiB against {budget['max_size_mib']:g}"


def run_score(ctx: StageContext, *, choice, suite_text: str, device: str) -> dict:
    """One candidate: its bits and size from its files; within budget, its accuracy on the selection text."""
    from evals.bits import bits_fields
    from evals.stages import run_model_eval

    cand = ctx.input("candidate")
    bits = bits_fields(cand.path)
    mib = cand.manifest.get("bytes", 0) / 2**20
    ok, why = _within(ctx.stage.params, bits.get("bpw_linear"), mib)
    facts = {"bpw_linear": bits.get("bpw_linear"), "bpw_model": bits.get("bpw_model"), "mib": round(mib, 2),
             "within_budget": ok, "budget_check": why}
    ctx.log(f"{ctx.stage.name}: {why}: {'within budget, scoring' if ok else 'over budget, not scored'}")
    if not ok:
        return facts
    return {**facts, **run_model_eval(ctx, path=cand.path, choice=choice, is_source=False, suite_text=suite_text, device=device)}


def _link_tree(src: Path, dst: Path) -> None:
    """The winner's files in this stage's folder: hard links (no copy of gigabytes) where the file
    system allows, copies elsewhere."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.name == MANIFEST and f.parent == src:
            continue
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst / rel)
        except OSError:
            shutil.copy2(f, dst / rel)


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Scored rows within budget, best first (lower is better for both metrics)."""
    key, _, _ = METRICS[metric]
    scored = [r for r in rows if r.get("within_budget") and r.get(key) is not None]
    return sorted(scored, key=lambda r: (r[key], r.get("bpw_linear") or math.inf))


def run_pick(ctx: StageContext, *, candidates: list[dict], name: str) -> dict:
    p = ctx.stage.params
    key, err, what = METRICS[p["metric"]]
    rows = []
    for c in candidates:
        score = ctx.input(f"score:{c['label']}").result
        acc = score.get("accuracy") or {}
        rows.append({
            "label": c["label"], "kind": c["kind"], "variant": c["variant"], "format": c["format"], "built_by": c["built_by"],
            "config": c["config"],
            **{k: score.get(k) for k in ("bpw_linear", "bpw_model", "mib", "within_budget", "budget_check")},
            **{k: acc.get(k) for k in ("kl_mean", "kl_mean_err", "ppl_ratio", "ppl_ratio_err", "top1_agreement_pct", "tokens_scored")},
        })
    ranked = rank(rows, p["metric"])
    budget = f"{p['max_bpw']} linear-layer bpw" if p.get("max_bpw") is not None else f"{p['max_size_mib']} MiB"
    if not ranked:
        measure = "bpw_linear" if p.get("max_bpw") is not None else "mib"
        smallest = min(rows, key=lambda r: r.get(measure) or math.inf)
        raise StageFailed(f"no candidate is within {budget}: the smallest is {smallest['label']} ({smallest['budget_check']})")
    best = ranked[0]
    why = f"{best['built_by']}: the lowest {what} ({best[key]:.4g} ± {best[err] or 0:.2g}) of the {len(ranked)} candidates within {budget}"
    if len(ranked) > 1:
        second = ranked[1]
        gap = second[key] - best[key]
        se = math.hypot(best[err] or 0.0, second[err] or 0.0)
        clear = gap > 2 * se
        why += (f"; the next, {second['built_by']}, is {gap:.3g} worse: "
                + ("more than two" if clear else "within two") + f" standard errors ({se:.2g}) of it")
        best["clear_of_next"] = clear
    for r in rows:
        r["result"] = ("chosen" if r is best else "within budget" if r.get("within_budget") else "over budget")
    winner = next(c for c in candidates if c["label"] == best["label"])
    _link_tree(ctx.input(f"build:{best['label']}").path, ctx.out_dir)
    selection = {"target": name, "budget": {k: p.get(k) for k in ("max_bpw", "max_size_mib")}, "metric": p["metric"],
                 "device": p["device"], "chosen": best["label"], "why": why, "candidates": rows}
    (ctx.out_dir / SELECTION_FILE).write_text(json.dumps(selection, indent=2))
    for r in rows:
        ctx.log(f"{r['label']:>10}  {r['built_by']:<70}  {r['budget_check']:<36}  "
                + (f"{what} {r[key]:.4g}" if r.get(key) is not None else "not scored") + f"  {r['result']}")
    ctx.log(f"chosen: {best['label']}: {why}")
    return {
        "chosen": best["label"], "why": why,
        # the artifact this stage wrote is the winner's format (pipeline.build reads this)
        "artifact": {"kind": winner["kind"], "variant": winner["variant"], "runtimes": list(winner["runtimes"]),
                     "bits": winner["bits"], "group_size": winner["group_size"],
                     "format": f"{winner['format']}, chosen within {budget} ({p['metric']})"},
    }
