"""What MLflow shows people: the build run's description, each version's description, metric values.

Written from the merged report only (no local paths: the store path of the machine
that built an artifact means nothing to the person reading the registry). A version's
description says how to download it and how to serve it in each runtime that loads
its format (``pipeline.targets.artifact_format(kind).serves_with``), and what was
measured on each device.
"""

from __future__ import annotations

import math

from pipeline.core.report import ArtifactReport, EvalEntry, Metrics, Report
from pipeline.registry.promotion import CANDIDATE_ALIAS, CHAMPION_ALIAS, recommended_alias
from pipeline.targets.cards import serve_commands  # noqa: F401 - shared with the build-time model cards

SIGNIFICANT = 5  # digits kept in metric values (a perplexity of 140.88280336464317 reads 140.88)


def rounded(value: float | int) -> float:
    """A metric value as people read it: integers exact, floats to 5 significant digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    v = float(value)
    if v == 0 or math.isnan(v) or math.isinf(v):
        return v
    return float(f"{v:.{SIGNIFICANT}g}")


def metric_values(m: Metrics) -> dict[str, float]:
    return {k: rounded(v) for k, v in m.values().items() if not (isinstance(v, float) and math.isnan(v))}


def entry_values(ev: EvalEntry) -> dict[str, float]:
    """An eval entry's numbers for MLflow: its metrics, and per lm-eval task its score and its
    difference from the source (``task.<task>.<metric>``, ``task.<task>.<metric>_delta``)."""
    out = metric_values(ev.metrics)
    for name, score in sorted(ev.tasks.items()):
        out[f"task.{name}.{score.metric}"] = rounded(score.value)
        if score.delta is not None:
            out[f"task.{name}.{score.metric}_delta"] = rounded(score.delta)
    return out


def _table(report: Report, device: str) -> list[str]:
    """The device's results table as Markdown: the table model's columns and cells (evals.table,
    as ``quantforge report`` prints them), names as code spans."""
    from evals.table import for_device

    return for_device(report, device).markdown(code=("artifact",))


def _measured(report: Report, a: ArtifactReport, devices: list[str]) -> list[str]:
    """One artifact's row of each device's table (the same cells), a row per device, and what
    the cells mean (the tables' legends)."""
    from evals.table import COLUMNS, Column, for_device, legend, markdown_lines

    rows = []
    for d in devices:
        row = for_device(report, d).row(a.name)
        if row is not None:
            rows.append({**row, "artifact": d})
    cols = [Column("artifact", "device", 0, left=True), *COLUMNS[1:]]
    notes = dict.fromkeys(line for d in devices for line in legend(report, d, recommendation=False))
    return [*markdown_lines(cols, rows, code=("artifact",)), "", *(f"- {line}" for line in notes)]


def devices_of(report: Report) -> list[str]:
    return list(dict.fromkeys([*report.devices, *report.baseline, *(d for a in report.artifacts for d in a.evals)]))


def build_note(report: Report) -> str:
    """The build run's description: per device, the source and every artifact side by side (the
    table ``quantforge report`` prints, from the same model)."""
    from evals.table import legend

    src = report.source
    lines = [f"**{report.recipe}**: quantized builds of `{src.model if src else '?'}`"
             + (f" (revision `{src.commit or src.revision}`)" if src else "") + "."]
    desc = (report.recipe_config or {}).get("description")
    if desc:
        lines.append(str(desc)[:2000])
    lines.append(f"Recipe sha256 `{report.recipe_sha256[:16]}`; {len(report.built())} artifact(s) built: "
                 + ", ".join(f"`{a.name}`" for a in report.built()) + ".")
    for device in devices_of(report):
        info = report.devices.get(device)
        if info is not None and info.status != "done":
            lines.append(f"### {device}: pending\n\n{info.reason or 'not evaluated yet'}")
            continue
        fp = info.fingerprint if info else {}
        what = fp.get("gpu") or fp.get("cpu_model") or ""
        block = [f"### {device}" + (f": {what}" if what else ""), "", *_table(report, device)]
        rec = report.recommendations.get(device)
        if rec is not None:
            block += ["", f"Recommended on {device}: " + (f"**{rec.artifact}** (*, alias `@{recommended_alias(device)}`): {rec.reason}"
                                                         if rec.artifact else rec.reason) + "."]
        block += ["", *(f"- {line}" for line in legend(report, device, recommendation=False))]
        lines.append("\n".join(block))
    return "\n\n".join(lines)[:7900]


def version_description(report: Report, a: ArtifactReport, model: str, version: str, tracking_uri: str,
                        promotion_alias: str, gguf_file: str | None, held: dict[str, str] | None = None) -> str:
    """Markdown for one model version: what it is, how to get and serve it, what was measured.

    ``held``: alias -> version that the registered model holds now; a download by alias is offered
    only for those (``models:/NAME@production`` of a model that has no such alias fails)."""
    from pipeline.registry.tracking import is_http

    held = held or {}
    src = report.source
    head = (f"**{a.name}**: {a.format or a.kind}" + (f", {a.bits}-bit" if a.bits else "")
            + f" quantization of `{src.model if src else '?'}`" + (f" (revision `{src.commit or src.revision}`)" if src else "")
            + f", built by quantforge recipe `{report.recipe}`.")
    env = f"MLFLOW_TRACKING_URI={tracking_uri} " if is_http(tracking_uri) else ""
    where = "" if env else "With MLFLOW_TRACKING_URI set to this registry:\n\n"
    lines = [head, "", "#### Download", "", where + "```bash",
             f"{env}mlflow artifacts download --artifact-uri models:/{model}/{version} -d DIR   # this version"]
    lines += [f"{env}mlflow artifacts download --artifact-uri models:/{model}@{alias} -d DIR   # whichever version is @{alias}"
              for alias in dict.fromkeys([promotion_alias, CHAMPION_ALIAS, CANDIDATE_ALIAS]) if alias in held]
    lines.append("```")
    if promotion_alias not in held:
        lines += ["", f"`{model}` has no `@{promotion_alias}` yet: no version of it has passed its gates on every required device."]
    serve = serve_commands(a.kind, gguf_file, model)
    if serve:
        lines += ["", "#### Serve", "", "```bash", *serve, "```"]
    devices = [d for d in devices_of(report) if d in a.evals]
    if devices:
        lines += ["", "#### Measured (against the source, on the same text)", ""]
        lines += _measured(report, a, devices)
    g = a.gates
    if g is not None:
        verdict = {"passed": "passed on every required device", "failed": "failed", "pending": "pending (a required device has no results yet)",
                   "unverified": "unverified (no runtime could evaluate it on a required device)"}[g.status]
        lines += ["", f"Gates: **{verdict}**" + (f"; pending: {', '.join(g.pending_devices)}" if g.pending_devices else "") + "."]
    lines += ["", f"Aliases: `@{CANDIDATE_ALIAS}` is the newest build's version, `@{promotion_alias}` the newest that passed the gates "
                  "on every required device, `@recommended-<device>` the artifact to ship on that device (all set by quantforge); "
                  f"`@{CHAMPION_ALIAS}` is set by people and never moved by quantforge."]
    return "\n".join(lines)
