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


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_table(rows):
    """The stages with hit/miss/skip. Skip reasons are long: they follow the table, each once,
    with the stages it applies to. Stage names and keys never wrap mid-word."""
    from rich.console import Group
    from rich.text import Text

    table = Table(title="plan", show_lines=False)
    table.add_column("stage", no_wrap=True)
    table.add_column("key", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("what", overflow="ellipsis", no_wrap=True, ratio=1)
    reasons: dict[str, list[str]] = {}
    for stage, key, status in rows:
        word = status.split(":", 1)[0]
        style = {"hit": "green", "miss": "yellow"}.get(word, "dim")
        table.add_row(stage.name, key[:12], Text(word, style=style), stage.description or stage.kind)
        if word == "skip":
            reasons.setdefault(status.split(":", 1)[1].strip(), []).append(stage.name)
    notes = [Text(f"skipped ({', '.join(names)}): {reason}") for reason, names in reasons.items()]
    hits = sum(1 for _, _, s in rows if s == "hit")
    counts = Text(f"{hits} of {len(rows)} stages cached")
    return Group(table, *notes, counts)


def print_build_summary(report, results, path: Path) -> None:
    console = make_console()
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    table = Table(title=f"build: {report.recipe}")
    for col in ("artifact", "kind", "status", "size", "seconds", "note"):
        table.add_column(col, overflow="fold")
    for a in report.artifacts:
        style = {"built": "green", "failed": "red", "skipped": "yellow"}.get(a.status, "dim")
        secs = f"{a.build_seconds:.1f}" if a.build_seconds is not None else "-"
        table.add_row(a.name, a.kind, f"[{style}]{a.status}[/{style}]", human_bytes(a.bytes), secs, a.reason or a.format)
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
