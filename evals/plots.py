"""PNG plots next to report.json: one figure per device, what each artifact costs and what it gives.

``plots-<device>.png`` (:func:`plot_name`) has one panel per measure against artifact
size: perplexity increase and mean KL divergence from the source, decode tokens/s,
and task-accuracy recovery when tasks ran. On every panel:

* the source is its own point (black), every artifact one point coloured by its gate
  verdict on that device (passed / failed / undecided);
* the marker shape names the runtime that measured it; a hollow marker means that
  runtime dequantized the weights (no low-bit kernels ran: its speed is dense compute);
* the recipe's gate threshold is a dashed line where the recipe sets one;
* artifacts on the device's Pareto front are ringed, and the front is drawn on the
  KL panel when it is the size-vs-KL front; the recommended artifact is a star with
  its name in bold;
* sizes read in plain MiB (``100``, ``150``, ``200``), never ``4×10⁰``;
* point labels are placed where they overlap neither another label nor a point
  (tried offsets around each point; a leader line when the near ones are taken).

``bits-<device>.png`` (:func:`bits_name`) compares formats at equal bits: perplexity
increase and mean KL (each ± one standard error) against the linear layers' bits per
weight counted from the files, every artifact and the source, with each panel's Pareto
front drawn (fewer bits and less damage) and the gate lines.

matplotlib with the Agg backend (no display needed, safe in CI and threads).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.report import EvalEntry, Report

#: bump when the drawing changes, so cached PNGs are drawn again
PLOT_VERSION = "4"
PREFIX = "plots-"
#: file names of the one-figure-per-metric plots of quantforge <= 0.2 (removed when found)
LEGACY = ("quality_vs_size.png", "kld_vs_size.png", "decode_vs_size.png")
STAMP = ".plots.sha256"

GATE_COLOURS = {True: "#1a7f37", False: "#cf222e", None: "#8c959f"}
GATE_WORDS = {True: "passed the gates", False: "failed a gate", None: "gates undecided"}
GREY = "#57606a"
SOURCE_COLOUR = "#1b1f24"
RUNTIME_MARKERS = {"transformers": "o", "llama_cpp": "s", "modelopt_dequant": "D", "vllm": "^", "tensorrt_llm": "v", "sglang": "P"}
OTHER_MARKERS = ("p", "h", "X", "<", ">", "*")


BITS_PREFIX = "bits-"


def bits_name(device: str) -> str:
    """The quality-vs-bits PNG of one device."""
    return f"{BITS_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.png"


def plot_name(device: str) -> str:
    """The PNG of one device (a file name: anything but letters, digits, ``._-`` becomes ``_``)."""
    return f"{PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.png"


def plot_path(folder: Path, device: str) -> Path:
    return Path(folder) / plot_name(device)


# ------------------------------------------------------------------ the data
@dataclass(frozen=True)
class Point:
    name: str
    size_mib: float
    value: float
    runtime: str
    dequantized: bool
    passed: bool | None  # the gate verdict on this device (None: undecided); the source: None
    source: bool = False
    pareto: bool = False
    recommended: bool = False
    err: float | None = None  # one standard error of `value` (drawn as an error bar)


@dataclass(frozen=True)
class Panel:
    metric: str
    ylabel: str
    points: tuple[Point, ...]
    gate: float | None
    gate_label: str
    front: bool  # draw the Pareto front through this panel's points (the size-vs-KL front)


PANELS = (
    # metric, y label, gate field, gate direction
    ("delta_ppl_pct", "perplexity increase vs source (%)", "max_perplexity_increase_pct", "max"),
    ("kl_mean", "mean KL divergence from source (nats)", "max_kl_divergence", "max"),
    ("decode_tps", "decode tokens/s (batch 1)", "min_decode_speedup", "min"),
    ("task_recovery_pct", "task accuracy recovery (% of source)", "min_task_accuracy_recovery_pct", "min"),
)


def _source_value(metric: str, base: EvalEntry) -> float | None:
    """The source against itself: 0 % more perplexity, 0 KL, 100 % recovery; its own speed."""
    m = base.metrics
    if metric == "delta_ppl_pct":
        return 0.0 if m.perplexity is not None else None
    if metric == "kl_mean":
        return 0.0 if m.perplexity is not None or m.kl_mean is not None else None
    if metric == "task_recovery_pct":
        return 100.0 if base.tasks or m.task_accuracy is not None else None
    return getattr(m, metric, None)


def error_of(metric: str, ev: EvalEntry, base: EvalEntry | None) -> float | None:
    """One standard error of a plotted value: Δppl and KL from the accuracy statistics; task
    recovery from the tasks' paired errors of the change, relative to the source's accuracy."""
    m = ev.metrics
    if metric == "delta_ppl_pct":
        return m.delta_ppl_pct_err
    if metric == "kl_mean":
        return m.kl_mean_err
    if metric == "task_recovery_pct":
        deltas = [t for t in ev.tasks.values() if t.delta_stderr is not None]
        src = base.metrics.task_accuracy if base is not None else None
        if deltas and src:
            return 100.0 * math.sqrt(sum(t.delta_stderr ** 2 for t in deltas)) / len(deltas) / src
    return None


def panels(report: Report, device: str) -> list[Panel]:
    """What one device's figure shows: one panel per measure that has at least one artifact point."""
    gates = (report.recipe_config or {}).get("gates") or {}
    rec = report.recommendations.get(device)
    front = set(rec.pareto) if rec else set()
    recommended = rec.artifact if rec else None
    base = report.baseline.get(device)
    out = []
    for metric, ylabel, gate_field, direction in PANELS:
        speed = metric == "decode_tps"
        pts: list[Point] = []
        if base is not None and base.status == "done" and base.metrics.size_bytes:
            v = _source_value(metric, base)
            if v is not None:
                pts.append(Point("source", base.metrics.size_bytes / 2**20, float(v),
                                 (base.speed_runtime if speed else None) or base.runtime or "?", bool(base.dequantized),
                                 None, source=True, pareto="source" in front))
        for a in report.built():
            ev = a.evals.get(device)
            if ev is None or ev.status != "done":
                continue
            v = getattr(ev.metrics, metric, None)
            size = ev.metrics.size_bytes or a.bytes
            if v is None or not size or (isinstance(v, float) and not math.isfinite(v)):
                continue
            passed = a.gates.per_device().get(device) if a.gates else None
            pts.append(Point(a.name, size / 2**20, float(v), (ev.speed_runtime if speed else None) or ev.runtime or "?",
                             bool(ev.dequantized), passed, pareto=a.name in front, recommended=a.name == recommended,
                             err=error_of(metric, ev, base)))
        if not any(not p.source for p in pts):
            continue
        threshold = gates.get(gate_field)
        gate, label = None, ""
        if threshold is not None:
            if metric == "decode_tps":  # the gate is a speed-up over the source
                src = next((p.value for p in pts if p.source), None)
                if src:
                    gate, label = src * float(threshold), f"recipe gate: ≥ {threshold:g}× the source's decode speed"
            else:
                gate = float(threshold)
                label = f"recipe gate: {'≤' if direction == 'max' else '≥'} {threshold:g}"
        out.append(Panel(metric, ylabel, tuple(pts), gate, label,
                         front=metric == "kl_mean" and (rec is None or rec.criterion == "smallest") and len(front) > 1))
    return out


def _devices(report: Report) -> list[str]:
    return [d for d, info in report.devices.items() if info.status == "done"]


def _data_key(report: Report) -> str:
    data = {d: [asdict(p) for p in panels(report, d) + bits_panels(report, d)] for d in _devices(report)}
    where = {d: report.devices[d].fingerprint_hash for d in data}
    return hashlib.sha256(json.dumps([PLOT_VERSION, report.recipe, where, data], sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ axes helpers
def _mib(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.1f}"
    return f"{v:.2g}" if v >= 0.1 else f"{v:.1g}"


def nice_ticks(lo: float, hi: float, log: bool) -> list[float]:
    """4-8 round tick values between lo and hi (MiB): 1-2-5 steps, finer when the range is narrow."""
    if hi <= lo:
        return [lo]
    if log:
        for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)):
            ticks = [m * 10**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1) for m in mantissas]
            ticks = [t for t in ticks if lo <= t <= hi]
            if len(ticks) >= 4:
                return ticks[:: max(1, math.ceil(len(ticks) / 8))]
        return ticks
    raw = (hi - lo) / 6
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _marker(runtime: str, seen: dict[str, str]) -> str:
    if runtime not in seen:
        seen[runtime] = RUNTIME_MARKERS.get(runtime) or OTHER_MARKERS[len([r for r in seen if r not in RUNTIME_MARKERS]) % len(OTHER_MARKERS)]
    return seen[runtime]


# Label positions tried around a point, in points: (dx, dy, ha, va); the second ring gets a leader line.
NEAR = [(7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"), (-7, -4, "right", "top"),
        (0, 9, "center", "bottom"), (0, -9, "center", "top"), (10, 0, "left", "center"), (-10, 0, "right", "center")]
FAR = [(dx, dy, "left" if dx > 0 else "right" if dx < 0 else "center", "bottom" if dy > 0 else "top" if dy < 0 else "center")
       for r in (22, 34, 48) for dx, dy in ((r, r * 0.6), (r, -r * 0.6), (-r, r * 0.6), (-r, -r * 0.6), (0, r), (0, -r), (r * 1.3, 0), (-r * 1.3, 0))]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, points: list[tuple[float, float, str, bool]], renderer) -> list:
    """Annotate (x, y, text, bold) points without overlaps: each label takes the first tried
    position that is inside the axes and clear of every point and placed label."""
    from matplotlib.transforms import Bbox

    axbox = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    r = 7 * renderer.points_to_pixels(1.0)
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in dots]
    texts = []
    # Crowded points first (they have the fewest free places), the recommended one before all.
    def crowd(i):
        px, py = dots[i]
        return (not points[i][3], -sum(1 for qx, qy in dots if abs(qx - px) < 80 and abs(qy - py) < 40))

    for i in sorted(range(len(points)), key=crowd):
        x, y, text, bold = points[i]
        best = None
        for dx, dy, ha, va in NEAR + FAR:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8,
                            fontweight="bold" if bold else "normal", zorder=6,
                            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))
            bb = t.get_window_extent(renderer)
            inside = axbox.x0 <= bb.x0 and bb.x1 <= axbox.x1 and axbox.y0 <= bb.y0 and bb.y1 <= axbox.y1
            cost = sum(_overlap(bb, o) for o in taken) + (0 if inside else 1e6)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, bb, (dx, dy))
            else:
                t.remove()
            if cost == 0:
                break
        _, t, bb, (dx, dy) = best
        if math.hypot(dx, dy) > 15:
            t.remove()
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=t.get_ha(), va=t.get_va(), fontsize=8,
                            fontweight="bold" if bold else "normal", zorder=6,
                            bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85),
                            arrowprops=dict(arrowstyle="-", color="#8c959f", lw=0.7, shrinkA=0, shrinkB=4))
        taken.append(bb)
        texts.append(t)
    return texts


# ------------------------------------------------------------------ drawing
def _pyplot():
    """pyplot with a file backend (no display here), its ticker module and Line2D for legend handles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    return plt, ticker, Line2D


def _frame(report: Report, device: str, n: int, title: str, panel_h: float):
    """A figure of `n` stacked panels sharing the x axis, legend room on the right: (fig, axes, height)."""
    plt, _, _ = _pyplot()
    fig_h = 1.0 + panel_h * n
    fig, axes = plt.subplots(n, 1, figsize=(11, fig_h), dpi=100, sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.70, top=1 - 0.75 / fig_h, bottom=0.6 / fig_h, hspace=0.12)
    info = report.devices.get(device)
    where = (info.fingerprint.get("gpu") or info.fingerprint.get("cpu_model") or "") if info else ""
    fig.suptitle(f"{report.recipe} on {device}{title}" + (f" ({where})" if where else ""), fontsize=12, fontweight="bold")
    return fig, [row[0] for row in axes], fig_h


def _draw_panel(ax, pan: Panel, markers: dict[str, str], renderer, *, zero_floor: bool, hollow_dequantized: bool) -> None:
    """One panel's y range, gate line, Pareto step, points (± errors, front rings, the recommended
    star) and labels; the x axis is the caller's."""
    from matplotlib import ticker

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, alpha=0.3)
    ax.set_ylabel(pan.ylabel, fontsize=9)
    ys = [p.value + sign * (p.err or 0) for p in pan.points for sign in (-1, 1)] + ([pan.gate] if pan.gate is not None else [])
    ylo, yhi = min(ys + ([0.0] if zero_floor else [])), max(ys)
    span = (yhi - ylo) or max(abs(yhi), 1.0)
    ax.set_ylim(ylo - 0.12 * span, yhi + 0.18 * span)
    if pan.gate is not None:
        ax.axhline(pan.gate, color="#cf222e", ls="--", lw=1.1, zorder=1)
    if pan.front:
        front = sorted((p for p in pan.points if p.pareto), key=lambda p: p.size_mib)
        ax.step([p.size_mib for p in front], [p.value for p in front], where="post", color="#0969da", lw=1.0, ls=":", zorder=2)
    for p in pan.points:
        colour = SOURCE_COLOUR if p.source else GATE_COLOURS[p.passed]
        m = _marker(p.runtime, markers)
        if p.pareto:
            ax.scatter([p.size_mib], [p.value], s=260, facecolors="none", edgecolors="#0969da", linewidths=1.0, zorder=3)
        if p.recommended:
            ax.scatter([p.size_mib], [p.value], s=420, marker="*", color="#fff0a0", edgecolors="#bf8700", linewidths=1.0, zorder=4)
        if p.err:
            ax.errorbar([p.size_mib], [p.value], yerr=[p.err], fmt="none", ecolor=colour, elinewidth=1.0, capsize=3, zorder=4)
        ax.scatter([p.size_mib], [p.value], s=46, marker=m, zorder=5, linewidths=1.6,
                   facecolors="none" if hollow_dequantized and p.dequantized else colour, edgecolors=colour)
    place_labels(ax, [(p.size_mib, p.value, ("★ " if p.recommended else "") + p.name, p.recommended or p.source)
                      for p in pan.points], renderer)


def _runtime_and_verdict_handles(shown: list[Panel], markers: dict[str, str]) -> list:
    """Legend entries both figures share: runtimes by marker, the source, the gate verdicts seen."""
    from evals.runtimes import RUNTIME_NAMES

    _, _, Line2D = _pyplot()
    handles = [Line2D([], [], ls="", marker=_marker(rt, markers), color=GREY, markersize=7, label=f"runtime: {RUNTIME_NAMES.get(rt, rt)}")
               for rt in list(markers)]
    handles.append(Line2D([], [], ls="", marker="o", color=SOURCE_COLOUR, markersize=7, label="source model"))
    verdicts = {p.passed for pan in shown for p in pan.points if not p.source}
    handles += [Line2D([], [], ls="", marker="o", color=GATE_COLOURS[v], markersize=7, label=GATE_WORDS[v])
                for v in (True, False, None) if v in verdicts]
    return handles


def _note(fig, fig_h: float, text: str) -> None:
    import textwrap

    fig.text(0.72, 0.6 / fig_h, textwrap.fill(text, 44), fontsize=8, color=GREY, va="bottom")


def figure(report: Report, device: str):
    """One device's matplotlib Figure (None when nothing was measured there); the caller closes it."""
    _, ticker, Line2D = _pyplot()
    shown = panels(report, device)
    if not shown:
        return None
    sizes = [p.size_mib for pan in shown for p in pan.points]
    lo, hi = min(sizes), max(sizes)
    log = hi / lo > 4
    # Room for labels at both ends of the size axis.
    if log:
        xlim = (lo / (hi / lo) ** 0.08, hi * (hi / lo) ** 0.08)
    else:
        pad = max((hi - lo) * 0.08, hi * 0.03)
        xlim = (max(lo - pad, 0), hi + pad)
    rec = report.recommendations.get(device)
    fig, axes, fig_h = _frame(report, device, len(shown), "", 3.0)
    markers: dict[str, str] = {}
    renderer = fig.canvas.get_renderer()
    for ax, pan in zip(axes, shown):
        ax.set_xscale("log" if log else "linear")
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_locator(ticker.FixedLocator(nice_ticks(*xlim, log)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _mib(v)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        # Zero is the source's value for perplexity increase and KL, and a floor for speed; recovery sits near 100 %.
        _draw_panel(ax, pan, markers, renderer, zero_floor=pan.metric != "task_recovery_pct", hollow_dequantized=True)
    axes[-1].set_xlabel("artifact size (MiB" + (", log scale)" if log else ")"), fontsize=9)
    # One legend for the figure, beside the panels.
    handles = _runtime_and_verdict_handles(shown, markers)
    if any(p.err for pan in shown for p in pan.points):
        handles.append(Line2D([], [], color=GREY, marker="|", ls="", markersize=10, label="± one standard error"))
    if any(p.dequantized for pan in shown for p in pan.points):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor=GREY, markeredgewidth=1.6,
                              markersize=7, label="dequantized: speed is dense compute"))
    if any(pan.gate is not None for pan in shown):
        handles.append(Line2D([], [], color="#cf222e", ls="--", lw=1.1, label="recipe gate (threshold)"))
    if rec is not None and rec.pareto:
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="#0969da", markersize=14,
                              label="on the Pareto front" + (" (size vs KL)" if rec.criterion == "smallest" else " (speed vs KL)")))
    if rec is not None and rec.artifact:
        handles.append(Line2D([], [], ls="", marker="*", color="#fff0a0", markeredgecolor="#bf8700", markersize=15,
                              label=f"recommended on {device}: {rec.artifact}"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.715, 1 - 0.75 / fig_h), fontsize=8.5, frameon=False,
               borderaxespad=0.0, handletextpad=0.6, labelspacing=0.9)
    if rec is not None and rec.reason:
        _note(fig, fig_h, ("Ship " + rec.artifact + ": " if rec.artifact else "") + rec.reason)
    return fig


BITS_PANELS = (
    ("delta_ppl_pct", "perplexity increase vs source (%)", "max_perplexity_increase_pct"),
    ("kl_mean", "mean KL divergence from source (nats)", "max_kl_divergence"),
)


def bits_panels(report: Report, device: str) -> list[Panel]:
    """Δppl and KL against linear-layer bits per weight (``Point.size_mib`` holds the bits here)."""
    from evals.policy import pareto_front

    gates = (report.recipe_config or {}).get("gates") or {}
    rec = report.recommendations.get(device)
    base = report.baseline.get(device)
    out = []
    for metric, ylabel, gate_field in BITS_PANELS:
        pts: list[Point] = []
        if base is not None and base.status == "done" and report.source is not None and report.source.bpw_linear:
            pts.append(Point("source", report.source.bpw_linear, 0.0, base.runtime or "?", False, None, source=True))
        for a in report.built():
            ev = a.evals.get(device)
            if ev is None or ev.status != "done" or not a.bpw_linear:
                continue
            v = getattr(ev.metrics, metric, None)
            if v is None or not math.isfinite(v):
                continue
            pts.append(Point(a.name, a.bpw_linear, float(v), ev.runtime or "?", bool(ev.dequantized),
                             a.gates.per_device().get(device) if a.gates else None,
                             recommended=rec is not None and rec.artifact == a.name, err=error_of(metric, ev, base)))
        if not any(not p.source for p in pts):
            continue
        front = set(pareto_front({p.name: (p.size_mib, p.value) for p in pts}))
        pts = [Point(**{**asdict(p), "pareto": p.name in front}) for p in pts]
        threshold = gates.get(gate_field)
        out.append(Panel(metric, ylabel, tuple(pts), None if threshold is None else float(threshold),
                         "" if threshold is None else f"recipe gate: ≤ {threshold:g}", front=len(front) > 1))
    return out


def bits_figure(report: Report, device: str):
    """One device's quality-vs-bits Figure (None when no artifact has bits and accuracy there)."""
    _, ticker, Line2D = _pyplot()
    shown = bits_panels(report, device)
    if not shown:
        return None
    xs = [p.size_mib for pan in shown for p in pan.points]
    lo, hi = min(xs), max(xs)
    pad = max((hi - lo) * 0.08, 0.25)
    fig, axes, fig_h = _frame(report, device, len(shown), ": quality per bit", 3.2)
    markers: dict[str, str] = {}
    renderer = fig.canvas.get_renderer()
    for ax, pan in zip(axes, shown):
        ax.set_xlim(max(lo - pad, 0), hi + pad)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=10, steps=[1, 2, 5, 10]))
        _draw_panel(ax, pan, markers, renderer, zero_floor=True, hollow_dequantized=False)
    axes[-1].set_xlabel("bits per weight of the linear layers (counted from the files)", fontsize=9)
    handles = _runtime_and_verdict_handles(shown, markers)
    handles.append(Line2D([], [], color=GREY, marker="|", ls="", markersize=10, label="± one standard error"))
    if any(pan.gate is not None for pan in shown):
        handles.append(Line2D([], [], color="#cf222e", ls="--", lw=1.1, label="recipe gate (threshold)"))
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="#0969da", markersize=14,
                          label="Pareto front: fewer bits, less damage"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.715, 1 - 0.75 / fig_h), fontsize=8.5, frameon=False,
               borderaxespad=0.0, handletextpad=0.6, labelspacing=0.9)
    lineage = report.source.lineage if report.source else {}
    if lineage.get("quantized"):
        _note(fig, fig_h, "The source was dequantized from a GGUF: GGUF types on the same blocks "
                          "re-represent it almost exactly, which favours them here.")
    return fig


def draw_device(report: Report, device: str, out: Path, make=None) -> Path | None:
    """Write one device's figure to `out` (atomically); None when nothing was measured there."""
    import matplotlib.pyplot as plt

    fig = (make or figure)(report, device)
    if fig is None:
        return None
    tmp = out.with_name(out.name + ".tmp.png")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(out)
    return out


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """Write one PNG per evaluated device; when the plotted numbers are unchanged and the files
    exist, keep them (drawing takes seconds, which would make a fully cached `quantforge eval`
    slow). PNGs of devices no longer evaluated, and the old per-metric files, are removed, so
    what is registered next to the report is what the report shows."""
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP
    key = _data_key(report)
    wanted = {plot_name(d): (d, figure) for d in _devices(report) if panels(report, d)}
    wanted.update({bits_name(d): (d, bits_figure) for d in _devices(report) if bits_panels(report, d)})
    for stale in [*(out_dir / n for n in LEGACY), *out_dir.glob(f"{PREFIX}*.png"), *out_dir.glob(f"{BITS_PREFIX}*.png")]:
        if stale.name not in wanted and stale.is_file():
            stale.unlink()
    existing = [out_dir / n for n in wanted if (out_dir / n).is_file()]
    if stamp.is_file() and stamp.read_text() == key and len(existing) == len(wanted):
        return existing
    made = [draw_device(report, d, out_dir / n, make) for n, (d, make) in wanted.items()]
    stamp.write_text(key)
    return [p for p in made if p is not None]
