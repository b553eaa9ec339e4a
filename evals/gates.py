"""Gates: may an artifact be promoted? Per recipe, with per-target overrides.

Thresholds come from ``Recipe.gates_for(target)``. Every check runs on every
required device (``gates.required_devices``, else ``evals.devices``), on the
device's flat metrics (:class:`pipeline.core.report.Metrics`):

* ``delta_ppl_pct``       <= ``max_perplexity_increase_pct``
* ``kl_mean``             <= ``max_kl_divergence``
* ``kl_p99``              <= ``max_kl_p99``
* ``top1_agreement_pct``  >= ``min_top1_agreement_pct``
* ``task_recovery_pct``   >= ``min_task_accuracy_recovery_pct`` (task accuracy / the source's, %)
* ``decode_speedup``      >= ``min_decode_speedup`` (artifact / source decode tok/s, batch 1)

``status`` is ``passed``; ``failed`` as soon as any check fails; ``pending``
when nothing failed but a required device has no results yet (another CI job
evaluates it); ``unverified`` when nothing failed but no runtime could evaluate
the artifact on a required device. ``passed`` is true for ``passed``, false for
``failed`` and null (undecided) for ``pending`` and ``unverified``: neither may
be promoted, neither is a gate failure.
"""

from __future__ import annotations

from pipeline.core.report import EvalEntry, GateCheck, GateResult

CHECKS = (
    # check name, GateThresholds field, Metrics field, direction
    ("perplexity_increase_pct", "max_perplexity_increase_pct", "delta_ppl_pct", "max"),
    ("kl_mean", "max_kl_divergence", "kl_mean", "max"),
    ("kl_p99", "max_kl_p99", "kl_p99", "max"),
    ("top1_agreement_pct", "min_top1_agreement_pct", "top1_agreement_pct", "min"),
    ("task_recovery_pct", "min_task_accuracy_recovery_pct", "task_recovery_pct", "min"),
    ("decode_speedup", "min_decode_speedup", "decode_speedup", "min"),
)


def evaluate_gates(spec, required_devices: list[str], evals: dict[str, EvalEntry]) -> GateResult:
    """Apply `spec` (a GateSpec) to an artifact's per-device evals."""
    checks: list[GateCheck] = []
    pending: list[str] = []
    unverified: list[str] = []
    active = [(n, f, m, d) for n, f, m, d in CHECKS if getattr(spec, f, None) is not None]
    for device in required_devices:
        ev = evals.get(device) or EvalEntry(status="pending")
        if ev.status == "pending":
            pending.append(device)
            continue
        if ev.status == "skipped":
            unverified.append(device)
            checks.append(GateCheck(name="evaluated", device=device, passed=False, reason=ev.reason))
            continue
        for name, field, key, direction in active:
            threshold = getattr(spec, field)
            value = getattr(ev.metrics, key, None)
            if value is None:
                why = ev.reason or f"no {key} measured on {device}"
                checks.append(GateCheck(name=name, device=device, threshold=threshold, passed=False, reason=why))
                continue
            ok = value <= threshold if direction == "max" else value >= threshold
            checks.append(GateCheck(name=name, device=device, value=round(float(value), 6), threshold=threshold, passed=bool(ok)))
    failed = any(not c.passed and c.name != "evaluated" for c in checks)
    if failed:
        status = "failed"
    elif pending:
        status = "pending"
    elif unverified:
        status = "unverified"
    else:
        status = "passed"
    return GateResult(status=status, passed={"passed": True, "failed": False}.get(status), checks=checks,
                      pending_devices=pending, required_devices=list(required_devices))


def failed_checks(gates: GateResult | None) -> list[str]:
    """Human-readable failed checks, e.g. 'perplexity_increase_pct 23.1 > 10 on cpu'."""
    if gates is None:
        return []
    out = []
    for c in gates.checks:
        if c.passed or c.name == "evaluated":
            continue
        if c.value is None:
            out.append(f"{c.name} not measured on {c.device}")
            continue
        op = ">" if any(n == c.name and d == "max" for n, _, _, d in CHECKS) else "<"
        out.append(f"{c.name} {c.value:.4g} {op} {c.threshold:g} on {c.device}")
    return out


def required_devices(recipe) -> list[str]:
    return list(recipe.gates.required_devices or recipe.evals.devices)


def judge(report, recipe) -> None:
    """Gates of every built artifact and the recommendation of every evaluated device, from the
    report's per-device results (in place). The one place both are decided: the eval job calls it,
    and registration calls it again on a report merged from several devices' jobs."""
    from evals.recommend import recommend

    def spec_for(target: str):
        try:
            return recipe.gates_for(target)
        except KeyError:  # an artifact of a target since removed from the recipe
            return recipe.gates

    required = required_devices(recipe)
    for a in report.built():
        a.gates = evaluate_gates(spec_for(a.target), required, a.evals)
    for device, info in report.devices.items():
        if info.status == "done":
            report.recommendations[device] = recommend(report, device, recipe.gates.recommend, spec_for)
