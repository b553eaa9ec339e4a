"""Screenshot the MLflow UI of a quantforge registry: the registered models and one model version.

    .venv/bin/python docs/browse_mlflow.py ARTIFACTS_DIR [--out docs/mlflow-ui.png] [--model NAME]

Serves ``ARTIFACTS_DIR/mlflow`` (the local store `quantforge register` writes) with
``scripts/mlflow_server.sh`` on a free loopback port, or reuses a server that script
already runs there, opens the pages in headless Chromium (Debian's ``chromium``:
``apt-get install -y chromium``), saves ``<out>`` and ``<out stem>-version.png``, and
stops the server if it started it. Talks to MLflow over its REST API only, so
pipeline/registry/ stays the one package that imports mlflow.
"""

from __future__ import annotations

import argparse
import http.server
import json
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
# Flags from the machine notes: without the background-networking ones Chromium keeps
# trying Google hosts that this closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,900"]


# MLflow 3.17's UI opens a "new Model Registry UI" promo modal and, on localhost, an
# assistant side panel on first load; both would cover the page. These are the
# localStorage flags (`${key}_v${version}`) the UI reads to skip them.
UI_FLAGS = {
    "_mlflow_model_registry_promo_modal_dismissed_v1": True,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.assistant.panelOpen_v1": False,
}
INJECT = ("<script>" + "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});" for k, v in UI_FLAGS.items()) + "</script>").encode()


def proxy(upstream: str) -> http.server.ThreadingHTTPServer:
    """A loopback proxy to the MLflow server that adds UI_FLAGS to index.html.

    Headless Chromium's --screenshot cannot run script first, and localStorage is per
    origin, so the page itself must set them: the proxy is that origin.
    """

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
                data = data.replace(b"<head>", b"<head>" + INJECT, 1)
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


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def screenshot(url: str, out: Path, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="qf-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    print(f"saved {out} <- {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts_dir", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow-ui.png")
    ap.add_argument("--model", help="registered model whose version page to show (default: the recommended one on some device, else one in production)")
    ap.add_argument("--budget-ms", type=int, default=25000, help="virtual time Chromium gives the page to render")
    args = ap.parse_args()

    store = args.artifacts_dir.resolve() / "mlflow"
    if not (store / "mlflow.db").is_file():
        sys.exit(f"{store / 'mlflow.db'} not found: run `quantforge run RECIPE` (or `quantforge register RECIPE`) first")
    started = False
    status = subprocess.run([str(SCRIPT), "status", str(store)], capture_output=True, text=True)
    if status.returncode == 0:
        port = int((store / "server.port").read_text())
    else:
        port = free_port()
        subprocess.run([str(SCRIPT), "start", str(store), str(port)], check=True)
        started = True
    base = f"http://127.0.0.1:{port}"
    try:
        models = api(base, "registered-models/search", max_results=100).get("registered_models", [])
        if not models:
            sys.exit("no registered models in this store")
        chosen = next((m for m in models if m["name"] == args.model), None) if args.model else None
        # The artifact recommended on some device, else one in production, else the first.
        chosen = chosen or next((m for m in models if any(a.get("alias", "").startswith("recommended-") for a in m.get("aliases", []))), None)
        chosen = chosen or next((m for m in models if any(a.get("alias") == "production" for a in m.get("aliases", []))), models[0])
        aliases = {a["alias"]: a["version"] for a in chosen.get("aliases", [])}
        recommended = next((v for k, v in aliases.items() if k.startswith("recommended-")), None)
        version = recommended or aliases.get("production") or aliases.get("candidate") or chosen["latest_versions"][-1]["version"]
        print(f"{len(models)} registered models; showing {chosen['name']} v{version} (aliases {aliases})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        front = proxy(base)
        ui = f"http://127.0.0.1:{front.server_address[1]}"
        try:
            screenshot(f"{ui}/#/models", args.out, args.budget_ms)
            name = urllib.parse.quote(chosen["name"], safe="")
            screenshot(f"{ui}/#/models/{name}/versions/{version}", args.out.with_name(args.out.stem + "-version.png"), args.budget_ms)
        finally:
            front.shutdown()
    finally:
        if started:
            subprocess.run([str(SCRIPT), "stop", str(store)], check=False)


if __name__ == "__main__":
    main()
