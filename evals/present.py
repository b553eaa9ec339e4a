"""The results table per device in the terminal and as ``quantforge report --format``.

The table itself (columns, rows, cells, legend, the number formats) is one model per device,
:mod:`evals.table`, which every surface renders. Here: the terminal table (fitted to the
terminal's width: columns are dropped least-essential first and named under the table,
``--wide`` shows them all), Markdown, CSV and JSON. Names of runtimes and units are the same
on every surface (:func:`evals.runtimes.runtime_label`, MiB).
"""

from __future__ import annotations

from typing import Any

from evals.table import COLUMNS, done_devices, for_device, legend, records
from pipeline.core.report import Report

FORMATS = ("table", "markdown", "csv", "json")


# ------------------------------------------------------------------ text outputs
def markdown(report: Report, devices: list[str] | None = None) -> str:
    out = []
    for device in done_devices(report, devices):
        out.append(f"### {report.recipe} on {device}\n")
        out += for_device(report, device).markdown()
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


# ------------------------------------------------------------------ terminal
def device_table(report: Report, device: str, width: int | None):
    """(rich Table, hidden column headers): the columns that fit in `width` (None: all)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    info = report.devices[device]
    fp = info.fingerprint
    rows = for_device(report, device).rows
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
