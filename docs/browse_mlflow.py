"""Check a quantforge registry as a user meets it in the MLflow UI, and screenshot it.

    .venv/bin/python docs/browse_mlflow.py ARTIFACTS_DIR [--out-dir docs] [--experiment NAME]
                                           [--server URL] [--check-only]

Serves ``ARTIFACTS_DIR/mlflow`` (the local store `quantforge register` writes) with
``scripts/mlflow_server.sh`` on a free loopback port, or reuses a server that script
already runs there, or talks to ``--server``. Talks to MLflow over its REST API only,
so pipeline/registry/ stays the one package that imports mlflow.

**Checks** (exit 1 naming each one that fails, before any screenshot): the experiment
opens in MLflow's model-training view (``mlflow.experimentKind``); its build run carries
the results table per device as its description; every artifact run has the same metric
keys (so the chart and compare views line up across formats); the promotion alias
(``production``) and ``recommended-<device>`` for each device with a recommendation are
set; the recommended version's description has the download and serve commands.

**Screenshots** (headless Chromium, Debian's ``chromium``: ``apt-get install -y chromium``),
each also checked in the rendered page (the DOM after the page's scripts ran):

* ``mlflow-ui.png``       the experiment's runs: one row per format, metric columns
                          (size, perplexity increase, KL, top-1, decode speed, gate);
* ``mlflow-charts.png``   its chart view: size vs KL and a bar chart per metric, formats side by side;
* ``mlflow-compare.png``  MLflow's compare page of every run of the build (the link that
                          ``pipeline.registry.tracking.ui_hint`` prints after `register`);
* ``mlflow-run.png``      the build run: the per-device results table;
* ``mlflow-ui-version.png`` the recommended model version: aliases, download and serve commands;
* ``mlflow-models.png``   the registered models and their aliases.

Nothing is selected by hand: the runs view opens with :func:`formats_view` as the UI's saved
per-experiment state, which a loopback proxy puts into the page's localStorage (headless
``--screenshot`` runs no script of ours first).
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "mlflow_server.sh"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evals.table import columns  # noqa: E402 - the one table model every surface renders

#: how the per-device table starts wherever it is written (its first column's header)
TABLE_HEAD = f"| {columns()[0].header} |"

# Flags from the machine notes: without the background-networking ones Chromium keeps
# trying Google hosts that this closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
WINDOW = (1400, 900)

# MLflow 3.17's UI opens a "new Model Registry UI" promo modal and, on localhost, an
# assistant side panel on first load; both would cover the page. These are the
# localStorage flags (`${key}_v${version}`) the UI reads to skip them; the workflow type
# shows the sidebar of the model-training view (Runs, Models) rather than GenAI's.
UI_FLAGS = {
    "_mlflow_model_registry_promo_modal_dismissed_v1": True,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.workflowType_v1": "machine_learning",
}
# The UI keeps each experiment page's state (columns, expanded runs, charts) in localStorage
# under this key (MLflow 3.17: LocalStorageUtils.getStoreForComponent("ExperimentPage",
# JSON of the sorted experiment ids), version "1.1").
EXPERIMENT_STATE_KEY = "MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"
#: the metrics shown per device, in this order (names of pipeline.core.report.Metrics)
VIEW_METRICS = ("delta_ppl_pct", "kl_mean", "top1_agreement_pct", "decode_tps")


class Problem(Exception):
    pass


# ------------------------------------------------------------------ the view
def formats_view(parent_run_id: str, devices: list[str]) -> dict:
    """The experiment page state that shows a build's formats side by side: the build run
    expanded (its artifact runs as rows, smallest first), metric and gate columns per
    device, every run visible in charts, and a chart section per device with size vs KL
    and a bar chart per metric (metrics logged at step >= 1 would otherwise get line charts).

    The fields are MLflow 3.17's experiment page UI state (``compareRunCharts`` entries are
    its RunsChartsCardConfig: BAR with ``metricKey``, SCATTER with ``xaxis``/``yaxis``). The
    same JSON, stored as the experiment tag ``mlflow.sharedViewState.<key>``, opens with
    ``#/experiments/<id>/runs?viewStateShareKey=<key>`` for anyone.
    """
    columns = ["metrics.`size_mib`"]
    for d in devices:
        columns += [f"metrics.`{d}.{m}`" for m in VIEW_METRICS]
        columns += [f"tags.`gate.{d}.passed`", f"tags.`eval.{d}.runtime`", f"tags.`quantforge.recommended.{d}`"]
    charts, sections = [], []
    for d in devices:
        sid = f"quantforge-{d}"
        sections.append({"uuid": sid, "name": f"Formats side by side on {d}", "display": True, "isReordered": False,
                         "deleted": False, "isGenerated": False})
        charts.append({"uuid": f"{sid}-scatter", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": sid,
                       "deleted": False, "isGenerated": False, "displayName": f"KL divergence vs size ({d})",
                       "xaxis": {"key": "size_mib", "type": "METRIC"}, "yaxis": {"key": f"{d}.kl_mean", "type": "METRIC"}})
        for key in [f"{d}.{m}" for m in VIEW_METRICS] + ["size_mib"]:
            charts.append({"uuid": f"{sid}-{key}", "type": "BAR", "runsCountToCompare": 100, "metricSectionId": sid,
                           "deleted": False, "isGenerated": False, "metricKey": key, "displayName": key})
    widths = {c: 150 if c.startswith("metrics.") else 175 for c in columns}
    return {"runsExpanded": {parent_run_id: True}, "selectedColumns": columns, "columnWidths": widths, "runsHiddenMode": "SHOW_ALL",
            "orderByKey": "metrics.`size_mib`", "orderByAsc": True,
            "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True}


# ------------------------------------------------------------------ plumbing
# What a reader would do before looking, done by the page itself (headless --screenshot
# takes no input): on the compare page, fold its parameter plot and the recipe's
# parameters, so the run names and the metrics table come first; on a run page, open
# its description (the results table) in full.
PAGE_ACTIONS = """
(function () {
  var ticks = 0, folded = {};
  function own(e) {
    var t = "";
    for (var i = 0; i < e.childNodes.length; i++) if (e.childNodes[i].nodeType === 3) t += e.childNodes[i].nodeValue;
    return t.trim();
  }
  function step() {
    var h = location.hash;
    if (h.indexOf("#/compare-runs") === 0) {
      ["Visualizations", "Parameters"].forEach(function (name) {
        if (folded[name]) return;
        var el = Array.prototype.slice.call(document.querySelectorAll("div,span,button")).find(function (e) { return own(e) === name; });
        if (el) { el.click(); folded[name] = true; }
      });
      return folded.Visualizations && folded.Parameters;
    }
    if (/^#\/experiments\/[^/]+\/runs\/[0-9a-f]+/.test(h)) {
      var b = Array.prototype.slice.call(document.querySelectorAll("button")).find(function (e) {
        return e.getAttribute("aria-label") === "Expand description" || e.textContent.trim() === "Show more"; });
      if (b) { b.click(); return true; }
      return false;
    }
    return true;
  }
  var timer = setInterval(function () { ticks += 1; if (step() || ticks > 150) clearInterval(timer); }, 200);
})();
"""


def proxy(upstream: str, local_storage: dict) -> http.server.ThreadingHTTPServer:
    """A loopback proxy to the MLflow server that sets `local_storage` in index.html (and adds PAGE_ACTIONS).

    Headless Chromium's --screenshot cannot run script first, and localStorage is per
    origin, so the page itself must set them: the proxy is that origin.
    """
    inject = ("<script>" + "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                                   for k, v in local_storage.items()) + PAGE_ACTIONS + "</script>").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            req = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status, rheaders, data = r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                status, rheaders, data = e.code, e.headers, e.read()
            if self.path.split("?")[0] in ("/", "/index.html") and b"<head>" in data:
                data = data.replace(b"<head>", b"<head>" + inject, 1)
            self.send_response(status)
            for k, v in rheaders.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """MLflow's REST API (2.0), the few calls this script makes."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}/api/2.0/mlflow/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def runs(self, experiment_id: str, filter_string: str) -> list[dict]:
        out, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000,
                    "order_by": ["attributes.start_time DESC"], **({"page_token": token} if token else {})}
            page = self.post("runs/search", body)
            out += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                return out


def tags(entity: dict) -> dict[str, str]:
    data = entity.get("data", entity)
    return {t["key"]: t.get("value", "") for t in data.get("tags", []) or []}


def metric_keys(run: dict) -> set[str]:
    return {m["key"] for m in run.get("data", {}).get("metrics", []) or []}


# ------------------------------------------------------------------ checks
class Registry:
    """What the checks found: the experiment, the build run, its artifact runs, the models."""

    def __init__(self, api: Api, experiment: str | None):
        self.api = api
        self.problems: list[str] = []
        exps = api.post("experiments/search", {"max_results": 1000, "view_type": "ACTIVE_ONLY"}).get("experiments", [])
        ours = [e for e in exps if "quantforge.recipe" in tags(e) or e["name"] == experiment]
        if experiment:
            ours = [e for e in ours if e["name"] == experiment]
        if not ours:
            raise Problem(f"no quantforge experiment{' named ' + repr(experiment) if experiment else ''} in this registry "
                          "(run `quantforge register RECIPE` first)")
        self.experiment = max(ours, key=lambda e: int(e.get("last_update_time") or 0))
        self.experiment_id = self.experiment["experiment_id"]
        self.exp_tags = tags(self.experiment)
        builds = api.runs(self.experiment_id, "tags.`quantforge.role` = 'build'")
        if not builds:
            raise Problem(f"experiment {self.experiment['name']!r} has no build run (tag quantforge.role=build)")
        self.build = builds[0]
        self.build_id = self.build["info"]["run_id"]
        self.note = tags(self.build).get("mlflow.note.content", "")
        self.children = api.runs(self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.build_id}'")
        # Devices with results (a device still pending is "### <device>: pending").
        self.devices = [d for d, rest in re.findall(r"^### ([^\s:]+)(.*)$", self.note, flags=re.M) if rest.strip() != ": pending"]
        self.recommended = dict(re.findall(r"^Recommended on ([^\s:]+): \*\*([^*]+)\*\*", self.note, flags=re.M))
        self.models: dict[str, dict] = {}
        for run in self.children:
            name = tags(run).get("quantforge.registered_model")
            if name and name not in self.models:
                try:
                    self.models[name] = api.get("registered-models/get", name=name)["registered_model"]
                except urllib.error.HTTPError:
                    self.problems.append(f"artifact run {run['info'].get('run_name')} names the registered model {name!r}, which does not exist")

    def aliases(self) -> dict[str, tuple[str, str]]:
        """alias -> (model, version), over this build's registered models (an alias is per model)."""
        out: dict[str, tuple[str, str]] = {}
        for name, m in self.models.items():
            for a in m.get("aliases", []) or []:
                out.setdefault(a["alias"], (name, a["version"]))
                out[f"{name}@{a['alias']}"] = (name, a["version"])
        return out

    def check(self) -> list[str]:
        p = list(self.problems)
        kind = self.exp_tags.get("mlflow.experimentKind")
        if kind != "custom_model_development":
            p.append(f"experiment {self.experiment['name']!r} has mlflow.experimentKind={kind!r}: the UI opens its GenAI/traces "
                     "view, not the runs table (expected 'custom_model_development')")
        if not self.note:
            p.append(f"the build run {self.build_id} has no description (mlflow.note.content): the results table is missing")
        elif not self.devices or TABLE_HEAD not in self.note:
            p.append(f"the build run's description has no results table per device (### <device> and a {TABLE_HEAD} ... table):\n{self.note[:400]}")
        if not self.children:
            p.append(f"the build run {self.build_id} has no artifact runs under it")
        else:
            keys = {frozenset(metric_keys(r)) for r in self.children}
            if len(keys) > 1:
                p.append("the artifact runs have different metric keys, so MLflow's chart and compare views do not line up: "
                         + "; ".join(f"{r['info'].get('run_name')}: {len(metric_keys(r))} keys" for r in self.children))
        aliases = self.aliases()
        promotion = (self.build.get("data", {}).get("params") and {q["key"]: q["value"] for q in self.build["data"]["params"]}
                     .get("registry.promotion_alias")) or "production"
        if promotion not in aliases:
            p.append(f"no registered model of this build has the alias @{promotion}")
        for device, artifact in self.recommended.items():
            alias = f"recommended-{device}"
            if alias not in aliases:
                p.append(f"the description recommends {artifact} on {device}, but no registered model has the alias @{alias}")
        v = self.version()
        if v is None:
            p.append("no registered model version to show")
        else:
            desc = v.get("description") or ""
            for needed in ("mlflow artifacts download --artifact-uri models:/", "#### Serve"):
                if needed not in desc:
                    p.append(f"the description of {v['name']} v{v['version']} lacks {needed!r}")
        return p

    def version(self) -> dict | None:
        """The version to show: recommended on some device, else the promoted one, else any."""
        aliases = self.aliases()
        pick = next((aliases[a] for a in aliases if a.startswith("recommended-")), None) or aliases.get("production")
        if pick is None and self.models:
            m = next(iter(self.models.values()))
            pick = (m["name"], (m.get("latest_versions") or [{}])[-1].get("version", "1"))
        if pick is None:
            return None
        return self.api.get("model-versions/get", name=pick[0], version=pick[1])["model_version"]


# ------------------------------------------------------------------ the browser
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise Problem("chromium not found: apt-get install -y chromium")
    return path


def render(url: str, out: Path, budget_ms: int, height: int | None = None, width: int | None = None) -> str:
    """Open `url`, let its scripts run for `budget_ms` of virtual time, save a screenshot; the DOM."""
    with tempfile.TemporaryDirectory(prefix="qf-chromium-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--window-size={width or WINDOW[0]},{height or WINDOW[1]}", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.is_file():
        raise Problem(f"chromium failed on {url}: {proc.stderr.strip()[-600:]}")
    print(f"saved {out} <- {url}")
    return proc.stdout


def expect(dom: str, page: str, *needles: str) -> list[str]:
    text = re.sub(r"<[^>]+>", " ", dom)
    return [f"{page}: the rendered page does not show {n!r}" for n in needles if n not in dom and n not in text]


def screenshots(reg: Registry, ui: str, out_dir: Path, budget_ms: int) -> list[str]:
    from pipeline.registry.tracking import ui_hint

    problems: list[str] = []
    exp = reg.experiment_id
    names = [r["info"].get("run_name", "") for r in reg.children]
    first = reg.devices[0] if reg.devices else "cpu"

    dom = render(f"{ui}/#/experiments/{exp}/runs", out_dir / "mlflow-ui.png", budget_ms,
                 height=WINDOW[1] - 250, width=1800)
    problems += expect(dom, "runs table", *names, f"{first}.kl_mean", "size_mib")
    dom = render(f"{ui}/#/experiments/{exp}/runs?compareRunsMode=CHART",
                 out_dir / "mlflow-charts.png", max(budget_ms, 60000))
    problems += expect(dom, "chart view", *names, f"Formats side by side on {first}")
    hint = ui_hint(ui, exp, [reg.build_id] + [r["info"]["run_id"] for r in reg.children])
    compare = next(line.split(": ", 1)[1] for line in hint if line.startswith("compare: "))
    dom = render(compare, out_dir / "mlflow-compare.png", budget_ms, height=1100, width=2050)
    problems += expect(dom, "compare page", f"Comparing {len(reg.children) + 1} Runs", *names, f"{first}.kl_mean")
    dom = render(f"{ui}/#/experiments/{exp}/runs/{reg.build_id}", out_dir / "mlflow-run.png", budget_ms, height=1300)
    problems += expect(dom, "build run", *(f"Recommended on {d}" for d in reg.recommended), *reg.recommended.values())
    v = reg.version()
    if v is not None:
        name = urllib.parse.quote(v["name"], safe="")
        dom = render(f"{ui}/#/models/{name}/versions/{v['version']}", out_dir / "mlflow-ui-version.png", budget_ms, height=1300)
        problems += expect(dom, f"version {v['name']} v{v['version']}", *v.get("aliases", []),
                           "mlflow artifacts download")
    dom = render(f"{ui}/#/models", out_dir / "mlflow-models.png", budget_ms)
    problems += expect(dom, "registered models", *reg.models, "production")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts_dir", type=Path, nargs="?", help="the artifacts dir whose mlflow/ store to serve")
    ap.add_argument("--server", help="an MLflow server URL to use instead of serving ARTIFACTS_DIR/mlflow")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where the PNGs go (default: docs/)")
    ap.add_argument("--experiment", help="the recipe's experiment (default: the quantforge experiment updated last)")
    ap.add_argument("--budget-ms", type=int, default=25000, help="virtual time Chromium gives each page to render")
    ap.add_argument("--check-only", action="store_true", help="check the registry, take no screenshots")
    args = ap.parse_args(argv)
    if not args.server and not args.artifacts_dir:
        ap.error("give ARTIFACTS_DIR or --server")

    started, store = False, None
    if args.server:
        base = args.server.rstrip("/")
    else:
        store = args.artifacts_dir.resolve() / "mlflow"
        if not (store / "mlflow.db").is_file():
            print(f"{store / 'mlflow.db'} not found: run `quantforge run RECIPE` (or `quantforge register RECIPE`) first", file=sys.stderr)
            return 2
        if subprocess.run([str(SCRIPT), "status", str(store)], capture_output=True).returncode == 0:
            port = int((store / "server.port").read_text())
        else:
            port = free_port()
            subprocess.run([str(SCRIPT), "start", str(store), str(port)], check=True, stdout=subprocess.DEVNULL)
            started = True
        base = f"http://127.0.0.1:{port}"
    try:
        reg = Registry(Api(base), args.experiment)
        problems = reg.check()
        print(f"experiment {reg.experiment['name']!r} ({reg.experiment_id}): build run {reg.build_id}, "
              f"{len(reg.children)} artifact run(s), devices {', '.join(reg.devices) or '-'}, "
              f"recommended {reg.recommended or '-'}, {len(reg.models)} registered model(s)")
        if problems:
            raise Problem("\n".join(problems))
        if args.check_only:
            print("registry checks passed")
            return 0
        args.out_dir.mkdir(parents=True, exist_ok=True)
        storage = dict(UI_FLAGS)
        storage[EXPERIMENT_STATE_KEY.format(ids=json.dumps([reg.experiment_id], separators=(",", ":")))] = \
            formats_view(reg.build_id, reg.devices or ["cpu"])
        front = proxy(base, storage)
        try:
            problems = screenshots(reg, f"http://127.0.0.1:{front.server_address[1]}", args.out_dir, args.budget_ms)
        finally:
            front.shutdown()
        if problems:
            raise Problem("\n".join(problems))
        print("registry checks and rendered pages passed")
        return 0
    except Problem as exc:
        print(f"browse_mlflow: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            subprocess.run([str(SCRIPT), "stop", str(store)], check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
