"""One self-contained HTML page per recipe, next to report.json: what a person opens to decide.

Tables per device (the recommended artifact marked), the plots (inline PNG), the
gates' verdicts with the failed checks, the build facts and the lineage. No
scripts, no external resources: it opens from a CI artifact, an MLflow run's
artifacts view, or a mail attachment the same way.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pipeline.core.report import EvalEntry, Report

PAGE = "report.html"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#1b1f24;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:right}th{background:#f6f8fa}
td:not(.l){white-space:nowrap}figure{margin:1em 0}figcaption{max-width:1100px}
td.l,th.l{text-align:left}tr.recommended{background:#dafbe1;font-weight:600}tr.source{background:#f6f8fa}
.passed{color:#1a7f37}.failed{color:#cf222e}.pending,.unverified,.skipped{color:#9a6700}
.note{color:#57606a;font-size:.92em}.rec{background:#dafbe1;border:1px solid #4ac26b;padding:.6em 1em;border-radius:6px;display:inline-block}
img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0}code{background:#f6f8fa;padding:0 .3em;border-radius:4px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _small(v, fmt: str) -> str:
    """Like _num, but a nonzero value that `fmt` would print as zero keeps 2 significant digits
    (below 1e-8 it is rounding noise: the source against itself)."""
    if v is not None and abs(v) >= 1e-8 and float(format(v, fmt)) == 0:
        return format(v, ".1e")
    return _num(v, fmt)


def _size(n) -> str:
    return "" if not n else f"{n / 2**20:,.1f} MiB"


def _pm(v, err, fmt: str, small: bool = False) -> str:
    """A value ± its standard error (as llama-perplexity prints it)."""
    if v is None:
        return ""
    text = _small(v, fmt) if small else _num(v, fmt)
    efmt = fmt.lstrip("+")  # an error has no sign
    return text + (f" ± {_small(err, efmt) if small else _num(err, efmt)}" if err is not None else "")


def _task_cell(ev: EvalEntry, task: str, is_source: bool) -> str:
    """Accuracy ± its error; for an artifact also its change from the source ± the paired error."""
    t = ev.tasks.get(task)
    if t is None:
        return ""
    text = _num(t.value * 100, ".1f") + (" ± " + _num(t.stderr * 100, ".1f") if t.stderr else "")
    if not is_source and t.delta is not None:
        text += f"<br><span class='note'>Δ {t.delta * 100:+.1f}" + (f" ± {t.delta_stderr * 100:.1f}" if t.delta_stderr is not None else "") + "</span>"
    return text


def _row(name: str, ev: EvalEntry, gate: str, cls: str, tasks: list[str], bpw: tuple = (None, None)) -> str:
    from evals.runtimes import runtime_label

    m = ev.metrics
    src = cls == "source"
    cells = [
        f'<td class="l">{_e(name)}</td>',
        f'<td class="l">{_e(runtime_label(ev.runtime, ev.dequantized))}</td>',
        f"<td>{_num(bpw[0], '.2f')}</td>",
        f"<td>{_num(bpw[1], '.2f')}</td>",
        f"<td>{_size(m.size_bytes)}</td>",
        f"<td>{_num(m.perplexity, '.3f')}</td>",
        f"<td>{'' if src else _pm(m.delta_ppl_pct, m.delta_ppl_pct_err, '+.2f')}</td>",
        f"<td>{'' if src else _pm(m.kl_mean, m.kl_mean_err, '.4f', small=True)}</td>",
        f"<td>{_small(m.kl_p99, '.3f')}</td>",
        f"<td>{_num(m.top1_agreement_pct, '.1f')}</td>",
        *[f"<td>{_task_cell(ev, t, src)}</td>" for t in tasks],
        f"<td>{_num(m.prefill_tps, ',.0f')}</td>",
        f"<td>{_num(m.decode_tps, ',.1f')}</td>",
        f"<td>{_num(m.decode_bound_tps, ',.0f')}{' (' + _num(m.roofline_pct, '.0f') + ' %)' if m.roofline_pct is not None else ''}</td>",
        f'<td class="l {gate.split()[0]}">{_e(gate)}</td>',
    ]
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>"


def device_section(report: Report, device: str, folder: Path | None = None) -> str:
    from evals.policy import GATE_Z, describe_check, marginal

    info = report.devices[device]
    fp = info.fingerprint
    rec = report.recommendations.get(device)
    tasks = sorted({t for a in report.built() for t in (a.evals.get(device) or EvalEntry()).tasks}
                   | set((report.baseline.get(device) or EvalEntry()).tasks))
    head = ["artifact", "runtime", "bpw linear", "bpw model", "size", "ppl", "Δppl % ± s.e.", "KL mean ± s.e.", "KL p99", "top-1 %",
            *[f"{t} %" for t in tasks], "prefill tok/s", "decode tok/s", "ceiling tok/s (% reached)", "gate"]
    src = report.source
    rows = [_row("source", report.baseline.get(device) or EvalEntry(), "baseline", "source", tasks,
                 (src.bpw_linear, src.bpw_model) if src else (None, None))]
    notes = []
    for a in report.built():
        ev = a.evals.get(device) or EvalEntry()
        gate = a.gates.status if a.gates else "-"
        recommended = rec is not None and rec.artifact == a.name
        if marginal(a.gates, device):
            gate += " (marginal)"
        rows.append(_row(a.name + (" (recommended)" if recommended else ""), ev, gate if ev.status == "done" else f"{gate} ({ev.status})",
                         "recommended" if recommended else "", tasks, (a.bpw_linear, a.bpw_model)))
        if ev.reason:
            notes.append(f"{a.name}: {ev.status}: {ev.reason}")
        for check in (a.gates.checks if a.gates else []):
            if check.device == device and check.name != "evaluated" and (not check.passed or check.clear is False):
                notes.append(f"{a.name}: {describe_check(check)}")
    where = fp.get("gpu") or fp.get("cpu_model", "")
    out = [f"<h2 id='device-{_e(device)}'>{_e(device)}: {_e(where)} <span class='note'>[{_e(info.fingerprint_hash)}]</span></h2>"]
    if rec is not None:
        text = f"Ship <b>{_e(rec.artifact)}</b> on {_e(device)}: {_e(rec.reason)}" if rec.artifact else f"Nothing to ship on {_e(device)}: {_e(rec.reason)}"
        out.append(f'<p class="rec" id="recommended-{_e(device)}">{text}</p>')
        if rec.pareto:
            out.append(f"<p class='note'>Pareto front ({_e(rec.front or 'size vs KL divergence')}): {_e(', '.join(rec.pareto))}"
                       + (f"; at equal bits (linear-layer bits per weight vs KL): {_e(', '.join(rec.pareto_bits))}" if rec.pareto_bits else "")
                       + "</p>")
    out.append(f"<table class='results' data-device='{_e(device)}'><thead><tr>" + "".join(f'<th class="{"l" if h in ("artifact", "runtime", "gate") else ""}">{_e(h)}</th>' for h in head)
               + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    out += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    out.append("<p class='note'>bpw: bits per weight counted from the artifact's files, of the decoder's linear layers and of "
               "the whole model. ± one standard error, computed as llama-perplexity does; a gate check is marginal when its "
               f"threshold lies within {GATE_Z:g} standard errors of the value. Task cells: accuracy ± its error, and the change "
               "from the source ± its paired error (same items).</p>")
    bw = info.bandwidth
    if bw.get("bandwidth_gbs"):
        out.append(f"<p class='note'>Ceiling: the batch-1 decode bound the format buys, {bw['bandwidth_gbs']} GB/s ({_e(bw.get('method'))}) "
                   "divided by the artifact's stored weight bytes read per token; in brackets, the share of it the measured "
                   "decode reached. Dequantized: the runtime expanded low-bit weights to floats (no low-bit kernels ran), "
                   "so its speed is not the format's.</p>")
    if folder is not None:
        out.append(_plot(folder, device))
        out.append(_bits_plot(folder, device))
    return "\n".join(out)


def _bits_plot(folder: Path, device: str) -> str:
    from evals.plots import bits_name

    p = Path(folder) / bits_name(device)
    if not p.is_file():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure id="bits-{_e(device)}"><img alt="{_e(device)}: perplexity increase and KL divergence against bits per weight" '
            f'src="data:image/png;base64,{data}"><figcaption class="note">Quality per bit: each format at the bits it stores on the '
            "linear layers; error bars ± one standard error; ringed: the Pareto front (fewer bits, less damage). "
            f'<a href="{_e(p.name)}">{_e(p.name)}</a></figcaption></figure>')


def _plot(folder: Path, device: str) -> str:
    """The device's figure (evals/plots.py), inline, so the page stays one self-contained file."""
    from evals.plots import plot_path

    p = plot_path(folder, device)
    if not p.is_file():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img alt="{_e(device)}: quality, KL divergence and decode speed against size" src="data:image/png;base64,{data}">'
            "<figcaption class='note'>Marker shape: the runtime that measured it; hollow: that runtime dequantized the weights, "
            "so its speed is dense compute; colour: the gate verdict; dashed line: the recipe's gate; ringed: on the Pareto front; "
            "star: the recommended artifact.</figcaption></figure>")


def _commands(report: Report) -> str:
    """The commands that show and remake this page, to run from the page's own folder
    (``<artifacts-dir>/<recipe>/``: the artifacts dir is its parent), as printed."""
    import shlex

    recipe = shlex.quote(report.recipe_path or f"{report.recipe}.yaml")
    devices = [d for d in report.devices] or ["cpu"]
    cmds = [
        ("quantforge report report.json", "this table in the terminal (--format markdown|csv|json, --wide)"),
        *[(f"quantforge eval {recipe} --device {shlex.quote(d)} --artifacts-dir ..", f"measure again on {d} (cached stages are reused)")
          for d in devices],
        (f"quantforge run {recipe} --artifacts-dir ..", "build, evaluate and register"),
    ]
    return ("<h2 id='commands'>Commands</h2><p class='note'>From this page's folder:</p><table><tbody>"
            + "".join(f"<tr><td class='l'><code>{_e(c)}</code></td><td class='l'>{_e(w)}</td></tr>" for c, w in cmds)
            + "</tbody></table>")


def page(report: Report, folder: Path) -> str:
    src = report.source
    parts = [f"<h1>{_e(report.recipe)}</h1>"]
    if src is not None:
        lineage = src.lineage or {}
        parts.append(f"<p>Source <code>{_e(src.model)}</code> ({_e(src.dtype)}), fingerprint <code>{_e(src.fingerprint[:16])}</code>"
                     + (f"; from <code>{_e(lineage.get('file'))}</code> (sha256 <code>{_e(str(lineage.get('sha256'))[:16])}</code>"
                        + (f", {_e(lineage.get('package'))}" if lineage.get("package") else "") + ")" if lineage else "") + ".</p>")
        if not lineage and src.commit:
            parts.append(f"<p class='note'>Revision <code>{_e(src.commit)}</code>.</p>")
        if lineage.get("note"):
            parts.append(f"<p class='note'>Note: {_e(lineage['note'])}.</p>")
    links = [f"<a href='#device-{_e(d)}'>{_e(d)}</a>" for d, i in report.devices.items() if i.status == "done"]
    files = [f"<a href='{_e(n)}'>{_e(n)}</a>" for n in ["report.json", *sorted(p.name for p in Path(folder).glob("*.png"))]
             if (Path(folder) / n).is_file()]
    parts.append("<p>Devices: " + (", ".join(links) or "none evaluated") + " · <a href='#builds'>builds</a> · "
                 "<a href='#commands'>commands</a>" + (" · files: " + ", ".join(files) if files else "") + "</p>")
    for device, info in report.devices.items():
        if info.status == "done":
            parts.append(device_section(report, device, folder))
        else:
            parts.append(f"<h2>{_e(device)}</h2><p class='pending'>{_e(info.status)}: {_e(info.reason)}</p>")
    parts.append("<h2 id='builds'>Builds</h2><table><thead><tr><th class='l'>artifact</th><th class='l'>format</th>"
                 "<th>bpw linear</th><th>bpw model</th><th>size</th>"
                 "<th>build s</th><th class='l'>status</th><th class='l'>content sha256</th></tr></thead><tbody>"
                 + "".join(f"<tr><td class='l'>{_e(a.name)}</td><td class='l'>{_e(a.format)}</td>"
                           f"<td>{_num(a.bpw_linear, '.2f')}</td><td>{_num(a.bpw_model, '.2f')}</td><td>{_size(a.bytes)}</td>"
                           f"<td>{_num(a.build_seconds, '.1f')}</td><td class='l {_e(a.status)}'>{_e(a.status)}{': ' + _e(a.reason) if a.reason else ''}</td>"
                           f"<td class='l'><code>{_e((a.content_sha256 or '')[:16])}</code></td></tr>" for a in report.artifacts)
                 + "</tbody></table>")
    parts.append(_commands(report))
    tools = ", ".join(f"{k} {v}" for k, v in sorted(report.tools.items()))
    parts.append(f"<p class='note'>Recipe sha256 <code>{_e(report.recipe_sha256[:16])}</code>; quantforge {_e(report.quantforge_version)}"
                 f"{'; git ' + _e(report.git_commit[:12]) if report.git_commit else ''}; {_e(tools)}; updated {_e(report.updated)}.</p>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(report.recipe)}: quantforge report</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def write_html(report: Report, folder: Path) -> Path:
    out = Path(folder) / PAGE
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page(report, Path(folder)), encoding="utf-8")
    tmp.replace(out)
    return out
