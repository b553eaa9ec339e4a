"""One table model per device (evals.table), rendered by every surface with the same cells.

On the real report of the registry tests' mini recipe (fp8 + GGUF Q8_0, built and evaluated by
the real jobs, cached: tests/registry/conftest.py::real_report), evaluated on a second device
where the fp8 artifact fails its gate: the terminal (``quantforge report``), ``--format
markdown``, ``report.html``, the registry's build-run description and each version's
description, and the CI step summary all show the model's columns, in its order, with its cell
text for every row.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evals import table
from pipeline.core.report import Report, write_report
from tests.registry.conftest import real_report  # noqa: F401 - the fixture
from tests.registry.reports import FP8, decide, variant, with_device

HEADERS = [c.header for c in table.COLUMNS]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def report(real_report) -> Report:  # noqa: F811
    """cpu as measured; cuda: the same results decoding faster, fp8's perplexity change over its gate there."""
    r = with_device(variant(real_report, "tbl", devices=["cpu", "cuda"]), "cuda", decode_tps=400.0)
    r.artifact(FP8).evals["cuda"].metrics.delta_ppl_pct = 9.0
    decide(r)
    return r


def model_rows(report: Report, device: str) -> list[list[str]]:
    t = table.for_device(report, device)
    return [[row[c.key] for c in table.COLUMNS] for row in t.rows]


def md_table(lines: list[str], start: int) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose header is lines[start]: (headers, rows of cell text), code spans and escapes undone."""
    def split(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line)[1:-1]
        return [re.sub(r"^`(.*)`$", r"\1", p.strip()).replace("\\|", "|").replace("\\\\", "\\") for p in parts]

    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(split(line))
    return split(lines[start]), rows


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    lines = text.splitlines()
    return [md_table(lines, i) for i, line in enumerate(lines)
            if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|:--")]


class _Cells(HTMLParser):
    """The results tables of an HTML page: device -> rows of cell text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.heads: dict[str, list[str]] = {}
        self._device: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "results" in (a.get("class") or ""):
            self._device = a["data-device"]
            self.tables[self._device], self.heads[self._device] = [], []
        elif self._device and tag == "tr":
            self.tables[self._device].append([])
        elif self._device and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._device and tag == "tr" and not self.tables[self._device][-1]:
            self.tables[self._device].pop()  # the header's row
        if tag == "table":
            self._device = None
        elif self._device and tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            (self.heads[self._device] if tag == "th" else self.tables[self._device][-1]).append(text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_the_model_rows_are_the_report(report):
    """What the model holds: the source then every built artifact, the cells formatted once."""
    rows = {r[0]: dict(zip([c.key for c in table.COLUMNS], r)) for r in model_rows(report, "cuda")}
    assert list(rows) == ["source", *(a.name for a in report.built())]
    for a in report.built():
        m = a.evals["cuda"].metrics
        assert rows[a.name]["bpw"] == f"{a.bpw_linear:.2f}" and rows[a.name]["size"] == table.size(m.size_bytes)
        assert rows[a.name]["dppl"] == f"{m.delta_ppl_pct:+.2f}±{m.delta_ppl_pct_err:.2f}"
        assert rows[a.name]["decode"] == "400.0"
        assert rows[a.name]["gate"].split()[0].rstrip("~") == a.gates.status
    assert rows["source"]["gate"] == "baseline" and rows["source"]["dppl"] == ""
    assert [table.size(n) for n in (None, 0, 512, 5.5 * 2**20, 3 * 2**30)] == ["-", "-", "512 B", "5.5 MiB", "3.0 GiB"]
    assert table.kl(1.4e-5, 1e-6) == "1.4e-05±1.0e-06" and table.kl(0.0837, 0.0053) == "0.0837±0.0053"
    assert table.pm(-2.0, 1.9, "+.1f") == "-2.0±1.9" and table.pm(None, 1.0, ".2f") == "" and table.pm(3.0, None, "+.2f") == "+3.00"
    assert [c.key for c in table.columns(["gate", "artifact", "bpw"])] == ["artifact", "bpw", "gate"]  # the model's order
    with pytest.raises(KeyError, match="no such column: speedup"):
        table.columns(["speedup"])


def test_terminal_and_markdown_show_the_model(report, tmp_path):
    from pipeline.cli.main import app

    path = tmp_path / "tbl" / "report.json"
    path.parent.mkdir()
    write_report(path, report)
    runner = CliRunner()
    term = runner.invoke(app, ["report", str(path), "--wide"], env={"COLUMNS": "80"})
    assert term.exit_code == 0, term.output
    lines = term.output.splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:2] == ["artifact", "runtime"]]
    assert len(heads) == 2
    for device, h in zip(("cpu", "cuda"), heads):
        at = 0
        for head in HEADERS:  # every header, in order
            at = lines[h].index(head, at) + len(head)
        for i, cells in enumerate(model_rows(report, device)):
            line, at = lines[h + 2 + i], 0
            assert line.split()[0] == cells[0]
            for cell in filter(None, cells):  # every non-empty cell, in order
                at = line.index(cell, at) + len(cell)
    md = runner.invoke(app, ["report", str(path), "--format", "markdown"]).output
    assert md_tables(md) == [(HEADERS, model_rows(report, d)) for d in ("cpu", "cuda")]


def test_html_registry_and_ci_summary_show_the_model(report, tmp_path):
    """The same cells on every other surface: HTML (with its classes), the registry's build-run
    description and version descriptions, the CI summary."""
    from evals.html import page
    from pipeline.registry import cards

    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import ci_summary

    want = {d: model_rows(report, d) for d in ("cpu", "cuda")}
    assert next(r for r in want["cuda"] if r[0] == FP8)[-1] == "failed" and want["cpu"] != want["cuda"]

    html = _Cells()
    html.feed(page(report, tmp_path))
    assert html.heads == {d: HEADERS for d in want} and html.tables == want

    note = cards.build_note(report)
    assert md_tables(note) == [(HEADERS, want["cpu"]), (HEADERS, want["cuda"])]
    for a in report.built():
        d = cards.version_description(report, a, "m", "1", "sqlite:///x", "production", None, {})
        rows = [[dev, *next(r for r in want[dev] if r[0] == a.name)[1:]] for dev in ("cpu", "cuda")]
        assert md_tables(d) == [(["device", *HEADERS[1:]], rows)]

    summary = ci_summary.render_report(report)
    assert [t for t in md_tables(summary) if t[0][0] == "artifact" and len(t[0]) == len(HEADERS)] == \
        [(HEADERS, want["cpu"]), (HEADERS, want["cuda"])]
    for line in table.legend(report, "cpu", recommendation=False):
        assert line in note and ci_summary.esc(line) in summary
