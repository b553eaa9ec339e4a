"""What people look at: the per-device plots and the HTML report, from a real build + eval.

The report is the registry tests' mini recipe (fp8 + GGUF Q8_0 on the trained mini model),
built and evaluated on cpu by the real build and eval jobs (cached under .pytest_cache,
tests/registry/conftest.py::real_report); the views are written by the eval job's own
``evals.run.write_views``. The HTML page is opened in a real headless browser (Debian's
``chromium``; the test skips, saying so, where it is not installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from evals.table import COLUMNS, for_device
from pipeline.core.report import Report, write_report
from tests.registry.conftest import real_report  # noqa: F401 - the fixture
from tests.registry.reports import variant, with_device

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


@pytest.fixture
def report(real_report) -> Report:  # noqa: F811
    return real_report.model_copy(deep=True)


def two_devices(report: Report) -> Report:
    """The recipe evaluated on cpu and cuda (the cuda results: the real cpu ones, decoding faster)."""
    return with_device(variant(report, "views", devices=["cpu", "cuda"]), "cuda", decode_tps=400.0)


def views(report: Report, folder: Path) -> Path:
    """report.json, plots and report.html in `folder`, as the eval job writes them."""
    from evals.run import write_views

    folder.mkdir(parents=True, exist_ok=True)
    write_report(folder / "report.json", report)
    lines: list[str] = []
    write_views(report, folder, lines.append)
    assert not any("not written" in line for line in lines), lines
    return folder / "report.html"


def crowded(report: Report, n: int = 6) -> Report:
    """The real report plus `n` copies of its fp8 artifact with nearly the same numbers
    (formats that measure alike: their labels compete for the same place)."""
    r = report.model_copy(deep=True)
    fp8 = r.artifact("fp8")
    for i in range(n):
        a = fp8.model_copy(deep=True)
        a.name = f"fp8-copy-{i}"
        m = a.evals["cpu"].metrics
        m.size_bytes = int(m.size_bytes * (1 + 0.004 * i))
        for k in ("delta_ppl_pct", "kl_mean", "decode_tps"):
            setattr(m, k, getattr(m, k) * (1 + 0.01 * i))
        r.artifacts.append(a)
    return r


# ------------------------------------------------------------------ plots
def test_one_figure_per_device_replaces_the_per_metric_files(report, tmp_path):
    from evals.plots import LEGACY, STAMP, bits_name, plot_name, write_plots

    two = two_devices(report)
    for name in LEGACY:  # what an older quantforge left there
        (tmp_path / name).write_bytes(b"old")
    made = write_plots(two, tmp_path)
    assert sorted(p.name for p in made) == ["bits-cpu.png", "bits-cuda.png", "plots-cpu.png", "plots-cuda.png"] \
        == sorted([plot_name(d) for d in ("cpu", "cuda")] + [bits_name(d) for d in ("cpu", "cuda")])
    assert not any((tmp_path / n).exists() for n in LEGACY)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)
    # Unchanged numbers: the PNGs are kept, not drawn again.
    mtimes = {p: p.stat().st_mtime_ns for p in made}
    time.sleep(0.01)
    assert write_plots(two, tmp_path) == made and {p: p.stat().st_mtime_ns for p in made} == mtimes
    # A device no longer evaluated loses its PNG (what register uploads is what the report shows).
    assert sorted(p.name for p in write_plots(report, tmp_path)) == ["bits-cpu.png", "plots-cpu.png"]
    assert not (tmp_path / "plots-cuda.png").exists() and not (tmp_path / "bits-cuda.png").exists() and (tmp_path / STAMP).is_file()
    assert plot_name("cuda:0") == "plots-cuda_0.png"


def test_figure_reads_plainly(report):
    """Plain MiB ticks, the source as a point, the gate as a line, a marker per runtime
    with the dequantized one hollow, the recommended artifact named in bold."""
    import matplotlib.pyplot as plt

    from evals.plots import figure

    cfg = dict(report.recipe_config)
    cfg["gates"] = {**cfg["gates"], "max_perplexity_increase_pct": 5.0, "max_kl_divergence": 0.05}
    report.recipe_config = cfg
    rec = report.recommendations["cpu"].artifact
    fig = figure(report, "cpu")
    try:
        axes = fig.axes
        assert [a.get_ylabel() for a in axes] == ["perplexity increase vs source (%)", "mean KL divergence from source (nats)",
                                                  "decode tokens/s (batch 1)"]
        fig.canvas.draw()
        ticks = [t.get_text() for t in axes[-1].get_xticklabels() if t.get_text()]
        assert len(ticks) >= 3 and all(re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", t) for t in ticks), ticks
        assert "MiB" in axes[-1].get_xlabel()
        gate_lines = [ln.get_ydata()[0] for ln in axes[0].lines if ln.get_linestyle() == "--"]
        assert gate_lines == [5.0] and [ln.get_ydata()[0] for ln in axes[1].lines if ln.get_linestyle() == "--"] == [0.05]
        for ax in axes:
            labels = {t.get_text(): t for t in ax.texts}
            assert "source" in labels and f"★ {rec}" in labels and labels[f"★ {rec}"].get_fontweight() == "bold"
            assert set(labels) >= {"source", *(f"★ {a.name}" if a.name == rec else a.name for a in report.built())}
        # fp8 ran dequantized in transformers (hollow), the GGUF natively in llama.cpp (filled).
        markers = [c for c in axes[2].collections if len(c.get_offsets()) == 1 and c.get_sizes()[0] == 46]
        hollow = [c for c in markers if len(c.get_facecolors()) == 0 or c.get_facecolors()[0][3] == 0]
        assert len(markers) == 3 and len(hollow) == 1
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "dequantized: speed is dense compute" in legend and "runtime: llama.cpp" in legend and "runtime: transformers" in legend
        assert f"recommended on cpu: {rec}" in legend and "recipe gate (threshold)" in legend
    finally:
        plt.close(fig)


def test_labels_do_not_overlap(report):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from evals.plots import figure

    busy = crowded(report)
    fig = figure(busy, "cpu")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, not its leader line
            assert len(boxes) == 1 + len(busy.built())
            inside = ax.get_window_extent(renderer)
            for i, a in enumerate(boxes):
                assert inside.x0 - 1 <= a.x0 and a.x1 <= inside.x1 + 1 and inside.y0 - 1 <= a.y0 and a.y1 <= inside.y1 + 1
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (ax.get_ylabel(), a, b)
    finally:
        plt.close(fig)


def test_nice_ticks_are_round_numbers():
    from evals.plots import _mib, nice_ticks

    assert nice_ticks(80, 270, log=False) == [100, 150, 200, 250]
    log = nice_ticks(50, 15000, log=True)
    assert 4 <= len(log) <= 8 and all(float(f"{t:.2g}") == t for t in log)
    assert [_mib(v) for v in (7.5, 20, 150, 14336)] == ["7.5", "20", "150", "14,336"]


# ------------------------------------------------------------------ the HTML page
class _Dom(HTMLParser):
    """The parts of the rendered DOM the test reads: title, result tables, rows, images."""

    def __init__(self):
        super().__init__()
        self.title, self.tables, self.rows, self.images = "", [], [], 0
        self._stack: list[tuple[str, dict]] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "results" in (a.get("class") or ""):
            self.tables.append(a.get("data-device"))
        if tag == "tr":
            self.rows.append({"class": a.get("class") or "", "text": ""})
        if tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1
        self._stack.append((tag, a))

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self._stack and self._stack[-1][0] == "title":
            self.title += data
        if any(t == "tr" for t, _ in self._stack) and self.rows:
            self.rows[-1]["text"] += data


def chromium(url: str, screenshot: Path, profile: Path, height: int = 2400) -> str:
    """The DOM after the page rendered, and a screenshot of it."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size=1280,{height}", f"--screenshot={screenshot}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_chromium
def test_report_html_renders_in_a_browser(report, tmp_path):
    two = two_devices(report)
    page = views(two, tmp_path / two.recipe)
    shot = tmp_path / "report.png"
    dom = _Dom()
    dom.feed(chromium(page.as_uri(), shot, tmp_path / "profile"))
    assert dom.title == f"{two.recipe}: quantforge report"
    assert dom.tables == ["cpu", "cuda"] and dom.images == 4  # a table and two figures per device
    recs = [two.recommendations[d].artifact for d in ("cpu", "cuda")]
    assert all(recs)
    recommended = [r["text"] for r in dom.rows if "recommended" in r["class"].split()]
    assert len(recommended) == 2 and all(rec in text for rec, text in zip(recs, recommended))
    sources = [r["text"] for r in dom.rows if "source" in r["class"].split()]
    assert len(sources) == 2
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a page with tables and figures, not a blank one


def test_report_html_states_bits_errors_links_and_commands(report, tmp_path):
    """The page's table has bits per weight and ± errors, per-task changes; it links its sections and
    files, embeds the quality-per-bit figure, and lists the commands that show and remake it."""
    import subprocess
    import sys

    page = views(report, tmp_path / report.recipe)
    text = page.read_text()
    dom = _Dom()
    dom.feed(text)
    assert dom.images == 2 and 'id="bits-cpu"' in text
    header = next(r["text"] for r in dom.rows)
    assert header == "".join(c.header for c in COLUMNS)  # the table model's columns, as the terminal's
    model = for_device(report, "cpu")
    for a in report.built():
        row = next(r["text"] for r in dom.rows if r["text"].startswith(a.name))
        m = a.evals["cpu"].metrics
        assert row == "".join(model.row(a.name)[c.key] for c in COLUMNS)
        assert f"{a.bpw_linear:.2f}" in row and f"{a.bpw_model:.2f}" in row
        assert f"{m.delta_ppl_pct:+.2f}±{m.delta_ppl_pct_err:.2f}" in row
        tasks = "".join(r["text"] for r in dom.rows if r["text"].startswith(a.name))  # and its row of per-task scores
        for t in a.evals["cpu"].tasks.values():
            assert f"Δ {t.delta * 100:+.1f}" in tasks
    for target in re.findall(r"href='#([^']+)'", text):
        assert f"id='{target}'" in text or f'id="{target}"' in text, target
    for f in re.findall(r"href='([^#'][^']*)'", text):
        assert (page.parent / f).is_file(), f
    # The report command printed on the page runs as printed (from the report's folder).
    cmd = re.search(r"<code>(quantforge report [^<]+)</code>", text).group(1)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *cmd.split()[1:], "--format", "json"],
                         cwd=page.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_quality_per_bit_figure(report):
    """Δppl and KL against the bits each artifact stores on its linear layers, with error bars and the
    front; the recommendation names the front it was chosen from."""
    import matplotlib.pyplot as plt

    from evals.plots import bits_figure
    from tests.registry.reports import decide

    decide(report)  # as the eval job decides (the cached report may predate this code)
    rec = report.recommendations["cpu"]
    assert rec.front == "size vs KL divergence" and f"Pareto front ({', '.join(rec.pareto)})" in rec.reason
    assert rec.pareto_bits and set(rec.pareto_bits) <= {"source", *(a.name for a in report.built())}
    fig = bits_figure(report, "cpu")
    try:
        assert [a.get_ylabel() for a in fig.axes] == ["perplexity increase vs source (%)", "mean KL divergence from source (nats)"]
        assert "bits per weight" in fig.axes[-1].get_xlabel()
        for ax, metric in zip(fig.axes, ("delta_ppl_pct", "kl_mean")):
            dots = {tuple(c.get_offsets()[0]) for c in ax.collections if type(c).__name__ == "PathCollection" and c.get_sizes()[0] == 46}
            want = {(report.source.bpw_linear, 0.0)} | {(a.bpw_linear, getattr(a.evals["cpu"].metrics, metric)) for a in report.built()}
            assert {(round(x, 6), round(y, 9)) for x, y in dots} == {(round(x, 6), round(y, 9)) for x, y in want}
            if metric == "kl_mean":  # the source (0 KL) and the fewest-bits artifact are always on this front
                assert any(ln.get_linestyle() == ":" for ln in ax.lines)
            assert len([c for c in ax.collections if type(c).__name__ == "LineCollection"]) == len(report.built())  # error bars
    finally:
        plt.close(fig)
