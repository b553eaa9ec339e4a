"""The results table per device: what each artifact costs and what it buys, next to the source.

One set of columns serves every output: the terminal table (fitted to the terminal's
width: columns are dropped least-essential first and named under the table, ``--wide``
shows them all), Markdown, CSV and JSON (``quantforge report --format``). Names of
runtimes and units are the same on every surface (:func:`runtime_label`, MiB).

Δppl% and KLD carry ± one standard error, computed as ``llama-perplexity`` computes
it; a gate verdict whose threshold lies within ``evals.policy.GATE_Z`` standard errors
of the value is marked ``~`` (marginal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from evals.runtimes import RUNTIME_NAMES, runtime_label
from pipeline.core.report import EvalEntry, Report

#: one name per runtime, on every surface (tables, HTML, plots)
FORMATS = ("table", "markdown", "csv", "json")


def mib(n: Any) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _pm(v: Any, err: Any, fmt: str, err_fmt: str) -> str:
    """'+24.18±1.52' (the ± as llama-perplexity prints it), or the value alone without an error."""
    if v is None:
        return ""
    return format(v, fmt) + (f"±{format(err, err_fmt)}" if err is not None else "")


def _kl(v: Any, err: Any) -> str:
    """Mean KL ± its error: 4 decimals, or 2 significant digits below 0.001 (a near-lossless format
    would print 0.0000±0.0000)."""
    if v is None:
        return ""
    fmt = ".4f" if abs(v) >= 1e-3 or v == 0 else ".1e"
    return _pm(v, err, fmt, fmt)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    priority: int  # 0: always shown; higher: dropped first when the terminal is narrow
    left: bool = False


COLUMNS = (
    Column("artifact", "artifact", 0, left=True),
    Column("runtime", "runtime", 6, left=True),
    Column("bpw", "bpw", 2),
    Column("bpw_all", "bpw all", 12),
    Column("size", "size", 5),
    Column("ppl", "ppl", 11),
    Column("dppl", "Δppl%", 1),
    Column("kld", "KLD", 3),
    Column("kld_p99", "KLD p99", 13),
    Column("top1", "top1%", 7),
    Column("tasks", "tasks%", 9),
    Column("dtasks", "Δtasks", 10),
    Column("prefill", "prefill t/s", 14),
    Column("decode", "decode t/s", 8),
    Column("ceiling", "ceiling t/s", 15),
    Column("gate", "gate", 0, left=True),
)


def _task_delta(ev: EvalEntry) -> tuple[float, float] | None:
    """Mean change in task accuracy vs the source, in points, with its paired standard error."""
    deltas = [t for t in ev.tasks.values() if t.delta is not None]
    if not deltas:
        return None
    mean = 100 * sum(t.delta for t in deltas) / len(deltas)
    se = 100 * math.sqrt(sum((t.delta_stderr or 0) ** 2 for t in deltas)) / len(deltas)
    return mean, se


def _entries(report: Report, device: str):
    yield "source", report.baseline.get(device) or EvalEntry(), None
    for a in report.built():
        yield a.name, a.evals.get(device) or EvalEntry(), a


def records(report: Report, device: str) -> list[dict[str, Any]]:
    """The table's rows as numbers (JSON and CSV): one dict per model, None where not measured."""
    from evals.policy import marginal

    rec = report.recommendations.get(device)
    out = []
    src = report.source
    for name, ev, a in _entries(report, device):
        m = ev.metrics
        td = _task_delta(ev) if a else None
        out.append({
            "device": device, "artifact": name, "status": ev.status, "reason": ev.reason,
            "runtime": RUNTIME_NAMES.get(ev.runtime, ev.runtime) if ev.runtime else None, "dequantized": ev.dequantized,
            "bpw_linear": a.bpw_linear if a else (src.bpw_linear if src else None),
            "bpw_model": a.bpw_model if a else (src.bpw_model if src else None),
            "size_bytes": m.size_bytes or (a.bytes if a else None), "perplexity": m.perplexity,
            "delta_ppl_pct": m.delta_ppl_pct if a else None, "delta_ppl_pct_err": m.delta_ppl_pct_err if a else None,
            "kl_mean": m.kl_mean if a else None, "kl_mean_err": m.kl_mean_err if a else None,
            "kl_p99": m.kl_p99 if a else None, "top1_agreement_pct": m.top1_agreement_pct if a else None,
            "task_accuracy_pct": None if m.task_accuracy is None else 100 * m.task_accuracy,
            "delta_tasks_pts": td[0] if td else None, "delta_tasks_pts_err": td[1] if td else None,
            "prefill_tps": m.prefill_tps, "decode_tps": m.decode_tps, "decode_bound_tps": m.decode_bound_tps,
            "roofline_pct": m.roofline_pct,
            "gate": "baseline" if a is None else (a.gates.status if a.gates else None),
            "gate_marginal": bool(a is not None and marginal(a.gates, device)),
            "recommended": bool(a is not None and rec is not None and rec.artifact == a.name),
        })
    return out


def cells(r: dict[str, Any]) -> dict[str, str]:
    """One record as the table's text cells."""
    gate = r["gate"] or "-"
    if r["gate_marginal"]:
        gate += "~"
    if r["recommended"]:
        gate += " *"
    src = r["artifact"] == "source" and r["gate"] == "baseline"
    base = {"artifact": r["artifact"], "runtime": runtime_label(r["runtime"], r["dequantized"]) if r["runtime"] else "-",
            "bpw": _f(r["bpw_linear"], ".2f"), "bpw_all": _f(r["bpw_model"], ".2f"), "size": mib(r["size_bytes"])}
    if r["status"] in ("skipped", "failed", "pending") and r["perplexity"] is None:
        return {**{c.key: "" for c in COLUMNS}, **base, "ppl": r["status"], "gate": gate}
    return {
        **base,
        "ppl": _f(r["perplexity"], ".3f"),
        "dppl": "" if src else _pm(r["delta_ppl_pct"], r["delta_ppl_pct_err"], "+.2f", ".2f"),
        "kld": "" if src else _kl(r["kl_mean"], r["kl_mean_err"]),
        "kld_p99": _f(r["kl_p99"], ".3f"),
        "top1": _f(r["top1_agreement_pct"], ".1f"),
        "tasks": _f(r["task_accuracy_pct"], ".1f"),
        "dtasks": "" if r["delta_tasks_pts"] is None else f"{r['delta_tasks_pts']:+.1f}±{r['delta_tasks_pts_err']:.1f}",
        "prefill": _f(r["prefill_tps"], ",.0f"), "decode": _f(r["decode_tps"], ",.1f"),
        "ceiling": _f(r["decode_bound_tps"], ",.0f"),
        "gate": gate if r["status"] == "done" or src else f"{gate} ({r['status']})",
    }


def done_devices(report: Report, devices: list[str] | None = None) -> list[str]:
    return [d for d, info in report.devices.items() if info.status == "done" and (not devices or d in devices)]


# ------------------------------------------------------------------ text outputs
def markdown(report: Report, devices: list[str] | None = None) -> str:
    out = []
    for device in done_devices(report, devices):
        out.append(f"### {report.recipe} on {device}\n")
        out.append("| " + " | ".join(c.header for c in COLUMNS) + " |")
        out.append("|" + "|".join(":--" if c.left else "--:" for c in COLUMNS) + "|")
        for r in records(report, device):
            row = cells(r)
            out.append("| " + " | ".join(row[c.key].replace("|", "\\|") for c in COLUMNS) + " |")
        out += ["", *legend(report, device), ""]
    return "\n".join(out)


def csv_text(report: Report, devices: list[str] | None = None) -> str:
    import csv
    import io

    rows = [r for d in done_devices(report, devices) for r in records(report, d)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["device", "artifact"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def json_rows(report: Report, devices: list[str] | None = None) -> list[dict[str, Any]]:
    return [r for d in done_devices(report, devices) for r in records(report, d)]


def legend(report: Report, device: str) -> list[str]:
    """The lines under a device's table: what the columns mean, the recommendation, the source's provenance."""
    from evals.policy import GATE_Z

    lines = []
    rec = report.recommendations.get(device)
    if rec is not None:
        lines.append(f"recommended on {device}: {rec.artifact} (*) - {rec.reason}" if rec.artifact
                     else f"recommended on {device}: none - {rec.reason}")
    lines.append("bpw: bits per weight of the linear layers (bpw all: of the whole model), counted from the files; "
                 f"Δppl%, KLD: ± one standard error; gate ~: a check within {GATE_Z:g} standard errors of its threshold")
    info = report.devices.get(device)
    bw = info.bandwidth if info else {}
    if bw.get("bandwidth_gbs"):
        lines.append(f"ceiling t/s: the batch-1 decode bound the format buys, {bw['bandwidth_gbs']} GB/s ({bw.get('method')}) "
                     "/ its stored weight bytes read per token; dq: low-bit weights were dequantized to run (no low-bit "
                     "kernels), so that row's speed is not the format's")
    scores = [t for a in report.built() for t in (a.evals.get(device) or EvalEntry()).tasks.values()]
    if scores:
        n = max((t.samples or 0) for t in scores)
        lines.append(f"tasks%: mean accuracy on {', '.join(sorted({t.task for t in scores}))} ({n} items each, "
                     "lm-evaluation-harness); Δtasks: mean change vs the source in points ± its paired standard error")
    lineage = report.source.lineage if report.source else {}
    if lineage.get("quantized"):
        kinds = ", ".join(t for t in (lineage.get("tensor_types") or {}) if not t.startswith(("F", "BF")))
        lines.append(f"source: dequantized from a GGUF ({kinds}); GGUF types on the same blocks re-represent it almost "
                     "exactly, which favours them in this comparison")
    return lines


# ------------------------------------------------------------------ terminal
def device_table(report: Report, device: str, width: int | None):
    """(rich Table, hidden column headers): the columns that fit in `width` (None: all)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    info = report.devices[device]
    fp = info.fingerprint
    rows = [cells(r) for r in records(report, device)]
    shown = list(COLUMNS)

    def build(cols):
        title = f"{report.recipe} on {device}: {fp.get('gpu') or fp.get('cpu_model', '')} [{info.fingerprint_hash or ''}]"
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for c in cols:
            t.add_column(c.header, justify="left" if c.left else "right", no_wrap=True)
        for row in rows:
            t.add_row(*(row[c.key] for c in cols))
        return t

    table = build(shown)
    if width is not None:
        probe = Console(width=10_000)
        while probe.measure(table).maximum > width and any(c.priority for c in shown):
            worst = max(shown, key=lambda c: c.priority)
            shown.remove(worst)
            table = build(shown)
    hidden = [c.header for c in COLUMNS if c not in shown]
    return table, hidden


def fit_width(console) -> int | None:
    """The width to fit tables to: $COLUMNS when set (also for piped output: `COLUMNS=100 quantforge
    report ... | less`), else the terminal's; None when piped without it (every column, unwrapped)."""
    import os

    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    return console.width if console.is_terminal else None


def render(report: Report, console, devices: list[str] | None = None, wide: bool = False) -> None:
    """Print one table per device of the report (pending devices as one line) on `console` (a rich
    Console the CLI hands down). On a terminal the columns that do not fit its width are left out
    and named; `wide` (and piped output) shows all."""
    for device, info in report.devices.items():
        if devices and device not in devices:
            continue
        if info.status != "done":
            console.print(f"{device}: {info.status} - {info.reason or ''}", markup=False)
            continue
        fit = None if wide else fit_width(console)
        table, hidden = device_table(report, device, fit)
        if fit is None:
            from rich.console import Console

            # Console.print caps its width at the console's: widen the console itself for this table.
            need = Console(width=10_000).measure(table).maximum
            old = console.width
            console.width = max(need, old)
            try:
                console.print(table, crop=False)
            finally:
                console.width = old
        else:
            console.print(table)
        notes = [f"{r['artifact']}: {r['status']}: {r['reason']}" for r in records(report, device)
                 if r["status"] in ("skipped", "failed") and r["reason"]]
        if hidden:
            notes.append(f"not shown at this width: {', '.join(hidden)} (--wide shows every column; --format "
                         "markdown|csv|json writes them all)")
        for line in notes + legend(report, device):
            # Fitted: wrapped at the same width, continuation lines indented; otherwise one line each (logs, grep).
            if fit is not None:
                import textwrap

                line = textwrap.fill(line, width=max(fit - 1, 20), initial_indent="  ", subsequent_indent="    ",
                                     break_on_hyphens=False)
            else:
                line = "  " + line
            console.print(line, markup=False, soft_wrap=True)


def print_eval_tables(report: Report, console) -> None:
    """What `quantforge eval` prints."""
    render(report, console)
