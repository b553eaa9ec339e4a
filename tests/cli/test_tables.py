"""The results and plan tables at 80 columns, and the results table as Markdown, CSV and JSON.

On the real report of the registry tests' mini recipe (fp8 + GGUF Q8_0, built and evaluated by
the real jobs, cached: tests/registry/conftest.py::real_report), through the real CLI with
typer's CliRunner and COLUMNS set as a terminal of that width would.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pipeline.core.report import report_path
from tests.registry.conftest import CACHE_ARTIFACTS, real_report  # noqa: F401 - the fixture

runner = CliRunner()


def cli(*args: str, columns: int | None = None):
    from pipeline.cli.main import app

    env = {"COLUMNS": str(columns)} if columns else {"COLUMNS": ""}
    return runner.invoke(app, list(args), env=env)


@pytest.fixture
def report_file(real_report):  # noqa: F811
    return report_path(CACHE_ARTIFACTS, "regmini")


def test_results_table_fits_80_columns(real_report, report_file):  # noqa: F811
    r = cli("report", str(report_file), columns=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    header = next(line for line in lines if line.strip().startswith("artifact"))
    for col in ("bpw", "Δppl%", "KLD", "gate"):
        assert col in header.split(), header
    for a in real_report.built():  # names whole, never cut
        row = next(line for line in lines if line.strip().startswith(a.name + " "))
        assert f"{a.bpw_linear:.2f}" in row
        assert a.gates.status in row
    hidden = next(line for line in lines if "not shown at this width" in line)
    assert "decode t/s" in r.output[r.output.index(hidden):]


def test_wide_shows_every_column(report_file):
    from evals.table import COLUMNS

    r = cli("report", str(report_file), "--wide", columns=80)
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.strip().startswith("artifact"))
    for c in COLUMNS:
        assert c.header in header, c.header
    assert "not shown at this width" not in r.output


def test_formats_carry_every_column_with_the_reports_numbers(real_report, report_file):  # noqa: F811
    from evals.table import COLUMNS

    rows = list(csv.DictReader(io.StringIO(cli("report", str(report_file), "--format", "csv").output)))
    assert [r["artifact"] for r in rows] == ["source"] + [a.name for a in real_report.built()]
    for a in real_report.built():
        row = next(r for r in rows if r["artifact"] == a.name)
        assert float(row["bpw_linear"]) == a.bpw_linear and float(row["bpw_model"]) == a.bpw_model
        acc = a.evals["cpu"].accuracy
        # the ± of Δppl is llama-perplexity's error of the perplexity ratio, in points of %
        assert float(row["delta_ppl_pct_err"]) == pytest.approx(100 * acc["ppl_ratio_err"])
        assert float(row["kl_mean_err"]) == pytest.approx(acc["kl_mean_err"])
        assert row["gate"] == a.gates.status
    md = cli("report", str(report_file), "--format", "markdown", columns=80).output.splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0] == "| " + " | ".join(c.header for c in COLUMNS) + " |"
    assert len(table) == 2 + len(rows)
    js = json.loads(cli("report", str(report_file), "--format", "json").output)
    assert [r["artifact"] for r in js] == [r["artifact"] for r in rows]
    bad = cli("report", str(report_file), "--format", "xml")
    assert bad.exit_code == 2 and "markdown" in bad.output


def test_a_device_without_results_is_an_error(report_file):
    r = cli("report", str(report_file), "-d", "cuda")
    assert r.exit_code == 2
    assert "no results for device 'cuda'" in r.output and "cpu" in r.output


def test_plan_keeps_status_visible_at_80_columns(real_report):  # noqa: F811
    recipe = CACHE_ARTIFACTS.parent / "regmini.yaml"
    stages = json.loads(cli("plan", str(recipe), "--artifacts-dir", str(CACHE_ARTIFACTS), "--json").output)
    for width in (80, 50):
        r = cli("plan", str(recipe), "--artifacts-dir", str(CACHE_ARTIFACTS), columns=width)
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        table = lines[: next(i for i, line in enumerate(lines) if "stages cached" in line or line.startswith("skipped"))]
        assert max(len(line) for line in table) <= width
        for s in stages:
            row = next(line for line in lines if line.split() and line.split()[0] == s["stage"])
            assert f" {s['status']} " in row, (s, row)
    assert {s["status"] for s in stages} & {"hit", "miss"}
