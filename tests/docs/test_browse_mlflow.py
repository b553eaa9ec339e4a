"""docs/browse_mlflow.py on a real registry: the mini recipe built, evaluated and registered by the
real code (tests/registry/conftest.py::real_report, then ``register_report`` into a fresh local
store), served by scripts/mlflow_server.sh, opened in headless Chromium.

The script must show the formats side by side without anyone selecting runs (the runs table
with metric columns, the chart view, the compare page of every run of the build) and fail,
naming what is missing, when the results table or the aliases are not there.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry.conftest import Server, plots_dir, real_report  # noqa: F401 - fixtures
from tests.registry.reports import variant, write

REPO = Path(__file__).resolve().parents[2]
BROWSE = REPO / "docs" / "browse_mlflow.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = ("mlflow-ui.png", "mlflow-charts.png", "mlflow-compare.png", "mlflow-run.png", "mlflow-ui-version.png", "mlflow-models.png")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")]


@pytest.fixture(scope="module")
def registry(real_report, plots_dir, tmp_path_factory, empty_db):  # noqa: F811
    """An artifacts dir with the mini recipe registered in its local store, and a server on that store."""
    from evals.run import write_views
    from pipeline.registry.register import register_report

    root = tmp_path_factory.mktemp("docs-registry")
    (root / "mlflow").mkdir()
    shutil.copy(empty_db, root / "mlflow" / "mlflow.db")
    rep = variant(real_report, "docsmini")
    path = write(rep, root, plots_from=plots_dir)
    write_views(rep, path.parent, lambda _m: None)  # this quantforge's plots and HTML, as the eval job writes them
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("QUANTFORGE_PROMOTE", raising=False)
        out = register_report(path, log=lambda _m: None)
    server = Server(root, empty_db)
    server.dir = root / "mlflow"  # serve the store register wrote (browse_mlflow reuses a server running there)
    server.start()
    try:
        yield root, out
    finally:
        server.stop()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BROWSE), *args], capture_output=True, text=True, timeout=600)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_screenshots_show_the_formats_side_by_side(registry, tmp_path):
    root, report = registry
    proc = run(str(root), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registry checks and rendered pages passed" in proc.stdout
    rec = report.recommendations["cpu"].artifact
    assert f"recommended {{'cpu': '{rec}'}}" in proc.stdout and "2 artifact run(s)" in proc.stdout
    for name in PAGES:
        w, h = png_size(tmp_path / name)
        assert w >= 1400 and h >= 600 and (tmp_path / name).stat().st_size > 30_000, (name, w, h)


def test_fails_when_the_table_or_the_aliases_are_missing(registry):
    from mlflow import MlflowClient

    root, report = registry
    assert run(str(root), "--check-only").returncode == 0
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    rec = report.artifact(report.recommendations["cpu"].artifact).registry
    parent = report.registry.parent_run_id
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    promoted = [a.registry for a in report.built() if a.registry and "production" in a.registry.aliases]
    assert promoted
    client.delete_registered_model_alias(rec.name, "recommended-cpu")
    client.set_tag(parent, "mlflow.note.content", "")
    try:
        proc = run(str(root), "--check-only")
        assert proc.returncode == 1
        assert "has no description (mlflow.note.content): the results table is missing" in proc.stderr
        # With the table back, the recommendation it names needs its alias.
        client.set_tag(parent, "mlflow.note.content", note)
        proc = run(str(root), "--check-only")
        assert proc.returncode == 1 and "no registered model has the alias @recommended-cpu" in proc.stderr
        client.set_registered_model_alias(rec.name, "recommended-cpu", rec.version)
        for entry in promoted:
            client.delete_registered_model_alias(entry.name, "production")
        proc = run(str(root), "--check-only")
        assert proc.returncode == 1 and "no registered model of this build has the alias @production" in proc.stderr
    finally:
        client.set_tag(parent, "mlflow.note.content", note)
        client.set_registered_model_alias(rec.name, "recommended-cpu", rec.version)
        for entry in promoted:
            client.set_registered_model_alias(entry.name, "production", entry.version)
