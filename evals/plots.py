"""PNG plots next to report.json: quality vs size and decode speed vs size, one point per artifact.

matplotlib with the Agg backend (no display needed, safe in CI and threads).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.report import Report


def _points(report: Report, device: str, metric: str):
    pts = []
    base = report.baseline.get(device)
    if base is not None and getattr(base.metrics, metric) is not None and base.metrics.size_bytes:
        pts.append(("source", base.metrics.size_bytes, getattr(base.metrics, metric)))
    for a in report.artifacts:
        ev = a.evals.get(device)
        if ev is not None and getattr(ev.metrics, metric) is not None and ev.metrics.size_bytes:
            pts.append((a.name, ev.metrics.size_bytes, getattr(ev.metrics, metric)))
    return pts


def _scatter(report: Report, metric: str, ylabel: str, title: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [d for d, info in report.devices.items() if info.status == "done"]
    series = {d: _points(report, d, metric) for d in devices}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for d, pts in series.items():
        if not pts:
            continue
        xs, ys = [p[1] / 2**20 for p in pts], [p[2] for p in pts]
        ax.scatter(xs, ys, label=d)
        for name, x, y in zip([p[0] for p in pts], xs, ys):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (MiB, log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="device")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


PLOTS = ("quality_vs_size.png", "kld_vs_size.png", "decode_vs_size.png")


def _data_key(report: Report) -> str:
    import hashlib
    import json

    devices = sorted(d for d, info in report.devices.items() if info.status == "done")
    data = {d: {m: _points(report, d, m) for m in ("delta_ppl_pct", "kl_mean", "decode_tps")} for d in devices}
    return hashlib.sha256(json.dumps([report.recipe, data], sort_keys=True, default=str).encode()).hexdigest()


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """Write the PNGs; when the plotted numbers are unchanged and the files exist, keep them
    (drawing takes seconds, which would make a fully cached `quantforge eval` slow)."""
    out_dir = Path(out_dir)
    stamp = out_dir / ".plots.sha256"
    key = _data_key(report)
    existing = [out_dir / n for n in PLOTS if (out_dir / n).is_file()]
    if stamp.is_file() and stamp.read_text() == key and existing:
        return existing
    made = [
        _scatter(report, "delta_ppl_pct", "perplexity increase vs source (%)", f"{report.recipe}: quality vs size",
                 out_dir / "quality_vs_size.png"),
        _scatter(report, "kl_mean", "mean KL divergence vs source (nats)", f"{report.recipe}: KLD vs size",
                 out_dir / "kld_vs_size.png"),
        _scatter(report, "decode_tps", "decode tokens/s (batch 1)", f"{report.recipe}: decode speed vs size",
                 out_dir / "decode_vs_size.png"),
    ]
    stamp.write_text(key)
    return [p for p in made if p is not None]
