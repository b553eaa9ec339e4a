#!/usr/bin/env python3
"""report.json (or ci_matrix.py's plan) -> Markdown for $GITHUB_STEP_SUMMARY.

    scripts/ci_summary.py artifacts/demo/report.json [--device cpu] [--title TEXT] >> "$GITHUB_STEP_SUMMARY"
    scripts/ci_summary.py --matrix matrix.json >> "$GITHUB_STEP_SUMMARY"

Per report: the build (status, size, registry version and aliases per
artifact), one table per device (the table ``quantforge report`` prints, from
the same model, evals.table: the source, then each artifact's bits, size,
accuracy relative to the source and speed, with the runtime that measured it), and
the gates (failed checks, devices still pending). ``--device`` limits the eval
tables to one device (an eval job's own summary). A missing report prints a
line saying so and exits 0: a summary never hides the failure of the step that
should have written it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_REASON = 300


def esc(value: Any) -> str:
    """A value safe inside a Markdown table cell (no pipes, newlines or raw HTML)."""
    from evals.table import md_cell

    return md_cell(value)


def code(value: Any) -> str:
    text = esc(value).replace("`", "'")
    return f"`{text}`" if text else ""


def short(value: Any, n: int = MAX_REASON) -> str:
    text = " ".join(str(value or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    rows = list(rows)
    if not rows:
        return []
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


GATE_ICON = {"passed": "✅ passed", "failed": "❌ failed", "pending": "⏳ pending", "unverified": "⚠️ unverified"}
STATUS_ICON = {"built": "✅ built", "failed": "❌ failed", "skipped": "⏭️ skipped", "planned": "· planned"}


def _registry_cell(reg) -> str:
    """A RegistryEntry (or None) as `name` vN (@aliases)."""
    if reg is None or not reg.name:
        return "–"
    cell = f"{code(reg.name)} v{esc(reg.version)}"
    aliases = reg.aliases
    if aliases:
        cell += " (" + ", ".join(f"@{esc(a)}" for a in aliases) + ")"
    return cell


def _eval_table(report, device: str) -> tuple[list[str], list[str]]:
    """The device's results table (the table model's columns and cells, evals.table, as
    ``quantforge report`` prints them) and notes on the models not measured there."""
    from evals.table import entries, for_device

    notes = []
    measured = False
    for name, ev, a in entries(report, device):
        if (a.evals if a is not None else report.baseline).get(device) is None:
            continue
        measured = True
        if ev.status != "done" and ev.reason:
            notes.append(f"- {code(name)} on {code(device)}: {esc(ev.status)}: {esc(short(ev.reason))}")
        elif ev.speed_reason:
            notes.append(f"- {code(name)} on {code(device)}: speed not measured: {esc(short(ev.speed_reason))}")
    if not measured:
        return [], notes
    return for_device(report, device).markdown(code=("artifact",)) + [""], notes


def render_report(report, device: str | None = None, title: str | None = None) -> str:
    from evals.table import legend, num, size

    out: list[str] = [f"## {esc(title or f'quantforge: {report.recipe}')}", ""]
    facts = [f"recipe {code(report.recipe)}"]
    if report.recipe_sha256:
        facts.append(f"sha256 {code(report.recipe_sha256[:12])}")
    if report.git_commit:
        facts.append(f"commit {code(report.git_commit[:12])}")
    if report.quantforge_version:
        facts.append(f"quantforge {esc(report.quantforge_version)}")
    facts.append(f"updated {esc(report.updated)}")
    out += [" · ".join(facts), ""]
    if report.source is not None:
        src = report.source
        out += [f"source {code(src.model)}" + (f" @ {code((src.commit or '')[:12])}" if src.commit else "")
                + (f" · fingerprint {code(src.fingerprint[:12])}" if src.fingerprint else "") + f" · {esc(src.dtype)}", ""]

    # Build
    notes: list[str] = []
    rows = []
    for a in report.artifacts:
        label = a.name + (f" ({a.variant})" if a.variant and a.variant not in a.name else "")
        rows.append([code(label), esc(a.kind), esc(a.format or "–"), STATUS_ICON.get(a.status, esc(a.status)),
                     size(a.bytes, "–"), num(a.build_seconds, ".1f", "–"), _registry_cell(a.registry)])
        if a.status in ("failed", "skipped") and a.reason:
            notes.append(f"- {code(a.name)}: {esc(a.status)}: {esc(short(a.reason))}")
    out += ["### Artifacts", ""]
    out += table(["artifact", "kind", "format", "status", "size", "build s", "registry"], rows) or ["_no artifacts in the report_", ""]

    # Evals per device
    devices = [device] if device else list(dict.fromkeys([*report.devices, *report.baseline, *(d for a in report.artifacts for d in a.evals)]))
    for d in devices:
        info = report.devices.get(d)
        state = info.status if info is not None else ("done" if d in report.baseline else "pending")
        lines, dev_notes = _eval_table(report, d)
        out += [f"### Eval on {code(d)} ({esc(state)})", ""]
        if state != "done" and info is not None and info.reason:
            out += [f"_{esc(short(info.reason))}_", ""]
        out += lines or ["_no results on this device yet_", ""]
        rec = report.recommendations.get(d)
        if rec is not None:
            out += [f"Recommended on {code(d)}: " + (f"**{code(rec.artifact)}** (*): {esc(short(rec.reason))}" if rec.artifact else esc(short(rec.reason))), ""]
        if lines:
            out += [f"- {esc(line)}" for line in legend(report, d, recommendation=False)] + [""]
        notes += dev_notes

    # Gates
    rows = []
    for a in report.artifacts:
        g = a.gates
        if g is None:
            continue
        failed = [c for c in g.checks if not c.passed]
        why = "; ".join(
            f"{c.name} on {c.device}: "
            + (f"{num(c.value, '.4g', '–')} vs {num(c.threshold, '.4g', '–')}" if c.value is not None else short(c.reason or "not measured", 120))
            for c in failed
        )
        rows.append([code(a.name), GATE_ICON.get(g.status, esc(g.status or "–")),
                     esc(why) or "–", esc(", ".join(g.pending_devices)) or "–"])
    if rows:
        out += ["### Gates", ""] + table(["artifact", "gates", "failed checks", "pending devices"], rows)

    if report.registry.tracking_uri:
        reg = report.registry
        out += [f"registered in experiment {code(reg.experiment_name)}, parent run {code(reg.parent_run_id)} at {esc(reg.registered)}", ""]
    if notes:
        out += ["<details><summary>Notes (skipped, failed, not measured)</summary>", ""] + notes + ["", "</details>", ""]
    return "\n".join(out)


def render_matrix(result: dict[str, Any]) -> str:
    out = ["## quantforge CI plan", "", f"{esc(result.get('reason') or '')}" + (" · promotion on" if result.get("promote") else " · promotion off"), ""]

    def labels(v: Any) -> str:
        return code(", ".join(v) if isinstance(v, list) else v)

    out += table(["recipe", "target", "kind", "runner"],
                 ([code(e["recipe"]), code(e["target"]), esc(e["kind"]), labels(e["runs_on"])] for e in result["build"]["include"])) \
        or ["_no build jobs_", ""]
    out += table(["recipe", "eval device", "runner"],
                 ([code(e["recipe"]), code(e["device"]), labels(e["runs_on"])] for e in result["eval"]["include"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", nargs="?", type=Path, help="report.json")
    ap.add_argument("--device", help="only this device's eval table")
    ap.add_argument("--title")
    ap.add_argument("--matrix", type=Path, help="render ci_matrix.py's JSON instead of a report")
    args = ap.parse_args(argv)
    if args.matrix:
        print(render_matrix(json.loads(args.matrix.read_text())))
        return 0
    if args.report is None:
        ap.error("give a report.json or --matrix")
    from pipeline.core.report import read_report

    report = read_report(args.report)
    if report is None:
        print(f"## {esc(args.title or 'quantforge')}\n\n_no report at {code(args.report)}: an earlier step failed before writing it_\n")
        return 0
    print(render_report(report, args.device, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
