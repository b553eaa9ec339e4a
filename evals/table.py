"""The results table of one device, and the one formatter of its sizes and numbers.

One model per device (:func:`for_device`): the columns (:data:`COLUMNS`, in order), one
record per model as numbers (:func:`records`: the source, then every built artifact) and
each record's text cells (:func:`cells`), and the lines that explain them (:func:`legend`).
Every surface renders it: the terminal table and ``quantforge report --format``
(:mod:`evals.present`), ``report.html`` (:mod:`evals.html`), the registry's build-run and
experiment descriptions and each version's description (:mod:`pipeline.registry.cards`),
and the CI step summary (``scripts/ci_summary.py``). A surface may show a subset of the
columns (by key, in the model's order) and add markup (HTML classes, Markdown code spans);
the text of every cell is the model's, so columns and formats cannot drift between them.

Sizes, ± errors, KL divergences, percentages and bits per weight are formatted here
(:func:`size`, :func:`pm`, :func:`kl`, :func:`num`, :func:`bpw`), for the other tables
of the same surfaces too (builds, plans).

Δppl% and KLD carry ± one standard error, computed as ``llama-perplexity`` computes it;
a gate verdict whose threshold lies within ``evals.policy.GATE_Z`` standard errors of the
value is marked ``~`` (marginal); ``*`` marks the artifact recommended on the device.

Imports nothing heavy (no rich, no plotting): the registry and the CI summary use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from evals.runtimes import RUNTIME_NAMES, runtime_label
from pipeline.core.report import EvalEntry, Report


# ------------------------------------------------------------------ formatting
def size(n: Any, missing: str = "-") -> str:
    """Bytes in powers of 1024, said so: '6.8 MiB', '512 B'; `missing` when unknown."""
    if not n:
        return missing
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(v: Any, fmt: str, missing: str = "") -> str:
    """`v` in the format spec `fmt` ('.3f', ',.0f', '+.2f'); `missing` when not measured."""
    return missing if v is None else format(v, fmt)


def bpw(v: Any, missing: str = "") -> str:
    """Bits per weight: '4.63'."""
    return num(v, ".2f", missing)


def pm(v: Any, err: Any, fmt: str, err_fmt: str | None = None) -> str:
    """'+24.18±1.52' (the ± as llama-perplexity prints it), or the value alone without an error.
    `err_fmt` defaults to `fmt` without its sign (an error has none)."""
    if v is None:
        return ""
    err_fmt = fmt.replace("+", "") if err_fmt is None else err_fmt
    return format(v, fmt) + (f"±{format(err, err_fmt)}" if err is not None else "")


def kl(v: Any, err: Any) -> str:
    """Mean KL ± its error: 4 decimals, or 2 significant digits below 0.001 (a near-lossless format
    would print 0.0000±0.0000)."""
    if v is None:
        return ""
    fmt = ".4f" if abs(v) >= 1e-3 or v == 0 else ".1e"
    return pm(v, err, fmt, fmt)


def md_cell(text: Any) -> str:
    """A cell's text safe inside a Markdown table: one line, no pipes or raw HTML."""
    t = " ".join(("" if text is None else str(text)).split())
    return t.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------ the model
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
KEYS = tuple(c.key for c in COLUMNS)


def columns(keys: Iterable[str] | None = None) -> list[Column]:
    """The model's columns, or those named in `keys`, in the model's order."""
    if keys is None:
        return list(COLUMNS)
    keys = set(keys)
    unknown = keys - set(KEYS)
    if unknown:
        raise KeyError(f"no such column: {', '.join(sorted(unknown))} (columns: {', '.join(KEYS)})")
    return [c for c in COLUMNS if c.key in keys]


def _task_delta(ev: EvalEntry) -> tuple[float, float] | None:
    """Mean change in task accuracy vs the source, in points, with its paired standard error."""
    deltas = [t for t in ev.tasks.values() if t.delta is not None]
    if not deltas:
        return None
    mean = 100 * sum(t.delta for t in deltas) / len(deltas)
    se = 100 * math.sqrt(sum((t.delta_stderr or 0) ** 2 for t in deltas)) / len(deltas)
    return mean, se


def entries(report: Report, device: str):
    """(name, eval entry, artifact or None for the source): the table's models, in its order."""
    yield "source", report.baseline.get(device) or EvalEntry(), None
    for a in report.built():
        yield a.name, a.evals.get(device) or EvalEntry(), a


def records(report: Report, device: str) -> list[dict[str, Any]]:
    """The table's rows as numbers (JSON and CSV): one dict per model, None where not measured."""
    from evals.policy import marginal

    rec = report.recommendations.get(device)
    out = []
    src = report.source
    for name, ev, a in entries(report, device):
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
    """One record as the table's text cells (column key -> text)."""
    gate = r["gate"] or "-"
    if r["gate_marginal"]:
        gate += "~"
    if r["recommended"]:
        gate += " *"
    src = r["artifact"] == "source" and r["gate"] == "baseline"
    base = {"artifact": r["artifact"], "runtime": runtime_label(r["runtime"], r["dequantized"]) if r["runtime"] else "-",
            "bpw": bpw(r["bpw_linear"]), "bpw_all": bpw(r["bpw_model"]), "size": size(r["size_bytes"])}
    if r["status"] in ("skipped", "failed", "pending") and r["perplexity"] is None:
        return {**{c.key: "" for c in COLUMNS}, **base, "ppl": r["status"], "gate": gate}
    return {
        **base,
        "ppl": num(r["perplexity"], ".3f"),
        "dppl": "" if src else pm(r["delta_ppl_pct"], r["delta_ppl_pct_err"], "+.2f"),
        "kld": "" if src else kl(r["kl_mean"], r["kl_mean_err"]),
        "kld_p99": num(r["kl_p99"], ".3f"),
        "top1": num(r["top1_agreement_pct"], ".1f"),
        "tasks": num(r["task_accuracy_pct"], ".1f"),
        "dtasks": pm(r["delta_tasks_pts"], r["delta_tasks_pts_err"], "+.1f"),
        "prefill": num(r["prefill_tps"], ",.0f"), "decode": num(r["decode_tps"], ",.1f"),
        "ceiling": num(r["decode_bound_tps"], ",.0f"),
        "gate": gate if r["status"] == "done" or src else f"{gate} ({r['status']})",
    }


@dataclass(frozen=True)
class DeviceTable:
    """One device's table: its records (numbers) and rows (their text cells), in the same order."""

    device: str
    records: list[dict[str, Any]]
    rows: list[dict[str, str]] = field(default_factory=list)

    def row(self, artifact: str) -> dict[str, str] | None:
        """The text cells of the model named `artifact` ('source' for the source), if in the table."""
        return next((row for r, row in zip(self.records, self.rows) if r["artifact"] == artifact), None)

    def markdown(self, keys: Iterable[str] | None = None, code: Iterable[str] = ()) -> list[str]:
        """The table as Markdown lines (header, alignment, one line per model); the columns in
        `code` as code spans (the registry and CI write names so)."""
        return markdown_lines(columns(keys), self.rows, code)


def for_device(report: Report, device: str) -> DeviceTable:
    recs = records(report, device)
    return DeviceTable(device, recs, [cells(r) for r in recs])


def markdown_lines(cols: list[Column], rows: list[dict[str, str]], code: Iterable[str] = ()) -> list[str]:
    code = set(code)

    def cell(c: Column, text: str) -> str:
        t = md_cell(text)
        return f"`{t.replace('`', chr(39))}`" if c.key in code and t else t

    out = ["| " + " | ".join(md_cell(c.header) for c in cols) + " |",
           "|" + "|".join(":--" if c.left else "--:" for c in cols) + "|"]
    out += ["| " + " | ".join(cell(c, row[c.key]) for c in cols) + " |" for row in rows]
    return out


def done_devices(report: Report, devices: list[str] | None = None) -> list[str]:
    return [d for d, info in report.devices.items() if info.status == "done" and (not devices or d in devices)]


def legend(report: Report, device: str, recommendation: bool = True) -> list[str]:
    """The lines under a device's table: what the columns mean, the recommendation (unless the
    surface says it elsewhere), the source's provenance."""
    from evals.policy import GATE_Z

    lines = []
    rec = report.recommendations.get(device)
    if rec is not None and recommendation:
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
