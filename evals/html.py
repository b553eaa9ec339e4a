"""One self-contained HTML page per recipe, next to report.json: what a person opens to decide.

Tables per device (the table model of :mod:`evals.table`: the terminal's columns and
cell text, the recommended artifact marked), per-task scores, the plots (inline PNG), the
gates' verdicts with the failed checks, the build facts and the lineage. No
scripts, no external resources: it opens from a CI artifact, an MLflow run's
artifacts view, or a mail attachment the same way.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from evals import table
from pipeline.core.report import EvalEntry, Report

PAGE = "report.html"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1440px;color:#1b1f24;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums;font-size:.92em}
/* sixteen columns: the table scrolls inside its own box rather than past the page's edge */
.wide{overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:right}th{background:#f6f8fa}
td:not(.l){white-space:nowrap}figure{margin:1em 0}figcaption{max-width:1100px}
td.l,th.l{text-align:left}tr.recommended{background:#dafbe1;font-weight:600}tr.source{background:#f6f8fa}
.passed{color:#1a7f37}.failed{color:#cf222e}.pending,.unverified,.skipped{color:#9a6700}
.note{color:#57606a;font-size:.92em}td.dequantized{font-style:italic}td.marginal{text-decoration:underline dotted}.rec{background:#dafbe1;border:1px solid #4ac26b;padding:.6em 1em;border-radius:6px;display:inline-block}
img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0}code{background:#f6f8fa;padding:0 .3em;border-radius:4px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _results(report: Report, device: str) -> str:
    """The device's results table: the columns, rows and cell text of the table model
    (:mod:`evals.table`, as in the terminal), with classes for the source, the recommended
    row, dequantized runtimes, and the gate's verdict."""
    t = table.for_device(report, device)

    def td(c: table.Column, r: dict, text: str) -> str:
        cls = ["l"] if c.left else []
        title = ""
        if c.key == "gate":
            cls += [r["gate"] or "pending"] + (["marginal"] if r["gate_marginal"] else [])
        elif c.key == "runtime" and r["dequantized"]:
            cls.append("dequantized")
        elif c.key == "ceiling" and r["roofline_pct"] is not None:
            title = f' title="decode reached {table.num(r["roofline_pct"], ".0f")} % of it"'
        return f'<td class="{" ".join(cls)}"{title}>{_e(text)}</td>' if cls else f"<td{title}>{_e(text)}</td>"

    head = "".join(f'<th class="l">{_e(c.header)}</th>' if c.left else f"<th>{_e(c.header)}</th>" for c in table.COLUMNS)
    body = []
    for r, row in zip(t.records, t.rows):
        cls = "source" if r["artifact"] == "source" and r["gate"] == "baseline" else ("recommended" if r["recommended"] else "")
        body.append(f'<tr class="{cls}">' + "".join(td(c, r, row[c.key]) for c in table.COLUMNS) + "</tr>")
    return (f"<div class='wide'><table class='results' data-device='{_e(device)}'><thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div>")


def _tasks(report: Report, device: str) -> str:
    """Per lm-eval task: accuracy ± its error, and an artifact's change from the source ± the
    paired error (the results table has their mean), formatted as the table formats them."""
    models = list(table.entries(report, device))
    names = sorted({n for _, ev, _ in models for n in ev.tasks})
    if not names:
        return ""

    def cell(ev: EvalEntry, name: str, is_source: bool) -> str:
        s = ev.tasks.get(name)
        if s is None:
            return "<td></td>"
        text = table.pm(100 * s.value, None if s.stderr is None else 100 * s.stderr, ".1f")
        if not is_source and s.delta is not None:
            d = table.pm(100 * s.delta, None if s.delta_stderr is None else 100 * s.delta_stderr, "+.1f")
            text = f"{_e(text)} <span class='note'>Δ {_e(d)}</span>"
        return f"<td>{text}</td>"

    head = "<th class='l'>artifact</th>" + "".join(f"<th>{_e(n)}%</th>" for n in names)
    rows = "".join(f"<tr><td class='l'>{_e(m)}</td>" + "".join(cell(ev, n, a is None) for n in names) + "</tr>" for m, ev, a in models)
    return (f"<table class='tasks' data-device='{_e(device)}'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            "<p class='note'>Per task: accuracy ± its error; Δ: the change from the source in points ± its paired error "
            "(same items).</p>")


def device_section(report: Report, device: str, folder: Path | None = None) -> str:
    from evals.policy import describe_check

    info = report.devices[device]
    fp = info.fingerprint
    rec = report.recommendations.get(device)
    notes = [f"{r['artifact']}: {r['status']}: {r['reason']}" for r in table.records(report, device)
             if r["status"] in ("skipped", "failed") and r["reason"]]
    for a in report.built():
        for check in (a.gates.checks if a.gates else []):
            if check.device == device and check.name != "evaluated" and (not check.passed or check.clear is False):
                notes.append(f"{a.name}: {describe_check(check)}")
    where = fp.get("gpu") or fp.get("cpu_model", "")
    out = [f"<h2 id='device-{_e(device)}'>{_e(device)}: {_e(where)} <span class='note'>[{_e(info.fingerprint_hash)}]</span></h2>"]
    if rec is not None:
        text = f"Ship <b>{_e(rec.artifact)}</b> (*) on {_e(device)}: {_e(rec.reason)}" if rec.artifact else f"Nothing to ship on {_e(device)}: {_e(rec.reason)}"
        out.append(f'<p class="rec" id="recommended-{_e(device)}">{text}</p>')
        if rec.pareto:
            out.append(f"<p class='note'>Pareto front ({_e(rec.front or 'size vs KL divergence')}): {_e(', '.join(rec.pareto))}"
                       + (f"; at equal bits (linear-layer bits per weight vs KL): {_e(', '.join(rec.pareto_bits))}" if rec.pareto_bits else "")
                       + "</p>")
    out.append(_results(report, device))
    out += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    out += [f"<p class='note'>{_e(line)}</p>" for line in table.legend(report, device, recommendation=False)]
    out.append(_tasks(report, device))
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
                           f"<td>{table.bpw(a.bpw_linear)}</td><td>{table.bpw(a.bpw_model)}</td><td>{table.size(a.bytes)}</td>"
                           f"<td>{table.num(a.build_seconds, '.1f')}</td><td class='l {_e(a.status)}'>{_e(a.status)}{': ' + _e(a.reason) if a.reason else ''}</td>"
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
