"""`quantforge pull`: the merged report on the build run, and pulling a registered build to another machine.

Real MLflow 3.17 on SQLite stores (no server: pull and register take the same code path
for both, and tests/test_registry.py covers the server's proxied artifacts). Each "CI job"
gets its own artifacts dir; they share one tracking store, as CI runners share a server.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.registry.register import REPORT_ARTIFACT, REPORT_TAG, merge_reports, pull_report, register_report
from pipeline.core.report import ArtifactReport, Report, read_report, updating
from pipeline.core.store import file_table, sha256_file
try:
    from tests.registry_fixtures import evals_for, make_report
except ImportError:  # pytest's default import mode puts tests/, not the repo root, on sys.path
    from registry_fixtures import evals_for, make_report

GGUF, GPTQ = "gguf-Q4_K_M", "w4a16-gptq"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def tree(folder: Path) -> dict[str, str]:
    """Every file with its sha256, the manifest included."""
    out = {row["path"]: row["sha256"] for row in file_table(folder)}
    out["manifest.json"] = sha256_file(folder / "manifest.json")
    return out


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def partial(artifacts_dir: Path, recipe: str, keep: list[str], **kw) -> Path:
    """A build job's report: same recipe (so same sha256 and build run), only its own targets."""
    path = make_report(artifacts_dir, recipe=recipe, long_description=False, plot=False, **kw)
    with updating(path, recipe) as r:
        r.artifacts = [a for a in r.artifacts if a.name in keep]
    return path


def parent_report(uri: str, recipe: str, dst: Path) -> tuple[object, Report]:
    c = client_for(uri)
    exp = c.get_experiment_by_name(recipe)
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'build'")
    assert len(runs) == 1
    got = Path(c.download_artifacts(runs[0].info.run_id, REPORT_ARTIFACT, str(dst)))
    return runs[0], Report.model_validate_json(got.read_text())


def file_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, empty_db) -> str:
    """The tracking store every job of this module registers into (its artifacts beside it)."""
    root = tmp_path_factory.mktemp("tracking") / "mlflow"
    root.mkdir()
    shutil.copy(empty_db, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ------------------------------------------------------------------ merge (pure)
def art(name: str, content: str | None, status: str = "built", **kw) -> ArtifactReport:
    return ArtifactReport(name=name, target=name, kind="gguf", status=status, content_sha256=content, **kw)


def test_merge_reports_per_artifact_and_per_device():
    old = Report(
        recipe="m", recipe_sha256="s1", tools={"torch": "2.13", "llama_cpp": "0.3.36"},
        baseline={"cpu": {"perplexity": 54.0}}, devices={"cpu": {"status": "done"}, "cuda": {"status": "done"}},
        artifacts=[
            art("a", "c1", path="/build/a", evals={"cpu": {"perplexity": 55.0}}, gates={"passed": True}, registry={"version": "1"}),
            art("b", "c2", evals={"cpu": {"perplexity": 60.0}}, registry={"version": "1"}),
            art("c", "c3", path="/build/c"),
        ],
    )
    new = Report(
        recipe="m", recipe_sha256="s1", tools={"torch": "2.14"},
        baseline={"cuda": {"perplexity": 54.1}}, devices={"cuda": {"status": "pending"}, "rocm": {"status": "done"}},
        artifacts=[
            # same content: cuda results join cpu's; a bare pending never replaces cpu's numbers; empty path keeps the old one
            art("a", "c1", path=None, evals={"cuda": {"perplexity": 55.5}, "cpu": {"status": "pending"}}),
            # new content: the newer entry wins whole (the old evals and version describe other bytes)
            art("b", "c9", evals={"cuda": {"perplexity": 61.0}}),
            art("c", None, status="planned"),  # "planned" carries nothing: the built entry stays
            art("d", "c4"),
        ],
    )
    before = (old.model_dump(), new.model_dump())
    m = merge_reports(old, new)
    assert (old.model_dump(), new.model_dump()) == before  # pure
    assert [a.name for a in m.artifacts] == ["a", "b", "c", "d"]
    a, b, c, d = m.artifacts
    assert a.evals == {"cpu": {"perplexity": 55.0}, "cuda": {"perplexity": 55.5}}
    assert a.path == "/build/a" and a.gates == {"passed": True} and a.registry == {"version": "1"}
    assert b.content_sha256 == "c9" and b.evals == {"cuda": {"perplexity": 61.0}} and b.registry == {}
    assert c.status == "built" and c.content_sha256 == "c3" and d.content_sha256 == "c4"
    assert m.tools == {"torch": "2.14", "llama_cpp": "0.3.36"}
    assert m.baseline == {"cpu": {"perplexity": 54.0}, "cuda": {"perplexity": 54.1}}
    assert m.devices == {"cpu": {"status": "done"}, "cuda": {"status": "done"}, "rocm": {"status": "done"}}
    # The order of the arguments is the order of the facts: swapped, the other side wins.
    assert merge_reports(new, old).artifact("b").content_sha256 == "c2"
    # Another recipe version does not merge: the newer report replaces it.
    other = merge_reports(old, Report(recipe="m", recipe_sha256="s2", artifacts=[art("z", "c5")]))
    assert [x.name for x in other.artifacts] == ["z"] and other.tools == {}
    assert merge_reports(None, new).model_dump() == new.model_dump()


# ------------------------------------------------------------------ MLflow
def test_two_build_jobs_merge_then_pull_is_verified_and_idempotent(tracking, tmp_path):
    job_a, job_b, gpu = tmp_path / "job-a", tmp_path / "job-b", tmp_path / "gpu-runner"
    path_a = partial(job_a, "pull", [GGUF])
    path_b = partial(job_b, "pull", [GPTQ])
    register_report(path_a, tracking_uri=tracking, log=Log())
    register_report(path_b, tracking_uri=tracking, log=Log())

    # The build run's report.json holds both jobs' artifacts, each with where it was registered.
    parent, merged = parent_report(tracking, "pull", tmp_path / "dl1")
    assert [a.name for a in merged.artifacts] == [GGUF, GPTQ]
    assert {a.name: a.registry["version"] for a in merged.artifacts} == {GGUF: "1", GPTQ: "1"}
    assert merged.artifact(GGUF).path == read_report(path_a).artifact(GGUF).path
    # Job A registering its partial view again neither drops B's part nor uploads the report again.
    report_file = next(file_path(parent.info.artifact_uri).rglob("report.json"))
    before = (parent.data.tags[REPORT_TAG], report_file.stat().st_mtime_ns)
    register_report(path_a, tracking_uri=tracking, log=Log())
    parent, merged = parent_report(tracking, "pull", tmp_path / "dl2")
    assert [a.name for a in merged.artifacts] == [GGUF, GPTQ]
    assert (parent.data.tags[REPORT_TAG], report_file.stat().st_mtime_ns) == before

    # An eval runner pulls into an empty artifacts dir: the same folders, byte for byte, at local paths.
    sha = read_report(path_a).recipe_sha256
    log = Log()
    rpath = pull_report("pull", gpu, tracking_uri=tracking, recipe_sha256=sha, log=log)
    local = read_report(rpath)
    assert rpath == (gpu / "pull" / "report.json").resolve() and local.recipe_sha256 == sha
    for name, job in ((GGUF, job_a), (GPTQ, job_b)):
        built = Path(read_report(job / "pull" / "report.json").artifact(name).path)
        a = local.artifact(name)
        assert Path(a.path) == (gpu / built.relative_to(job)).resolve()  # store/<kind>/<key[:24]>
        assert tree(Path(a.path)) == tree(built)
        assert a.status == "built" and a.model_extra["pulled"] is True
        assert a.evals == merged.artifact(name).evals and a.registry == merged.artifact(name).registry
    assert not any((gpu / "store" / ".tmp").iterdir())
    assert any("2 artifact(s) downloaded" in m for m in log)

    # The runner evaluates on cuda; pulling again keeps that, and downloads nothing: the
    # versions' files are moved out of the tracking store, and the local files stay untouched.
    with updating(rpath, "pull") as r:
        for a in r.artifacts:
            a.evals["cuda"] = evals_for("cuda", a.runtimes[0], 2.5, 20000.0)
    c = client_for(tracking)
    sources = [file_path(c.get_model_version(f"pull-{t}", "1").source) for t in ("gguf-Q4_K_M", "w4a16-gptq")]
    files = stamps(gpu / "store")
    for s in sources:
        s.rename(s.with_name("moved-away"))
    try:
        log = Log()
        pull_report("pull", gpu, tracking_uri=tracking, log=log)
    finally:
        for s in sources:
            s.with_name("moved-away").rename(s)
    assert stamps(gpu / "store") == files
    assert any("0 artifact(s) downloaded" in m and "2 already in the store" in m for m in log)
    again = read_report(rpath)
    assert all(set(a.evals) == {"cpu", "cuda"} for a in again.artifacts)

    # The runner registers its results: same versions, cuda metrics added, merged into the build run's report.
    reg = register_report(rpath, tracking_uri=tracking, log=Log())
    assert {a.name: a.registry["version"] for a in reg.artifacts} == {GGUF: "1", GPTQ: "1"}
    assert c.get_run(reg.artifact(GGUF).registry["run_id"]).data.metrics["cuda.perplexity"] == again.artifact(GGUF).evals["cuda"]["perplexity"]
    _, merged = parent_report(tracking, "pull", tmp_path / "dl3")
    assert all(set(a.evals) == {"cpu", "cuda"} for a in merged.artifacts)
    assert all("pulled" not in a.model_extra for a in merged.artifacts)  # local notes stay local


def test_tampered_version_is_refused_and_reference_is_not_pulled(tracking, tmp_path):
    # gguf (48 KB) is over 0.045 MB: registered by reference; gptq (40 KB) is uploaded.
    path = make_report(tmp_path / "build", recipe="pullbad", upload_max_mb=0.045, long_description=False, plot=False)
    register_report(path, tracking_uri=tracking, log=Log())
    c = client_for(tracking)
    uploaded = file_path(c.get_model_version("pullbad-w4a16-gptq", "1").source) / "model.safetensors"
    with open(uploaded, "r+b") as f:  # same size, other bytes
        f.write(b"\x00" * 16)

    runner = tmp_path / "runner"
    log = Log()
    with pytest.raises(StageFailed, match="model.safetensors sha256 differs from the manifest"):
        pull_report("pullbad", runner, tracking_uri=tracking, log=log)
    store = runner / "store"
    assert sorted(p.name for p in store.iterdir() if p.name not in (".tmp", ".locks")) == []
    assert not any((store / ".tmp").iterdir())
    local = read_report(runner / "pullbad" / "report.json")
    gguf, gptq = local.artifact(GGUF), local.artifact(GPTQ)
    assert gptq.status == "built" and gptq.path is None and gptq.model_extra["pulled"] is False
    assert gguf.status == "built" and gguf.path is None and gguf.model_extra["pulled"] is False
    assert "registered by reference only" in gguf.model_extra["pull_reason"]
    assert any(m.startswith(f"pull: {GGUF}: NOT PULLED: registered by reference only") for m in log)
    assert local.artifact("trt-fp8").status == "skipped"


def test_unknown_recipe_or_build_is_invalid_input(tracking, tmp_path):
    partial(tmp_path / "build", "pullsha", [GGUF])
    register_report(tmp_path / "build" / "pullsha" / "report.json", tracking_uri=tracking, log=Log())
    with pytest.raises(InvalidInput, match="nothing registered for recipe 'no-such-recipe'.*pullsha"):
        pull_report("no-such-recipe", tmp_path / "x", tracking_uri=tracking, log=Log())
    with pytest.raises(InvalidInput, match="no build of recipe 'pullsha' with recipe sha256 0000000000"):
        pull_report("pullsha", tmp_path / "x", tracking_uri=tracking, recipe_sha256="0" * 64, log=Log())
    with pytest.raises(InvalidInput, match="no MLflow store at sqlite"):
        pull_report("pullsha", tmp_path / "x", log=Log())  # nothing given: a local store that does not exist
    assert not (tmp_path / "x" / "pullsha").exists()


def test_unreachable_server_is_registry_unavailable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port} is unreachable.*Nothing was pulled"):
        pull_report("pull", tmp_path, tracking_uri=f"http://127.0.0.1:{port}", log=Log())
    print(f"RegistryUnavailable after {time.monotonic() - t0:.2f} s")
    assert not (tmp_path / "pull").exists()


def test_cli_pull(tracking, tmp_path):
    import yaml
    from typer.testing import CliRunner

    import pipeline.workflow
    if not hasattr(pipeline.workflow, "run_pull"):
        pytest.skip("pipeline.workflow.run_pull is not wired yet (body in pipeline/cli/pull.py's docstring)")
    from pipeline.cli.pull import app
    try:
        from tests.registry_fixtures import recipe_dict
    except ImportError:
        from registry_fixtures import recipe_dict

    partial(tmp_path / "build", "pullcli", [GPTQ])
    register_report(tmp_path / "build" / "pullcli" / "report.json", tracking_uri=tracking, log=Log())
    recipe = tmp_path / "pullcli.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict("pullcli", None, 2048, ["cpu"], False)))
    res = CliRunner().invoke(app, [str(recipe), "--artifacts-dir", str(tmp_path / "runner"), "--tracking-uri", tracking])
    assert res.exit_code == 0, res.output
    assert "1 artifact(s) downloaded" in res.output
    assert read_report(tmp_path / "runner" / "pullcli" / "report.json").artifact(GPTQ).model_extra["pulled"] is True
    recipe.write_text(yaml.safe_dump(recipe_dict("pullcli", None, 1024, ["cpu"], False)))  # another recipe version
    res = CliRunner().invoke(app, [str(recipe), "--artifacts-dir", str(tmp_path / "runner"), "--tracking-uri", tracking])
    assert res.exit_code == 2 and "no build of recipe 'pullcli' with recipe sha256" in res.output
