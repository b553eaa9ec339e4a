"""A rich table per device: what each artifact costs and what it buys, next to the source."""

from __future__ import annotations

from typing import Any

from pipeline.core.report import EvalEntry, Report

COLUMNS = ("artifact", "runtime", "size", "ppl", "Δppl%", "KLD", "KLD p99", "top1%", "tasks%", "Δtasks", "prefill t/s",
           "decode t/s", "ceiling t/s", "gate")
RUNTIME_SHORT = {"transformers": "hf", "llama_cpp": "llama.cpp", "tensorrt_llm": "trt-llm", "modelopt_dequant": "modelopt"}


def _size(n: Any) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _task_delta(ev) -> str:
    """Mean change in task accuracy vs the source, in points, with its paired standard error."""
    import math

    deltas = [t for t in ev.tasks.values() if t.delta is not None]
    if not deltas:
        return ""
    mean = 100 * sum(t.delta for t in deltas) / len(deltas)
    se = 100 * math.sqrt(sum((t.delta_stderr or 0) ** 2 for t in deltas)) / len(deltas)
    return f"{mean:+.1f}±{se:.1f}"


def rows_for_device(report: Report, device: str, notes: list[str] | None = None) -> list[list[str]]:
    """Table rows; the reasons of skipped or failed rows go to `notes` (they are long)."""
    rows = []
    rec = report.recommendations.get(device)
    entries = [("source", report.baseline.get(device) or EvalEntry(), None)]
    entries += [(a.name, a.evals.get(device) or EvalEntry(), a) for a in report.built()]
    for name, ev, a in entries:
        m = ev.metrics
        gate = "baseline" if a is None else (a.gates.status if a.gates else "-")
        if rec is not None and a is not None and rec.artifact == a.name:
            gate += " *"
        if ev.status in ("skipped", "failed", "pending") and m.perplexity is None:
            if notes is not None and ev.reason:
                notes.append(f"{name}: {ev.status}: {ev.reason}")
            rows.append([name, ev.runtime or "-", _size(a.bytes if a else None), ev.status, "", "", "", "", "", "", "", "", "", gate])
            continue
        deq = " dq" if ev.dequantized else ""
        rt = ev.runtime or "-"
        rows.append([
            name, f"{RUNTIME_SHORT.get(rt, rt)}{deq}", _size(m.size_bytes), _f(m.perplexity, ".3f"),
            _f(m.delta_ppl_pct, "+.2f") if a else "", _f(m.kl_mean, ".4f") if a else "", _f(m.kl_p99, ".3f") if a else "",
            _f(m.top1_agreement_pct, ".1f") if a else "", _f(m.task_accuracy * 100 if m.task_accuracy is not None else None, ".1f"),
            _task_delta(ev) if a else "", _f(m.prefill_tps, ",.0f"), _f(m.decode_tps, ",.1f"),
            _f(m.decode_bound_tps, ",.0f"), gate if ev.status == "done" else f"{gate} ({ev.status})",
        ])
    return rows


def render(report: Report, console=None, devices: list[str] | None = None) -> None:
    """Print one table per device of the report (pending devices as one line)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        from pipeline.cli.tables import make_console

        console = make_console()
    for device, info in report.devices.items():
        if devices and device not in devices:
            continue
        if info.status != "done":
            console.print(f"[bold]{device}[/]: {info.status} - {info.reason or ''}")
            continue
        fp = info.fingerprint
        title = f"{report.recipe} on {device}: {fp.get('gpu') or fp.get('cpu_model', '')} [{info.fingerprint_hash or ''}]"
        table = Table(title=title, title_justify="left")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c in ("artifact", "runtime", "gate") else "right")
        notes: list[str] = []
        for row in rows_for_device(report, device, notes):
            table.add_row(*row)
        console.print(table)
        for note in notes:
            console.print(f"  {note}", markup=False)
        rec = report.recommendations.get(device)
        if rec is not None:
            line = f"recommended on {device}: {rec.artifact} (*) - {rec.reason}" if rec.artifact else f"recommended on {device}: none - {rec.reason}"
            console.print("  " + line, markup=False)
        bw = info.bandwidth
        if bw.get("bandwidth_gbs"):
            console.print(f"  ceiling t/s: the batch-1 decode bound the format buys, {bw['bandwidth_gbs']} GB/s ({bw.get('method')}) "
                          "/ its stored weight bytes read per token; dq: low-bit weights were dequantized to run (no low-bit "
                          "kernels), so that row's speed is not the format's", markup=False)
        tasks = sorted({t.task for a in report.built() for t in (a.evals.get(device) or EvalEntry()).tasks.values()})
        if tasks:
            n = max((t.samples or 0) for a in report.built() for t in (a.evals.get(device) or EvalEntry()).tasks.values())
            console.print(f"  tasks%: mean accuracy on {', '.join(tasks)} ({n} items each, lm-evaluation-harness); "
                          "Δtasks: mean change vs the source in points ± its paired standard error", markup=False)


def print_eval_tables(report: Report, console=None) -> None:
    """What `quantforge eval` prints (the name pipeline.workflow calls)."""
    render(report, console)
