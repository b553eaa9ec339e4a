"""pipeline.registry.register against real MLflow 3.17: a SQLite store, and a real `mlflow server` with artifact proxying.

No mocks: every check reads back what MLflow stored. One server for the module (its
start is the slowest step here, ~5-30 s depending on load).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.errors import RegistryUnavailable, StageFailed
from pipeline.registry.register import gate_summary, register_report, tracking_uri_for, _flatten
from pipeline.core.report import read_report
from pipeline.core.store import file_table
try:
    from tests.registry_fixtures import add_device_results, make_report
except ImportError:  # pytest's default import mode puts tests/, not the repo root, on sys.path
    from registry_fixtures import add_device_results, make_report

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "mlflow_server.sh"
GGUF, GPTQ = "gguf-Q4_K_M", "w4a16-gptq"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def quiet(_msg: str) -> None:
    pass


def snapshot(client, experiment_id: str, model_prefix: str, files_root: Path) -> dict:
    """Everything a repeat registration must not change: runs, metric histories, versions, stored files."""
    runs = client.search_runs([experiment_id])
    return {
        "runs": sorted(r.info.run_id for r in runs),
        "history": {(r.info.run_id, k): len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics},
        "versions": sorted((v.name, v.version) for v in client.search_model_versions(f"name LIKE '{model_prefix}%'")),
        "files": {str(p): p.stat().st_mtime_ns for p in files_root.rglob("*") if p.is_file()},
    }


def download_tree(uri: str, source: str, dst: Path) -> dict[str, str]:
    import mlflow.artifacts

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    tree = {row["path"]: row["sha256"] for row in file_table(root)}  # file_table leaves out manifest.json
    if (root / "manifest.json").is_file():
        tree["manifest.json"] = _sha(root / "manifest.json")
    return tree


def store_tree(path: str) -> dict[str, str]:
    return {row["path"]: row["sha256"] for row in file_table(Path(path))}


# ------------------------------------------------------------------ pure helpers
def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_for(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri_for(tmp_path) == "http://tracking.example:5000"
    assert tracking_uri_for(tmp_path, "http://127.0.0.1:1") == "http://127.0.0.1:1"


def test_gate_summary_and_flatten():
    gates = {"passed": None, "pending_devices": ["cuda"], "checks": [
        {"device": "cpu", "name": "ppl", "passed": True}, {"device": "cpu", "name": "kl", "passed": False}]}
    assert gate_summary(gates) == (None, {"cpu": False, "cuda": None}, ["cuda"])
    flat = _flatten({"a": {"b": [1, 2], "c": [{"d": None}]}, "e": "x"})
    assert flat == {"a.b": "[1, 2]", "a.c.0.d": "null", "e": "x"}


# ------------------------------------------------------------------ SQLite store
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, empty_db) -> Path:
    """One artifacts dir (store + local MLflow) for the SQLite tests; each uses its own recipe name."""
    root = tmp_path_factory.mktemp("artifacts")
    (root / "mlflow").mkdir()
    shutil.copy(empty_db, root / "mlflow" / "mlflow.db")
    return root


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the tests' own downloads


def test_sqlite_registration_matches_report_and_is_idempotent(store_dir, tmp_path):
    path = make_report(store_dir)
    report = register_report(path, log=quiet)
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)

    # Report records where everything went.
    assert report.registry["tracking_uri"] == uri
    exp = c.get_experiment_by_name("regtest")
    assert report.registry["experiment_id"] == exp.experiment_id
    assert exp.artifact_location == (store_dir / "mlflow" / "artifacts" / "regtest").resolve().as_uri()
    on_disk = read_report(path)
    assert on_disk.registry == report.registry

    # Parent run: recipe as params (long value truncated and said so), provenance tags, baseline metrics.
    parent = c.get_run(report.registry["parent_run_id"])
    p, t = parent.data.params, parent.data.tags
    assert p["name"] == "regtest" and p["targets.0.kind"] == "gptq" and p["targets.1.quants"] == '["Q4_K_M"]'
    assert p["registry.upload_max_mb"] == "2048.0" and len(p["description"]) == 6000 and p["description"].endswith("[truncated]")
    assert "description" in t["quantforge.params_truncated"]
    assert t["quantforge.recipe_sha256"] == on_disk.recipe_sha256
    assert t["quantforge.source_model"] == "builtin:tiny-llama" and t["quantforge.source_revision"] == "main"
    assert t["quantforge.source_commit"] == "fixturecommit" and t["quantforge.source_fingerprint"] == on_disk.source.fingerprint
    assert t["tool.torch"] == "2.13.0" and t["quantforge.version"] == "0.1.0" and t["quantforge.git_commit"] == on_disk.git_commit
    assert parent.data.metrics == {"cpu.perplexity": 54.78, "cpu.decode_tps": 900.0}
    assert parent.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "plots")] == ["plots/perplexity_vs_size.png"]

    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [GGUF, GPTQ]
    for a in on_disk.artifacts:
        if a.status != "built":
            assert a.registry == {}  # the skipped TensorRT artifact is not registered
            continue
        name = f"regtest-{a.target}" + (f"-{a.variant}" if a.variant else "")
        run = c.get_run(a.registry["run_id"])
        assert a.registry == {"name": name, "version": "1", "run_id": run.info.run_id, "aliases": ["candidate", "production"], "uri": f"models:/{name}/1"}
        assert run.data.tags["quantforge.content_sha256"] == a.content_sha256
        ev = a.evals["cpu"]
        for metric in ("perplexity", "kl_divergence_mean", "top1_agreement_pct", "decode_tps"):
            assert run.data.metrics[f"cpu.{metric}"] == ev[metric]
        assert run.data.tags["eval.cpu.runtime"] == a.runtimes[0]
        # Report excerpt, plots and the model card are on the child run.
        excerpt_dir = Path(c.download_artifacts(run.info.run_id, "quantforge", str(tmp_path / f"dl-{a.name}")))
        excerpt = json.loads((excerpt_dir / "report_excerpt.json").read_text())
        assert excerpt["artifact"]["evals"] == a.evals and excerpt["recipe_sha256"] == on_disk.recipe_sha256
        assert "plots/perplexity_vs_size.png" in [x.path for x in c.list_artifacts(run.info.run_id, "plots")]

        # Version: tags, aliases, source linked to the run, files byte-identical to the store.
        v = c.get_model_version(name, "1")
        assert v.run_id == run.info.run_id and v.source == f"{run.info.artifact_uri}/artifact"
        assert sorted(v.aliases) == ["candidate", "production"]
        assert v.tags["content_sha256"] == a.content_sha256 and v.tags["format"] == a.format
        assert v.tags["bits"] == "4" and v.tags["group_size"] == ("128" if a.kind == "gptq" else "-")
        assert v.tags["runtimes"] == ",".join(a.runtimes) and v.tags["recipe_sha256"] == on_disk.recipe_sha256
        assert v.tags["source_revision"] == "main" and v.tags["gate.passed"] == "true" and v.tags["gate.cpu.passed"] == "true"
        assert float(v.tags["cpu.perplexity"]) == ev["perplexity"] and v.tags["team"] == "quant"
        assert "README.md" in store_tree(a.path)
        assert download_tree(uri, v.source, tmp_path / f"v-{a.name}") == {**store_tree(a.path), "manifest.json": _sha(Path(a.path) / "manifest.json")}
        assert c.get_registered_model(name).tags["kind"] == a.kind

    # A second registration of the unchanged report creates and uploads nothing.
    files = store_dir / "mlflow" / "artifacts" / "regtest"
    before = snapshot(c, exp.experiment_id, "regtest-", files)
    again = register_report(path, log=quiet)
    assert snapshot(c, exp.experiment_id, "regtest-", files) == before
    assert [a.registry for a in again.artifacts] == [a.registry for a in on_disk.artifacts]


def _sha(p: Path) -> str:
    from pipeline.core.store import sha256_file

    return sha256_file(p)


def test_later_device_results_then_failing_gate_keep_promotion(store_dir):
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)
    # cuda is required but not evaluated yet: candidate only, no promotion.
    path = make_report(store_dir, recipe="inc", devices=("cpu", "cuda"), evaluated=("cpu",), long_description=False, plot=False)
    first = register_report(path, log=quiet)
    gguf = first.artifact(GGUF).registry
    assert gguf["aliases"] == ["candidate"]
    v1 = c.get_model_version("inc-gguf-Q4_K_M", "1")
    assert v1.tags["gate.passed"] == "pending" and v1.tags["gate.pending_devices"] == "cuda" and "cuda.perplexity" not in v1.tags
    runs_before = sorted(r.info.run_id for r in c.search_runs([first.registry["experiment_id"]]))

    # The cuda eval job lands later: same runs and versions, new metrics and tags, promoted now.
    add_device_results(path, "cuda", ppl_increase_pct=2.5)
    second = register_report(path, log=quiet)
    assert sorted(r.info.run_id for r in c.search_runs([first.registry["experiment_id"]])) == runs_before
    assert second.artifact(GGUF).registry["version"] == "1" and second.artifact(GGUF).registry["aliases"] == ["candidate", "production"]
    child = c.get_run(gguf["run_id"])
    assert child.data.metrics["cuda.perplexity"] == read_report(path).artifact(GGUF).evals["cuda"]["perplexity"]
    assert c.get_run(first.registry["parent_run_id"]).data.metrics["cuda.decode_tps"] == 4000.0
    v1 = c.get_model_version("inc-gguf-Q4_K_M", "1")
    assert v1.tags["gate.passed"] == "true" and v1.tags["gate.cuda.passed"] == "true" and "cuda.decode_tps" in v1.tags
    assert [len(c.search_model_versions("name = 'inc-gguf-Q4_K_M'"))] == [1]

    # A rebuild with new content that fails the gate: new version, candidate moves, production stays.
    path = make_report(store_dir, recipe="inc", seed="v2", ppl_increase_pct=9.0, devices=("cpu", "cuda"), evaluated=("cpu", "cuda"), long_description=False, plot=False)
    third = register_report(path, log=quiet)
    reg = third.artifact(GGUF).registry
    assert reg["version"] == "2" and reg["aliases"] == ["candidate"]
    model = c.get_registered_model("inc-gguf-Q4_K_M")
    assert {k: str(v) for k, v in model.aliases.items()} == {"candidate": "2", "production": "1"}
    v2 = c.get_model_version("inc-gguf-Q4_K_M", "2")
    assert v2.tags["gate.passed"] == "false" and v2.tags["gate.cpu.passed"] == "false"
    # Same recipe and source: the build's parent run is reused; the new content gets new child runs.
    parents = c.search_runs([first.registry["experiment_id"]], filter_string="tags.`quantforge.role` = 'build'")
    assert len(parents) == 1 and third.registry["parent_run_id"] == first.registry["parent_run_id"]


def test_corrupted_upload_creates_no_version(store_dir):
    path = make_report(store_dir, recipe="bad", long_description=False, plot=False)
    gguf_path = Path(read_report(path).artifact(GGUF).path)
    # The file no longer matches its manifest: what reaches MLflow is not what was built and measured.
    with open(gguf_path / "model-Q4_K_M.gguf", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(StageFailed, match="model-Q4_K_M.gguf sha256 differs from the manifest"):
        register_report(path, log=quiet)
    c = client_for(tracking_uri_for(store_dir))
    assert c.search_model_versions("name = 'bad-gguf-Q4_K_M'") == []
    assert [str(v.version) for v in c.search_model_versions("name = 'bad-w4a16-gptq'")] == ["1"]
    after = read_report(path)
    assert after.artifact(GGUF).registry == {} and after.artifact(GPTQ).registry["version"] == "1"


# ------------------------------------------------------------------ real server
class Server:
    """A real `mlflow server` (via scripts/mlflow_server.sh) on a free loopback port, stopped by PID."""

    def __init__(self, root: Path, empty_db: Path):
        self.dir = root / "server"
        self.empty_db = empty_db
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"

    def up(self) -> bool:
        return subprocess.run([str(SCRIPT), "status", str(self.dir)], capture_output=True).returncode == 0

    def start(self) -> None:
        if not (self.dir / "mlflow.db").exists():  # skip the server's own table creation
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.empty_db, self.dir / "mlflow.db")
        subprocess.run([str(SCRIPT), "start", str(self.dir), str(self.port)], check=True, capture_output=True, timeout=300)

    def stop(self) -> None:
        pid_file = self.dir / "server.pid"
        pid = int(pid_file.read_text()) if pid_file.is_file() else None
        subprocess.run([str(SCRIPT), "stop", str(self.dir)], check=True, capture_output=True, timeout=60)
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_db):
    srv = Server(tmp_path_factory.mktemp("mlflow"), empty_db)
    yield srv
    if srv.up():
        srv.stop()


def test_server_down_fails_cleanly_then_registers_when_up(server, tmp_path):
    if server.up():
        server.stop()
    # gguf (48 KB) is over the 0.045 MB limit: referenced, not uploaded; gptq (40 KB) is uploaded.
    path = make_report(tmp_path, recipe="srv", upload_max_mb=0.045, long_description=False)
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable) as err:
        register_report(path, tracking_uri=server.uri, log=quiet)
    print(f"RegistryUnavailable after {time.monotonic() - t0:.2f} s")
    assert server.uri in str(err.value) and "quantforge register recipes/srv.yaml" in str(err.value)
    assert read_report(path).registry == {}

    server.start()
    report = register_report(path, tracking_uri=server.uri, log=quiet)
    c = client_for(server.uri)
    assert report.registry["tracking_uri"] == server.uri
    gptq, gguf = report.artifact(GPTQ), report.artifact(GGUF)
    v = c.get_model_version("srv-w4a16-gptq", gptq.registry["version"])
    assert v.source.startswith("mlflow-artifacts:/")  # uploaded through the server's proxy
    assert sorted(v.aliases) == ["candidate", "production"] and v.tags["content_sha256"] == gptq.content_sha256
    got = download_tree(server.uri, v.source, tmp_path / "dl-gptq")
    assert got == {**store_tree(gptq.path), "manifest.json": _sha(Path(gptq.path) / "manifest.json")}
    # The referenced artifact: manifest, card and a pointer to the store, not the model file.
    ref_run = c.get_run(gguf.registry["run_id"])
    assert ref_run.data.tags["quantforge.artifact_ref"].startswith(gguf.path)
    vg = c.get_model_version("srv-gguf-Q4_K_M", gguf.registry["version"])
    assert vg.tags["artifact_ref"] == ref_run.data.tags["quantforge.artifact_ref"]
    got = download_tree(server.uri, vg.source, tmp_path / "dl-gguf")
    assert sorted(got) == ["ARTIFACT_REF.json", "README.md", "manifest.json"]
    assert json.loads((tmp_path / "dl-gguf" / "artifact" / "ARTIFACT_REF.json").read_text())["content_sha256"] == gguf.content_sha256

    # Re-registering through the server adds nothing, uploads nothing.
    exp = report.registry["experiment_id"]
    before = snapshot(c, exp, "srv-", server.dir / "artifacts")
    register_report(path, tracking_uri=server.uri, log=quiet)
    assert snapshot(c, exp, "srv-", server.dir / "artifacts") == before


def test_no_alias_moves_when_promotion_is_off(store_dir, monkeypatch):
    """CI builds of pull requests register versions but must not move candidate or production."""
    path = make_report(store_dir, recipe="prbuild", plot=False, long_description=False)
    monkeypatch.setenv("QUANTFORGE_PROMOTE", "false")
    report = register_report(path, log=quiet)
    c = client_for(tracking_uri_for(store_dir))
    for a in report.artifacts:
        if a.status != "built":
            continue
        mv = c.get_model_version(a.registry["name"], a.registry["version"])
        assert a.gates["passed"] is True and mv.aliases == [] and a.registry["aliases"] == []
    monkeypatch.setenv("QUANTFORGE_PROMOTE", "true")
    report = register_report(path, log=quiet)
    assert all(sorted(a.registry["aliases"]) == ["candidate", "production"] for a in report.artifacts if a.status == "built")
