"""Terminal tables for plan and build (eval tables live in evals.present)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    """A console; piped output (CI logs, files) gets a wide fixed width instead of 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


def plan_table(rows, width: int | None = None):
    """The stages with hit/miss/skip. Skip reasons are long: they follow the table, each once,
    with the stages it applies to. Stage names and statuses never wrap or shrink: at a narrow
    `width` the description is cut first, then the key column goes (``--json`` has the keys),
    then the description."""
    from rich import box
    from rich.console import Console, Group
    from rich.text import Text

    def build(show_key: bool, what: int | None, show_what: bool = True) -> Table:
        # Fixed limits, not ratios: rich gives a ratio column its room by squeezing the others to nothing.
        table = Table(title="plan", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        table.add_column("stage", no_wrap=True)
        table.add_column("status", no_wrap=True)
        if show_key:
            table.add_column("key", no_wrap=True)
        if show_what:
            table.add_column("what", overflow="ellipsis", no_wrap=True, max_width=what)
        for stage, key, status in rows:
            word = status.split(":", 1)[0]
            style = {"hit": "green", "miss": "yellow"}.get(word, "dim")
            table.add_row(stage.name, Text(word, style=style), *([key[:12]] if show_key else []),
                          *([stage.description or stage.kind] if show_what else []))
        return table

    probe = Console(width=10_000)
    table = build(True, None)
    if width is not None:
        for show_key in (True, False):
            base = probe.measure(build(show_key, None, show_what=False)).maximum
            if base + 3 + 12 <= width:  # room for a description of 12 characters at least
                table = build(show_key, width - base - 3)
                break
        else:
            table = build(False, None, show_what=False)
    reasons: dict[str, list[str]] = {}
    for stage, key, status in rows:
        if status.split(":", 1)[0] == "skip":
            reasons.setdefault(status.split(":", 1)[1].strip(), []).append(stage.name)
    notes = [Text(f"skipped ({', '.join(names)}): {reason}") for reason, names in reasons.items()]
    hits = sum(1 for _, _, s in rows if s == "hit")
    keys_shown = any(c.header == "key" for c in table.columns)
    counts = Text(f"{hits} of {len(rows)} stages cached" + ("" if keys_shown else "; keys: --json"))
    return Group(table, *notes, counts)


def print_build_summary(report, results, path: Path) -> None:
    from evals.table import bpw, num, size

    console = make_console()
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    table = Table(title=f"build: {report.recipe}")
    for col in ("artifact", "kind", "status", "bpw", "size", "seconds", "note"):
        table.add_column(col, overflow="fold")
    for a in report.artifacts:
        style = {"built": "green", "failed": "red", "skipped": "yellow"}.get(a.status, "dim")
        secs = num(a.build_seconds, ".1f", "-")
        # bpw of the linear layers (report.json: bpw_linear), formatted as the results table formats it
        table.add_row(a.name, a.kind, f"[{style}]{a.status}[/{style}]", bpw(a.bpw_linear, "-"), size(a.bytes), secs, a.reason or a.format)
    console.print(table)
    console.print("stages: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"   report: {path}")


@contextlib.contextmanager
def stage_progress():
    """A progress bar over the plan's stages on a terminal; nothing when output is piped (CI logs)."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]build"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), transient=True) as bar:
        task = None

        def start(total: int):
            nonlocal task
            task = bar.add_task("", total=total)
            return lambda result: bar.update(task, advance=1, description=f"{result.stage.name}: {result.status}")

        yield start


class TerminalUi:
    """The terminal's side of a job (pipeline.workflow.Ui), handed down by the commands."""

    def progress(self):
        return stage_progress()

    def build_summary(self, report, results, path: Path) -> None:
        print_build_summary(report, results, path)

    def eval_tables(self, report) -> None:
        from evals.present import print_eval_tables

        print_eval_tables(report, make_console())
