"""`quantforge pull` and the report parts: several jobs' results merged on the build run, and a
registered build brought to another machine's store.

Real MLflow 3.17 on a SQLite store shared by every "CI job" of the module (each job has its
own artifacts dir, as CI runners share a server); test_server.py covers the proxied server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipeline.core.report import Report, read_report, report_digest
from pipeline.core.store import MANIFEST, file_table
from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.registry import parts as P
from pipeline.registry.promotion import decide
from pipeline.registry.pull import pull_report
from pipeline.registry.register import register_report
from tests.registry.conftest import QUANTFORGE, REPO, Log, client_for, free_port
from tests.registry.reports import FP8, GGUF, RECIPE, evaluated_on, only, variant, with_device, write


def files(folder: Path) -> dict[str, str]:
    return {row["path"]: row["sha256"] for row in file_table(folder)}


def manifest(folder: Path) -> dict:
    m = json.loads((folder / MANIFEST).read_text())
    m.pop("created")
    return m


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def build_run(uri: str, recipe: str):
    c = client_for(uri)
    exp = c.get_experiment_by_name(recipe)
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'build'")
    assert len(runs) == 1
    return runs[0]


def merged_parts(uri: str, recipe: str) -> tuple[list[str], Report]:
    c = client_for(uri)
    run = build_run(uri, recipe)
    names = P.list_parts(c, run.info.run_id)
    return names, decide(P.merge_parts([P.read_part(c, run.info.run_id, n) for n in names]))


def file_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, empty_db) -> str:
    """The tracking store every job of this module registers into (its artifacts beside it)."""
    root = tmp_path_factory.mktemp("tracking") / "mlflow"
    root.mkdir()
    shutil.copy(empty_db, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


def test_parts_round_trip_and_merge_devices_of_different_jobs(tracking, report, tmp_path):
    """A part reads back with the digest in its name; parts of two devices' jobs merge into
    both devices' results, and the gates are judged on both."""
    base = variant(report, "parts", devices=["cpu", "l4"])
    cpu, l4 = evaluated_on(base, "cpu"), evaluated_on(base, "l4", {FP8: {"delta_ppl_pct": 7.5}})
    assert [a.gates.status for a in cpu.built() + l4.built()] == ["pending", "pending", "failed", "pending"]  # fp8, gguf in each
    c = client_for(tracking)
    exp = c.create_experiment("parts-direct", artifact_location=(tmp_path / "artifacts").as_uri())
    run = c.create_run(exp).info.run_id
    l4.updated = "2026-01-01T00:00:02Z"
    cpu.updated = "2026-01-01T00:00:01Z"
    for part in (P.part_of(l4), P.part_of(cpu)):
        assert P.upload_part(c, run, part, P.list_parts(c, run))
    assert P.upload_part(c, run, P.part_of(cpu), P.list_parts(c, run)) is None  # same content: not again
    names = P.list_parts(c, run)
    assert [P.digest_of(n) for n in names] == [report_digest(P.part_of(cpu)), report_digest(P.part_of(l4))]  # oldest first
    merged = decide(P.merge_parts([P.read_part(c, run, n) for n in names]))
    assert {d: i.status for d, i in merged.devices.items()} == {"cpu": "done", "l4": "done"}
    assert merged.artifact(GGUF).gates.status == "passed" and merged.artifact(FP8).gates.status == "failed"
    assert merged.artifact(FP8).gates.per_device() == {"cpu": True, "l4": False}
    assert merged.recommendations["l4"].artifact == GGUF


def test_two_build_jobs_merge_then_pull_is_verified_and_idempotent(tracking, report, tmp_path):
    job_a, job_b, gpu = tmp_path / "job-a", tmp_path / "job-b", tmp_path / "gpu-runner"
    rep = variant(report, "pull")
    path_a = write(only(rep, GGUF), job_a)
    path_b = write(only(rep, FP8), job_b)
    register_report(path_a, tracking_uri=tracking, log=Log())
    register_report(path_b, tracking_uri=tracking, log=Log())

    # The build run's parts merge to both jobs' artifacts; its report.json view says where each went.
    names, merged = merged_parts(tracking, "pull")
    assert len(names) == 2 and sorted(a.name for a in merged.artifacts) == sorted([FP8, GGUF])
    c = client_for(tracking)
    parent = build_run(tracking, "pull")
    view = Report.model_validate_json(Path(c.download_artifacts(parent.info.run_id, P.REPORT_ARTIFACT, str(tmp_path / "v1"))).read_text())
    assert {a.name: a.registry.version for a in view.artifacts} == {GGUF: "1", FP8: "1"}
    # Job A registering its partial view again neither drops B's part nor uploads anything.
    view_file = next(file_path(parent.info.artifact_uri).rglob("report.json"))
    before = (names, parent.data.tags[P.REPORT_TAG], view_file.stat().st_mtime_ns)
    log = Log()
    register_report(path_a, tracking_uri=tracking, log=log)
    parent = build_run(tracking, "pull")
    assert (P.list_parts(c, parent.info.run_id), parent.data.tags[P.REPORT_TAG], view_file.stat().st_mtime_ns) == before
    assert any("0 run(s), 0 upload(s), 0 version(s) created, 0 metric value(s) logged" in m for m in log)

    # An eval runner pulls into an empty artifacts dir: the same folders, byte for byte, at local paths.
    sha = rep.recipe_sha256
    log = Log()
    rpath = pull_report("pull", gpu, tracking_uri=tracking, recipe_sha256=sha, log=log)
    local = read_report(rpath)
    assert rpath == (gpu / "pull" / "report.json").resolve() and local.recipe_sha256 == sha
    for name, job in ((GGUF, job_a), (FP8, job_b)):
        built = Path(read_report(job / "pull" / "report.json").artifact(name).path)
        a = local.artifact(name)
        assert Path(a.path) == (gpu / "store" / built.parent.name / built.name).resolve()  # store/<kind>/<key[:24]>
        assert files(Path(a.path)) == files(built) and manifest(Path(a.path)) == manifest(built)
        assert a.status == "built" and a.model_extra["pulled"] is True and a.registry.version == "1"
        assert a.evals["cpu"] == merged.artifact(name).evals["cpu"]
    assert not any((gpu / "store" / ".tmp").iterdir())
    assert any("2 artifact(s) downloaded" in m for m in log)

    # The runner evaluates on cuda; pulling again keeps that and downloads nothing (the versions'
    # files are even moved out of the tracking store meanwhile), and the local files stay untouched.
    write(with_device(read_report(rpath), "cuda"), gpu)
    sources = [file_path(c.get_model_version(f"pull-{t}", "1").source) for t in ("gguf-Q8_0", "fp8")]
    before = stamps(gpu / "store")
    for s in sources:
        s.rename(s.with_name("moved-away"))
    try:
        log = Log()
        pull_report("pull", gpu, tracking_uri=tracking, log=log)
    finally:
        for s in sources:
            s.with_name("moved-away").rename(s)
    assert stamps(gpu / "store") == before
    assert any("0 artifact(s) downloaded" in m and "2 already in the store" in m for m in log)
    again = read_report(rpath)
    assert all(set(a.evals) == {"cpu", "cuda"} for a in again.artifacts)

    # The runner registers its results: same versions, cuda metrics added, one more part.
    reg = register_report(rpath, tracking_uri=tracking, log=Log())
    assert {a.name: a.registry.version for a in reg.artifacts} == {GGUF: "1", FP8: "1"}
    run = c.get_run(reg.artifact(GGUF).registry.run_id)
    assert run.data.metrics["cuda.perplexity"] == pytest.approx(again.artifact(GGUF).evals["cuda"].metrics.perplexity, rel=1e-4)
    names, merged = merged_parts(tracking, "pull")
    assert len(names) == 3 and all(set(a.evals) == {"cpu", "cuda"} for a in merged.artifacts)
    parts = [P.read_part(c, build_run(tracking, "pull").info.run_id, n) for n in names]
    assert all("pulled" not in (a.model_extra or {}) and a.registry is None for p in parts for a in p.artifacts)  # local notes stay local


def test_tampered_version_is_refused_and_reference_is_not_pulled(tracking, report, tmp_path):
    # fp8 (5.5 MB) is over 4 MB: registered by reference; the GGUF (3.6 MB) is uploaded.
    path = write(variant(report, "pullbad", registry={"upload_max_mb": 4.0}), tmp_path / "build")
    register_report(path, tracking_uri=tracking, log=Log())
    c = client_for(tracking)
    uploaded = next(file_path(c.get_model_version("pullbad-gguf-Q8_0", "1").source).glob("*.gguf"))
    with open(uploaded, "r+b") as f:  # same size, other bytes
        f.write(b"\x00" * 16)

    runner = tmp_path / "runner"
    log = Log()
    with pytest.raises(StageFailed, match=r"\.gguf sha256 differs from the manifest"):
        pull_report("pullbad", runner, tracking_uri=tracking, log=log)
    store = runner / "store"
    assert sorted(p.name for p in store.iterdir() if p.name not in (".tmp", ".locks")) == []
    assert not any((store / ".tmp").iterdir())
    local = read_report(runner / "pullbad" / "report.json")
    gguf, fp8 = local.artifact(GGUF), local.artifact(FP8)
    assert gguf.status == "built" and gguf.path is None and gguf.model_extra["pulled"] is False
    assert fp8.status == "built" and fp8.path is None and fp8.model_extra["pulled"] is False
    assert "registered by reference only" in fp8.model_extra["pull_reason"]
    assert any(m.startswith(f"pull: {FP8}: NOT PULLED: registered by reference only") for m in log)


def test_unknown_recipe_or_build_is_invalid_input(tracking, report, tmp_path):
    register_report(write(only(variant(report, "pullsha"), GGUF), tmp_path / "build"), tracking_uri=tracking, log=Log())
    with pytest.raises(InvalidInput, match="nothing registered for recipe 'no-such-recipe'.*pullsha"):
        pull_report("no-such-recipe", tmp_path / "x", tracking_uri=tracking, log=Log())
    with pytest.raises(InvalidInput, match="no build of recipe 'pullsha' with recipe sha256 0000000000"):
        pull_report("pullsha", tmp_path / "x", tracking_uri=tracking, recipe_sha256="0" * 64, log=Log())
    with pytest.raises(InvalidInput, match="no MLflow store at sqlite"):
        pull_report("pullsha", tmp_path / "x", log=Log())  # nothing given: a local store that does not exist
    assert not (tmp_path / "x" / "pullsha").exists()


def test_unreachable_server_is_registry_unavailable(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port} is unreachable.*Nothing was pulled"):
        pull_report("pull", tmp_path, tracking_uri=f"http://127.0.0.1:{port}", log=Log())
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "pull").exists()


def test_cli_pull(tracking, report, tmp_path):
    import yaml

    rep = variant(report, "pullcli")
    register_report(write(only(rep, GGUF), tmp_path / "build"), tracking_uri=tracking, log=Log())
    recipe = tmp_path / "pullcli.yaml"
    cfg = yaml.safe_load(RECIPE)
    cfg["name"] = "pullcli"
    recipe.write_text(yaml.safe_dump(cfg))

    def pull() -> subprocess.CompletedProcess:
        return subprocess.run([*QUANTFORGE, "pull", str(recipe), "--artifacts-dir", str(tmp_path / "runner"), "--tracking-uri", tracking],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    res = pull()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 artifact(s) downloaded" in res.stdout
    assert read_report(tmp_path / "runner" / "pullcli" / "report.json").artifact(GGUF).model_extra["pulled"] is True
    cfg["registry"] = {"upload_max_mb": 1024}  # another recipe version
    recipe.write_text(yaml.safe_dump(cfg))
    res = pull()
    assert res.returncode == 2 and "no build of recipe 'pullcli' with recipe sha256" in res.stdout + res.stderr
