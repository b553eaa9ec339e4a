"""Gates: may an artifact be promoted? Per recipe, with per-target overrides.

Thresholds come from ``Recipe.gates_for(target)``. Every check runs on every
required device (``gates.required_devices``, else ``evals.devices``):

* ``perplexity_increase_pct`` <= ``max_perplexity_increase_pct``
* ``kl_mean`` <= ``max_kl_divergence``
* ``top1_agreement_pct`` >= ``min_top1_agreement_pct``
* ``decode_speedup`` (artifact / source decode tok/s, batch 1) >= ``min_decode_speedup``

Result: ``{status, passed, checks: [{name, device, value, threshold, passed}],
pending_devices}``. ``status`` is ``passed``; ``failed`` as soon as any check
fails; ``pending`` when nothing failed but a required device has no results
yet (another CI job evaluates it); ``unverified`` when nothing failed but no
runtime here could evaluate the artifact on a required device. ``passed`` is
true for ``passed``, false for ``failed`` and null (undecided) for ``pending``
and ``unverified``: neither may be promoted, neither is a gate failure.
"""

from __future__ import annotations

from typing import Any

CHECKS = (
    # name, GateSpec field, metric key in the device's "metrics", direction
    ("perplexity_increase_pct", "max_perplexity_increase_pct", "delta_ppl_pct", "max"),
    ("kl_mean", "max_kl_divergence", "kl_mean", "max"),
    ("top1_agreement_pct", "min_top1_agreement_pct", "top1_agreement_pct", "min"),
    ("decode_speedup", "min_decode_speedup", "decode_speedup", "min"),
)


def evaluate_gates(spec, required_devices: list[str], evals: dict[str, dict[str, Any]]) -> dict:
    """Apply `spec` (a GateSpec) to an artifact's per-device evals (each with a flat "metrics" dict)."""
    checks: list[dict] = []
    pending: list[str] = []
    unverified: list[str] = []
    active = [(n, f, m, d) for n, f, m, d in CHECKS if getattr(spec, f) is not None]
    for device in required_devices:
        ev = evals.get(device) or {"status": "pending"}
        status = ev.get("status")
        if status == "pending":
            pending.append(device)
            continue
        if status == "skipped":
            unverified.append(device)
            checks.append({"name": "evaluated", "device": device, "value": None, "threshold": None,
                           "passed": False, "reason": ev.get("reason")})
            continue
        metrics = ev.get("metrics") or {}
        for name, field, key, direction in active:
            threshold = getattr(spec, field)
            value = metrics.get(key)
            if value is None:
                why = ev.get("reason") or f"no {key} measured on {device}"
                checks.append({"name": name, "device": device, "value": None, "threshold": threshold,
                               "passed": False, "reason": why})
                continue
            ok = value <= threshold if direction == "max" else value >= threshold
            checks.append({"name": name, "device": device, "value": round(float(value), 6),
                           "threshold": threshold, "passed": bool(ok)})
    failed = any(not c["passed"] and c["name"] != "evaluated" for c in checks)
    if failed:
        status = "failed"
    elif pending:
        status = "pending"
    elif unverified:
        status = "unverified"
    else:
        status = "passed"
    decided = {"passed": True, "failed": False}.get(status)
    return {"status": status, "passed": decided, "checks": checks,
            "pending_devices": pending, "required_devices": list(required_devices)}


def required_devices(recipe) -> list[str]:
    return list(recipe.gates.required_devices or recipe.evals.devices)
