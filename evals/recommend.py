"""Which artifact to ship on each device, from what was measured there.

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

from pipeline.core.report import Metrics, Recommendation, Report


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
    from evals.gates import evaluate_gates

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
