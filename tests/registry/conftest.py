"""Registry fixtures: one real build + eval of a mini recipe (fp8 + GGUF Q8_0), and real MLflow.

The report comes from the real code paths (``pipeline.build.build`` then
``evals.run.evaluate`` on cpu), cached across sessions under .pytest_cache like
tests/conftest.py's ``mini_model`` (first run about 2 minutes on 2 cores: training the
3.4M-parameter model, FP8 and GGUF builds, evals; then seconds). Tests derive what they
need from it with the typed models (tests/registry/reports.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.report import Report, read_report, report_path
from pipeline.core.store import MANIFEST, file_table, sha256_file

REPO = Path(__file__).resolve().parents[2]
CACHE_ARTIFACTS = REPO / ".pytest_cache" / "quantforge" / "artifacts"
SCRIPT = REPO / "scripts" / "mlflow_server.sh"
#: the installed entry point (pipeline/cli/main.py has no __main__ block)
QUANTFORGE = [str(Path(sys.executable).parent / "quantforge")]


def _usable(report: Report | None) -> bool:
    return (report is not None and {a.name for a in report.built()} == {"fp8", "gguf-Q8_0"}
            and all(Path(a.path).is_dir() and (a.evals.get("cpu") is not None and a.evals["cpu"].status == "done") for a in report.built())
            and report.recommendations.get("cpu") is not None)


@pytest.fixture(scope="session")
def real_report() -> Report:
    """report.json of the mini recipe, built and evaluated on cpu by the real build and eval jobs."""
    from tests.registry.reports import RECIPE

    CACHE_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rpath = report_path(CACHE_ARTIFACTS, "regmini")
    with open(CACHE_ARTIFACTS / ".regmini.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions at once build it once
        report = read_report(rpath)
        if not _usable(report):
            from evals.run import evaluate
            from pipeline.build import build
            from pipeline.validation import load_recipe

            recipe = CACHE_ARTIFACTS.parent / "regmini.yaml"
            recipe.write_text(RECIPE)
            loaded = load_recipe(recipe)
            quiet = lambda _m: None  # noqa: E731
            build(loaded, CACHE_ARTIFACTS, log=quiet)
            report = evaluate(loaded, CACHE_ARTIFACTS, "cpu", log=quiet)
        assert _usable(report), "the mini recipe did not build and evaluate fp8 and gguf-Q8_0 on cpu"
    return report


@pytest.fixture(scope="session")
def plots_dir(real_report) -> Path:
    return report_path(CACHE_ARTIFACTS, "regmini").parent


@pytest.fixture
def report(real_report) -> Report:
    """A fresh deep copy for one test to derive from."""
    return real_report.model_copy(deep=True)


@pytest.fixture(autouse=True)
def _registry_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("QUANTFORGE_PROMOTE", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the tests' own downloads


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, empty_db) -> Path:
    """One artifacts dir whose local MLflow store (SQLite) a module's tests share; each uses its own recipe name."""
    root = tmp_path_factory.mktemp("artifacts")
    (root / "mlflow").mkdir()
    shutil.copy(empty_db, root / "mlflow" / "mlflow.db")
    return root


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def quiet(_msg: str) -> None:
    pass


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` (via scripts/mlflow_server.sh) on a free loopback port, stopped by PID."""

    def __init__(self, root: Path, empty_db: Path):
        self.dir = root / "server"
        self.empty_db = empty_db
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def up(self) -> bool:
        return subprocess.run([str(SCRIPT), "status", str(self.dir)], capture_output=True).returncode == 0

    def start(self) -> None:
        if not (self.dir / "mlflow.db").exists():  # skip the server's own table creation
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.empty_db, self.dir / "mlflow.db")
        # The mlflow of the Python running the tests (a worktree or CI checkout has no .venv of its own).
        env = {**os.environ, "MLFLOW_BIN": os.environ.get("MLFLOW_BIN") or str(Path(sys.executable).parent / "mlflow")}
        res = subprocess.run([str(SCRIPT), "start", str(self.dir), str(self.port)], capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, f"mlflow server did not start:\n{res.stdout}{res.stderr}"

    def stop(self) -> None:
        pid_file = self.dir / "server.pid"
        pid = int(pid_file.read_text()) if pid_file.is_file() else None
        subprocess.run([str(SCRIPT), "stop", str(self.dir)], check=True, capture_output=True, timeout=60)
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash, not a shutdown)."""
        subprocess.run([str(SCRIPT), "kill", str(self.dir)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_db):
    srv = Server(tmp_path_factory.mktemp("mlflow"), empty_db)
    yield srv
    if srv.up():
        srv.stop()


def snapshot(client, experiment_id: str, model_prefix: str, files_root: Path) -> dict:
    """Everything a repeat registration must not change: runs, metric histories, versions, stored files."""
    runs = client.search_runs([experiment_id])
    return {
        "runs": sorted(r.info.run_id for r in runs),
        "history": {(r.info.run_id, k): len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics},
        "versions": sorted((v.name, str(v.version)) for v in client.search_model_versions(f"name LIKE '{model_prefix}%'")),
        "aliases": {m.name: dict(m.aliases) for m in client.search_registered_models(f"name LIKE '{model_prefix}%'")},
        "files": {str(p): p.stat().st_mtime_ns for p in files_root.rglob("*") if p.is_file()},
    }


def tree(folder: Path) -> dict[str, str]:
    """sha256 per file of a stored folder (its manifest included when there is one)."""
    files = {row["path"]: row["sha256"] for row in file_table(folder)}  # file_table leaves out the manifest
    if (folder / MANIFEST).is_file():
        files[MANIFEST] = sha256_file(folder / MANIFEST)
    return files


def download_tree(uri: str, source: str, dst: Path) -> dict[str, str]:
    """What MLflow serves at ``source``, downloaded into ``dst``: its files' sha256."""
    import mlflow.artifacts

    return tree(Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri)))


def store_tree(path: str) -> dict[str, str]:
    """A stored artifact's files' sha256 (a stored artifact always has its manifest)."""
    files = tree(Path(path))
    assert MANIFEST in files, f"{path} has no {MANIFEST}"
    return files
