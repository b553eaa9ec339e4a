"""A rich table per device: what each artifact costs and what it buys, next to the source."""

from __future__ import annotations

from typing import Any

from pipeline.report import Report

COLUMNS = ("artifact", "runtime", "size", "ppl", "Δppl%", "KLD", "top1%", "prefill t/s", "decode t/s",
           "%roof", "gate")
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


def rows_for_device(report: Report, device: str, notes: list[str] | None = None) -> list[list[str]]:
    """Table rows; the reasons of skipped or failed rows go to `notes` (they are long)."""
    rows = []
    entries = [("source", report.baseline.get(device, {}), None)]
    entries += [(a.name, a.evals.get(device, {}), a) for a in report.artifacts if a.status == "built"]
    for name, ev, a in entries:
        m = ev.get("metrics", {})
        status = ev.get("status", "pending")
        gate = "baseline" if a is None else (a.gates or {}).get("status", "-")
        if status in ("skipped", "failed", "pending") and not m:
            if notes is not None and ev.get("reason"):
                notes.append(f"{name}: {status}: {ev['reason']}")
            rows.append([name, ev.get("runtime", "-"), _size(a.bytes if a else None), status, "", "", "", "", "", "", gate])
            continue
        deq = " dq" if ev.get("dequantized") else ""
        rt = ev.get("runtime", "-")
        rows.append([
            name, f"{RUNTIME_SHORT.get(rt, rt)}{deq}", _size(m.get("size_bytes")), _f(m.get("perplexity"), ".3f"),
            _f(m.get("delta_ppl_pct"), "+.2f") if a else "", _f(m.get("kl_mean"), ".4f"),
            _f(m.get("top1_agreement_pct"), ".1f"), _f(m.get("prefill_tps"), ",.0f"), _f(m.get("decode_tps"), ",.1f"),
            _f(m.get("roofline_pct"), ".0f"), gate if status == "done" else f"{gate} ({status})",
        ])
    return rows


def render(report: Report, console=None) -> None:
    """Print one table per device of the report (pending devices as one line)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        from pipeline.summary import make_console

        console = make_console()
    for device, info in report.devices.items():
        if info.get("status") != "done":
            console.print(f"[bold]{device}[/]: {info.get('status')} - {info.get('reason', '')}")
            continue
        fp = info.get("fingerprint", {})
        title = f"{report.recipe} on {device}: {fp.get('gpu') or fp.get('cpu_model', '')} [{info.get('fingerprint_hash', '')}]"
        table = Table(title=title, title_justify="left")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c in ("artifact", "runtime", "gate") else "right")
        notes: list[str] = []
        for row in rows_for_device(report, device, notes):
            table.add_row(*row)
        console.print(table)
        for note in notes:
            console.print(f"  {note}", markup=False)
        bw = info.get("bandwidth", {})
        if bw.get("bandwidth_gbs"):
            console.print(f"  %roof: decode tok/s as % of {bw['bandwidth_gbs']} GB/s ({bw.get('method')}) / weight bytes "
                          "read per token; dq: low-bit weights were dequantized to run (no low-bit kernels)")


def print_eval_tables(report: Report, console=None) -> None:
    """What `quantforge eval` prints (the name pipeline.workflow calls)."""
    render(report, console)
