"""The one judge: may an artifact be promoted (its gates), and which one to ship on each device
(the recommendation). The eval job and the registry both call :func:`judge`.

Gates, per recipe, with per-target overrides.

Thresholds come from ``Recipe.gates_for(target)``. Every check runs on every
required device (``gates.required_devices``, else ``evals.devices``), on the
device's flat metrics (:class:`pipeline.core.report.Metrics`):

* ``delta_ppl_pct``       <= ``max_perplexity_increase_pct``
* ``kl_mean``             <= ``max_kl_divergence``
* ``kl_p99``              <= ``max_kl_p99``
* ``top1_agreement_pct``  >= ``min_top1_agreement_pct``
* ``task_recovery_pct``   >= ``min_task_accuracy_recovery_pct`` (task accuracy / the source's, %)
* ``decode_speedup``      >= ``min_decode_speedup`` (artifact / source decode tok/s, batch 1),
  compared **within one runtime** only: the source runs in transformers, so a GGUF in
  llama.cpp has no speed-up to compare (llama.cpp against transformers would pass every
  GGUF and fail every dequantized checkpoint, whatever the format costs). Such a check
  is recorded as not comparable and leaves the gate ``unverified`` on that device.

Where a measure has a standard error (Δppl and mean KL, from the per-token values as
``llama-perplexity`` computes them), each check also says whether its verdict is
``clear``: the threshold lies outside value ± :data:`GATE_Z` standard errors, so the
verdict would very likely hold on more text; otherwise it is *marginal* (``clear`` is
False), and the table marks the gate with ``~``.

``status`` is ``passed``; ``failed`` as soon as any check fails; ``pending``
when nothing failed but a required device has no results yet (another CI job
evaluates it); ``unverified`` when nothing failed but no runtime could evaluate
the artifact on a required device. ``passed`` is true for ``passed``, false for
``failed`` and null (undecided) for ``pending`` and ``unverified``: neither may
be promoted, neither is a gate failure.

The recommendation, from the same results: which artifact to ship on each device.

Per device:

* the **Pareto front**: artifacts that no other artifact beats on both cost and
  quality, where cost is size (for ``smallest``) or 1/decode speed (for
  ``fastest``) and quality is mean KL divergence from the source (task accuracy
  recovery breaks ties when measured). The source itself (KL 0) is on it by
  construction and listed as ``source``.
* the **bits front**: the same with linear-layer bits per weight as the cost
  (``pareto_bits``), which compares formats at equal bits; shown in the bits plot.
* the **recommendation**: among artifacts whose gate checks all pass on this
  device, the smallest (``gates.recommend: smallest``, the default) or the one
  with the highest decode tokens/s (``fastest``); ties go to the lower KL. None
  when nothing passes: the report says so rather than recommending the least bad.
"""

from __future__ import annotations

from pipeline.core.report import EvalEntry, GateCheck, GateResult, Metrics, Recommendation, Report

#: standard errors between a value and its threshold for a verdict to count as clear (about 95 %)
GATE_Z = 2.0
#: Metrics field -> the field holding its standard error
ERRORS = {"delta_ppl_pct": "delta_ppl_pct_err", "kl_mean": "kl_mean_err"}

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
            if key == "decode_speedup" and value is None and ev.speedup_basis and ev.speedup_basis.startswith("not comparable"):
                unverified.append(device)
                checks.append(GateCheck(name=name, device=device, threshold=threshold, passed=False, comparable=False,
                                        reason=ev.speedup_basis))
                continue
            if value is None:
                why = ev.reason or f"no {key} measured on {device}"
                checks.append(GateCheck(name=name, device=device, threshold=threshold, passed=False, reason=why))
                continue
            ok = value <= threshold if direction == "max" else value >= threshold
            err = getattr(ev.metrics, ERRORS[key], None) if key in ERRORS else None
            clear = None if err is None else bool(abs(float(value) - threshold) > GATE_Z * err)
            checks.append(GateCheck(name=name, device=device, value=round(float(value), 6), threshold=threshold, passed=bool(ok),
                                    err=None if err is None else round(float(err), 6), clear=clear))
    failed = any(not c.passed and c.name != "evaluated" and c.comparable is not False for c in checks)
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


def marginal(gates: GateResult | None, device: str | None = None) -> list[GateCheck]:
    """Checks (on `device`, or any) whose threshold lies within GATE_Z standard errors of the value."""
    if gates is None:
        return []
    return [c for c in gates.checks if c.clear is False and (device is None or c.device == device)]


def describe_check(c: GateCheck) -> str:
    """'kl_mean 0.0464 ± 0.0021 <= 0.1 on cpu: passed, clear of the threshold'"""
    op = {True: "<=", False: ">"} if any(n == c.name and d == "max" for n, _, _, d in CHECKS) else {True: ">=", False: "<"}
    if c.value is None:
        return f"{c.name} not measured on {c.device}"
    err = f" ± {c.err:.3g}" if c.err is not None else ""
    verdict = "passed" if c.passed else "failed"
    how = {True: f", clear of the threshold (> {GATE_Z:g} s.e.)", False: f", within {GATE_Z:g} s.e. of the threshold (marginal)"}.get(c.clear, "")
    return f"{c.name} {c.value:.4g}{err} {op[c.passed]} {c.threshold:g} on {c.device}: {verdict}{how}"


def derive_metrics(report) -> None:
    """Fill the Metrics fields that come from elsewhere in the report (in place): the standard errors
    of Δppl and mean KL from the raw accuracy record, and each artifact's bits per weight. The eval
    job and registration both judge through here, so gates, tables and MLflow see the same values."""
    def fill(ev: EvalEntry, bpw_linear, bpw_model) -> None:
        m, acc = ev.metrics, ev.accuracy or {}
        if m.delta_ppl_pct_err is None and acc.get("ppl_ratio_err") is not None and m.delta_ppl_pct is not None:
            # delta_ppl_pct = 100 (ppl_ratio - 1): the same error, in points of %
            m.delta_ppl_pct_err = 100.0 * float(acc["ppl_ratio_err"])
        if m.kl_mean_err is None and acc.get("kl_mean_err") is not None and m.kl_mean is not None:
            m.kl_mean_err = float(acc["kl_mean_err"])
        m.bpw_linear, m.bpw_model = bpw_linear, bpw_model

    def speed_basis(ev: EvalEntry, base: EvalEntry | None) -> None:
        mine = ev.speed_runtime or ev.runtime
        theirs = (base.speed_runtime or base.runtime) if base is not None else None
        if ev.metrics.decode_tps is None or theirs is None:
            return
        if mine == theirs:
            ev.speedup_basis = f"within {runtime_label(mine)}"
        else:
            ev.metrics.decode_speedup = None
            ev.speedup_basis = (f"not comparable: measured in {runtime_label(mine)}, the source in {runtime_label(theirs)}; "
                                "a decode speed-up compares within one runtime")

    from evals.bits import bits_fields
    from evals.runtimes import runtime_label

    src = report.source
    # Reports written before bits were counted: count them now where the files are here.
    if src is not None and src.bpw_linear is None and not src.bpw_detail:
        for k, v in bits_fields(src.path).items():
            setattr(src, k, v)
    for a in report.built():
        if a.bpw_linear is None and not a.bpw_detail:
            for k, v in bits_fields(a.path).items():
                setattr(a, k, v)
    for ev in report.baseline.values():
        fill(ev, src.bpw_linear if src else None, src.bpw_model if src else None)
    for a in report.built():
        for device, ev in a.evals.items():
            fill(ev, a.bpw_linear, a.bpw_model)
            speed_basis(ev, report.baseline.get(device))


def failed_checks(gates: GateResult | None) -> list[str]:
    """Human-readable failed checks, e.g. 'perplexity_increase_pct 23.1 > 10 on cpu'."""
    if gates is None:
        return []
    out = []
    for c in gates.checks:
        if c.passed or c.name == "evaluated" or c.comparable is False:
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

    def spec_for(target: str):
        try:
            return recipe.gates_for(target)
        except KeyError:  # an artifact of a target since removed from the recipe
            return recipe.gates

    derive_metrics(report)
    required = required_devices(recipe)
    for a in report.built():
        a.gates = evaluate_gates(spec_for(a.target), required, a.evals)
    for device, info in report.devices.items():
        if info.status == "done":
            report.recommendations[device] = recommend(report, device, recipe.gates.recommend, spec_for)


# ------------------------------------------------------------------ recommendation


def _cost(m: Metrics, criterion: str) -> float | None:
    if criterion == "fastest":
        return 1.0 / m.decode_tps if m.decode_tps else None
    return float(m.size_bytes) if m.size_bytes else None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, loss) no other point dominates (<= in both, < in one); sorted by cost."""
    front = []
    for name, (c, l) in points.items():
        dominated = any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for n2, (c2, l2) in points.items() if n2 != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def recommend(report: Report, device: str, criterion: str, spec_for) -> Recommendation:
    """`spec_for(target)` gives an artifact's gate thresholds (the recipe's with its overrides);
    an artifact is a candidate on `device` when every check passes on that device's results,
    whether or not the recipe requires that device for promotion."""
    points: dict[str, tuple[float, float]] = {}
    bits: dict[str, tuple[float, float]] = {}
    base = report.baseline.get(device)
    if base is not None and base.status == "done":
        c = _cost(base.metrics, criterion)
        if c is not None:
            points["source"] = (c, 0.0)
        if report.source is not None and report.source.bpw_linear:
            bits["source"] = (report.source.bpw_linear, 0.0)
    candidates = []
    for a in report.built():
        ev = a.evals.get(device)
        if ev is None or ev.status != "done":
            continue
        m = ev.metrics
        c = _cost(m, criterion)
        if c is None or m.kl_mean is None:
            continue
        points[a.name] = (c, m.kl_mean)
        if a.bpw_linear:
            bits[a.name] = (a.bpw_linear, m.kl_mean)
        if evaluate_gates(spec_for(a.target), [device], {device: ev}).passed is True:
            recovery = m.task_recovery_pct if m.task_recovery_pct is not None else 0.0
            candidates.append((c, m.kl_mean, -recovery, a.name))
    front = pareto_front(points)
    front_bits = pareto_front(bits)
    what = "size" if criterion == "smallest" else "decode tokens/s"
    named = "size vs KL divergence" if criterion == "smallest" else "decode speed vs KL divergence"
    common = dict(device=device, criterion=criterion, pareto=front, front=named, pareto_bits=front_bits)
    if not candidates:
        return Recommendation(artifact=None, reason=f"no artifact passes the recipe's gates on {device}", **common)
    best = min(candidates)
    m = report.artifact(best[3]).evals[device].metrics
    detail = f"{m.size_bytes / 2**20:.1f} MiB" if criterion == "smallest" else f"{m.decode_tps:,.1f} decode tok/s"
    on = "on" if best[3] in front else "off"
    reason = (f"the {'smallest' if criterion == 'smallest' else 'fastest'} of {len(candidates)} artifact(s) that pass the "
              f"gates on {device} ({detail}, KL {m.kl_mean:.4f}); chosen by {what}, {on} the {named} Pareto front "
              f"({', '.join(front)})")
    return Recommendation(artifact=best[3], reason=reason, **common)
