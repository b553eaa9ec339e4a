"""pipeline.registry.register on a real report (real build + eval) against real MLflow 3.17 (SQLite store).

No mocks of our code: every check reads back what MLflow stored.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from evals.table import COLUMNS, for_device
from pipeline.core.report import read_report
from pipeline.errors import StageFailed
from pipeline.registry.parts import PARTS_DIR, REPORT_ARTIFACT, REPORT_TAG
from pipeline.registry.register import register_report
from pipeline.registry.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, mlflow_command, tracking_uri_for
from tests.registry.conftest import QUANTFORGE, REPO, Log, client_for, download_tree, quiet, snapshot, store_tree
from tests.registry.reports import FP8, GGUF, own_copies, rebuilt, variant, with_device, write


def test_registration_matches_the_real_report_and_is_idempotent(store_dir, report, plots_dir, tmp_path):
    rep = variant(report, "regtest", description="A test recipe. " * 420, registry={"tags": {"team": "quant"}})
    path = write(rep, store_dir, plots_from=plots_dir)
    log = Log()
    out = register_report(path, log=log)
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)

    # The local report records where everything went.
    exp = c.get_experiment_by_name("regtest")
    assert out.registry.tracking_uri == uri and out.registry.experiment_id == exp.experiment_id
    assert exp.artifact_location == (store_dir / "mlflow" / "artifacts" / "regtest").resolve().as_uri()
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens in its model-training view
    on_disk = read_report(path)
    assert on_disk.registry == out.registry

    # Build run: recipe as params (long value truncated and said so), provenance tags, the
    # source's metrics, the per-device table as its description, plots.
    parent = c.get_run(out.registry.parent_run_id)
    p, t = parent.data.params, parent.data.tags
    assert p["name"] == "regtest" and p["targets.0.kind"] == "fp8" and p["targets.1.quants"] == '["Q8_0"]'
    assert len(p["description"]) == 6000 and p["description"].endswith("[truncated]") and "description" in t["quantforge.params_truncated"]
    assert t["quantforge.recipe_sha256"] == rep.recipe_sha256 and t["quantforge.source_fingerprint"] == rep.source.fingerprint
    assert t["quantforge.source_model"] == "builtin:tiny-llama-mini" and t["tool.torch"] == rep.tools["torch"]
    base = rep.baseline["cpu"].metrics
    assert parent.data.metrics["cpu.perplexity"] == pytest.approx(base.perplexity, rel=1e-4)
    assert all("nan" not in repr(v) for v in parent.data.metrics.values())
    note = t["mlflow.note.content"]
    # The table `quantforge report` prints (evals.table), names as code spans.
    for cells in for_device(rep, "cpu").rows:
        assert "| " + " | ".join([f"`{cells['artifact']}`", *(cells[c.key] for c in COLUMNS[1:])]) + " |" in note
    assert "| `source` | transformers |" in note and f"| `{GGUF}` | llama.cpp |" in note and f"| `{FP8}` | transformers dq |" in note
    assert f"Recommended on cpu: **{rep.recommendations['cpu'].artifact}**" in note
    assert parent.info.status == "FINISHED"
    assert sorted(a.path for a in c.list_artifacts(parent.info.run_id, "plots")) == [f"plots/{p.name}" for p in sorted(plots_dir.glob("*.png"))]
    assert [Path(a.path).name for a in c.list_artifacts(parent.info.run_id, PARTS_DIR)][0].endswith(".json")

    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [FP8, GGUF]
    # Every artifact run has the same metric keys (the compare and chart views line up), rounded.
    assert len({frozenset(r.data.metrics) for r in children}) == 1
    rec = rep.recommendations["cpu"].artifact
    for a in on_disk.artifacts:
        name = f"regtest-{a.target}" + (f"-{a.variant}" if a.variant else "")
        run = c.get_run(a.registry.run_id)
        expected_aliases = ["candidate", "production"] + (["recommended-cpu"] if a.name == rec else [])
        assert (a.registry.name, a.registry.version, a.registry.uri, a.registry.aliases) == (name, "1", f"models:/{name}/1", expected_aliases)
        assert run.data.tags["quantforge.content_sha256"] == a.content_sha256 and run.data.tags["quantforge.recommended.cpu"] == str(a.name == rec).lower()
        m = a.evals["cpu"].metrics
        for metric in ("perplexity", "kl_mean", "top1_agreement_pct", "decode_tps", "delta_ppl_pct"):
            assert run.data.metrics[f"cpu.{metric}"] == pytest.approx(getattr(m, metric), rel=1e-4)
            assert len(repr(run.data.metrics[f"cpu.{metric}"]).replace("e-0", "").strip("0.-")) <= 8  # 5 significant digits
        assert run.data.metrics["size_mib"] == round(a.bytes / 2**20, 3)
        assert run.data.tags["eval.cpu.runtime"] == a.evals["cpu"].runtime
        excerpt = json.loads(Path(c.download_artifacts(run.info.run_id, "quantforge/report_excerpt.json", str(tmp_path / a.name))).read_text())
        assert excerpt["artifact"]["evals"]["cpu"]["metrics"] == a.evals["cpu"].metrics.model_dump(mode="json")
        assert "path" not in excerpt["artifact"]

        # Version: tags, aliases, source linked to the run, files byte-identical to the store.
        v = c.get_model_version(name, "1")
        assert v.run_id == run.info.run_id and v.source == f"{run.info.artifact_uri}/artifact"
        assert sorted(v.aliases) == expected_aliases
        assert v.tags["content_sha256"] == a.content_sha256 and v.tags["format"] == a.format and v.tags["bits"] == "8"
        assert v.tags["runtimes"] == ",".join(a.runtimes) and v.tags["recipe_sha256"] == rep.recipe_sha256
        assert v.tags["gate.passed"] == "true" and v.tags["gate.cpu.passed"] == "true" and v.tags["recommended.cpu"] == str(a.name == rec).lower()
        assert float(v.tags["cpu.perplexity"]) == pytest.approx(m.perplexity, rel=1e-4) and v.tags["team"] == "quant"
        assert download_tree(uri, v.source, tmp_path / f"v-{a.name}") == store_tree(a.path)
        # The description: how to download and serve it, and what was measured; no local paths.
        d = v.description
        assert f"mlflow artifacts download --artifact-uri models:/{name}/1 -d DIR" in d and f"models:/{name}@production" in d
        serve = [f"llama-server -m DIR/{next(Path(a.path).glob('*.gguf')).name}", f"ollama create {next(Path(a.path).glob('*.gguf')).stem.lower()} -f DIR/Modelfile"] if a.kind == "gguf" else ["vllm serve DIR", "python -m sglang.launch_server --model-path DIR"]
        assert all(s in d for s in serve), d
        row = for_device(rep, "cpu").row(a.name)
        assert "| `cpu` | " + " | ".join(row[c.key] for c in COLUMNS[1:]) + " |" in d and "Gates: **passed on every required device**" in d
        assert str(REPO) not in d and "/tmp" not in d and "Filled in" not in d
        assert c.get_registered_model(name).tags["kind"] == a.kind

    # The merged report.json view on the build run is what the parts merge to, with registry entries.
    view = json.loads(Path(c.download_artifacts(parent.info.run_id, REPORT_ARTIFACT, str(tmp_path / "view"))).read_text())
    assert {a["name"]: a["registry"]["version"] for a in view["artifacts"]} == {FP8: "1", GGUF: "1"}
    assert parent.data.tags[REPORT_TAG]
    assert any(line.startswith(f"browse: {mlflow_command()} ui --backend-store-uri sqlite:///") and str(store_dir) in line for line in log)
    assert any(line.startswith("compare: http://127.0.0.1:5000/#/compare-runs?runs=[") for line in log)

    # A second registration of the unchanged report creates, uploads and logs nothing.
    files = store_dir / "mlflow" / "artifacts" / "regtest"
    before = snapshot(c, exp.experiment_id, "regtest-", files)
    log = Log()
    again = register_report(path, log=log)
    assert snapshot(c, exp.experiment_id, "regtest-", files) == before
    assert [a.registry for a in again.artifacts] == [a.registry for a in on_disk.artifacts]
    assert any("0 run(s), 0 upload(s), 0 version(s) created, 0 metric value(s) logged" in m for m in log)


def test_later_device_results_then_a_failing_rebuild(store_dir, report, tmp_path):
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)
    # cuda is required but not evaluated yet: candidate only, no promotion, and cpu's recommendation.
    rep = variant(report, "inc", devices=["cpu", "cuda"])
    assert all(a.gates.status == "pending" and a.gates.pending_devices == ["cuda"] for a in rep.built())
    path = write(rep, store_dir)
    first = register_report(path, log=quiet)
    rec = rep.recommendations["cpu"].artifact
    model = {a.name: a.registry.name for a in first.artifacts}
    assert first.artifact(FP8).registry.aliases == ["candidate"]
    assert first.artifact(rec).registry.aliases == ["candidate", "recommended-cpu"]
    v1 = c.get_model_version(model[GGUF], "1")
    assert v1.tags["gate.passed"] == "pending" and v1.tags["gate.pending_devices"] == "cuda" and "cuda.perplexity" not in v1.tags
    runs_before = sorted(r.info.run_id for r in c.search_runs([first.registry.experiment_id]))

    # The cuda eval job lands later: same runs and versions, new metrics and tags, promoted now.
    rep2 = with_device(read_report(path), "cuda")
    write(rep2, store_dir)
    second = register_report(path, log=quiet)
    assert sorted(r.info.run_id for r in c.search_runs([first.registry.experiment_id])) == runs_before
    assert second.artifact(GGUF).registry.version == "1"
    assert second.artifact(FP8).registry.aliases == ["candidate", "production"]
    child = c.get_run(second.artifact(GGUF).registry.run_id)
    assert child.data.metrics["cuda.perplexity"] == pytest.approx(rep2.artifact(GGUF).evals["cuda"].metrics.perplexity, rel=1e-4)
    assert "cuda.decode_tps" in c.get_run(first.registry.parent_run_id).data.metrics
    v1 = c.get_model_version(model[GGUF], "1")
    assert v1.tags["gate.passed"] == "true" and v1.tags["gate.cuda.passed"] == "true" and "cuda.decode_tps" in v1.tags
    assert len(c.search_model_versions(f"name = '{model[GGUF]}'")) == 1

    # A rebuild of the GGUF with other bytes that fails its gate on cuda: a new version,
    # candidate moves to it, production stays on v1; fp8 (unchanged content) keeps its version.
    rep3 = with_device(rebuilt(read_report(path), store_dir, GGUF, "rebuilt"), "cuda")
    rep3.artifact(GGUF).evals["cuda"].metrics.delta_ppl_pct = 9.0
    from tests.registry.reports import decide

    decide(rep3)
    write(rep3, store_dir)
    third = register_report(path, log=quiet)
    reg = third.artifact(GGUF).registry
    assert reg.version == "2" and reg.aliases == ["candidate"] + (["recommended-cpu"] if rec == GGUF else [])
    assert {k: str(v) for k, v in c.get_registered_model(model[GGUF]).aliases.items()}["production"] == "1"
    v2 = c.get_model_version(model[GGUF], "2")
    assert v2.tags["gate.passed"] == "false" and v2.tags["gate.cuda.passed"] == "false" and v2.tags["gate.cpu.passed"] == "true"
    assert third.artifact(FP8).registry.version == "1"
    # Same recipe and source: the build run is reused; the new content gets its own artifact run.
    parents = c.search_runs([first.registry.experiment_id], filter_string="tags.`quantforge.role` = 'build'")
    assert len(parents) == 1 and third.registry.parent_run_id == first.registry.parent_run_id


def test_recommended_alias_moves_between_the_recipes_models(store_dir, report):
    """recommended-<device> is on exactly one registered model of the recipe; tags say true/false."""
    uri = tracking_uri_for(store_dir)
    c = client_for(uri)
    rep = variant(report, "recmove", gates={"recommend": "smallest"})
    path = write(rep, store_dir)
    first = register_report(path, log=quiet)
    smallest = rep.recommendations["cpu"].artifact
    other = FP8 if smallest == GGUF else GGUF
    assert "recommended-cpu" in first.artifact(smallest).registry.aliases

    # The eval job measured again: the smallest one now fails on cpu, so the other is the one to ship there.
    rep2 = read_report(path)
    rep2.artifact(smallest).evals["cpu"].metrics.delta_ppl_pct = 50.0
    from tests.registry.reports import decide

    decide(rep2)
    assert rep2.recommendations["cpu"].artifact == other
    write(rep2, store_dir)
    second = register_report(path, log=quiet)
    models = {a.name: a.registry.name for a in second.artifacts}
    assert "recommended-cpu" in c.get_registered_model(models[other]).aliases
    assert "recommended-cpu" not in c.get_registered_model(models[smallest]).aliases
    assert c.get_model_version(models[other], "1").tags["recommended.cpu"] == "true"
    assert c.get_model_version(models[smallest], "1").tags["recommended.cpu"] == "false"
    assert c.get_run(second.artifact(smallest).registry.run_id).data.tags["quantforge.recommended.cpu"] == "false"
    # production stays on the failing one's earlier version: a failed gate never promotes, never demotes.
    assert "production" in c.get_registered_model(models[smallest]).aliases


def test_altered_files_and_a_corrupted_upload_create_no_version(store_dir, report, monkeypatch):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    c = client_for(tracking_uri_for(store_dir))
    # 1. A stored file changed after the build: refused before anything is uploaded.
    rep = own_copies(variant(report, "bad"), store_dir)
    gguf_file = next(Path(rep.artifact(GGUF).path).glob("*.gguf"))
    with open(gguf_file, "ab") as f:
        f.write(b"tampered")
    path = write(rep, store_dir)
    with pytest.raises(StageFailed, match=f"{GGUF}: the files in .* changed since the build: {gguf_file.name} has"):
        register_report(path, log=quiet)
    assert c.search_model_versions("name = 'bad-gguf-Q8_0'") == []
    assert [str(v.version) for v in c.search_model_versions("name = 'bad-fp8'")] == ["1"]
    after = read_report(path)
    assert after.artifact(GGUF).registry is None and after.artifact(FP8).registry.version == "1"

    # 2. The bytes arrive altered in the artifact store (what MLflow issue 18581 reported):
    #    the download-back check refuses them, the run is marked FAILED, no version.
    rep = variant(report, "corrupt")
    path = write(rep, store_dir)
    real = LocalArtifactRepository.log_artifacts

    def corrupting(self, local_dir, artifact_path=None):
        real(self, local_dir, artifact_path)
        for p in Path(self.artifact_dir, artifact_path or "").rglob("*.gguf"):
            with open(p, "r+b") as f:
                f.write(b"\0" * 16)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", corrupting)
    with pytest.raises(StageFailed, match=r"the uploaded artifact at .* does not match its manifest: .*\.gguf sha256 differs from the manifest"):
        register_report(path, log=quiet)
    assert c.search_model_versions("name = 'corrupt-gguf-Q8_0'") == []
    failed = c.search_runs([c.get_experiment_by_name("corrupt").experiment_id], filter_string=f"tags.`quantforge.artifact` = '{GGUF}'")
    assert [r.info.status for r in failed] == ["FAILED"]
    # Once the store behaves, the next registration completes it and removes the failed run.
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", real)
    done = register_report(path, log=quiet)
    assert done.artifact(GGUF).registry.version == "1"
    runs = c.search_runs([c.get_experiment_by_name("corrupt").experiment_id], filter_string=f"tags.`quantforge.artifact` = '{GGUF}'")
    assert [r.info.run_id for r in runs] == [done.artifact(GGUF).registry.run_id]


def test_no_alias_moves_when_promotion_is_off(store_dir, report, monkeypatch):
    """CI builds of pull requests register versions but must not move any alias."""
    path = write(variant(report, "prbuild"), store_dir)
    monkeypatch.setenv("QUANTFORGE_PROMOTE", "false")
    log = Log()
    out = register_report(path, log=log)
    c = client_for(tracking_uri_for(store_dir))
    for a in out.artifacts:
        mv = c.get_model_version(a.registry.name, a.registry.version)
        assert a.gates.passed is True and mv.aliases == [] and a.registry.aliases == []
        assert mv.tags["recommended.cpu"] in ("true", "false")  # facts are still tagged
    assert any("QUANTFORGE_PROMOTE=false" in m for m in log)
    monkeypatch.setenv("QUANTFORGE_PROMOTE", "true")
    out = register_report(path, log=quiet)
    assert all(a.registry.aliases[:2] == ["candidate", "production"] for a in out.artifacts)


def test_register_cli_from_report_json_alone(tmp_path, empty_db, report):
    """A CI job with only report.json and the artifact folders (no recipe file) registers them."""
    import shutil

    artifacts = tmp_path / "ci-job"
    (artifacts / "mlflow").mkdir(parents=True)
    shutil.copy(empty_db, artifacts / "mlflow" / "mlflow.db")
    rep = variant(report, "alone")
    rep.recipe_path = str(tmp_path / "no-such-recipe.yaml")
    path = write(rep, artifacts)
    res = subprocess.run([*QUANTFORGE, "register", str(path), "--artifacts-dir", str(artifacts)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 artifact(s) registered" in res.stdout and f"browse: {mlflow_command()} ui --backend-store-uri sqlite:///" in res.stdout
    assert all(a.registry.version == "1" for a in read_report(path).artifacts)


def test_a_warm_rerun_is_not_registered_again(tmp_path, empty_db, report):
    """`make demo` twice: the second build finds every stage built (its records turn from
    'built' into 'hit'), which changes nothing a registration would write, so its `register`
    leaves the local store alone; a stage that now failed is news and is registered."""
    import shutil

    from pipeline.core.report import updating

    artifacts = tmp_path / "demo-twice"
    (artifacts / "mlflow").mkdir(parents=True)
    shutil.copy(empty_db, artifacts / "mlflow" / "mlflow.db")
    rep = variant(report, "twice")
    for s in rep.stages:
        s.status, s.seconds, s.built_seconds = "built", 3.0, 3.0
    path = write(rep, artifacts)

    def register():
        res = subprocess.run([*QUANTFORGE, "register", str(path), "--artifacts-dir", str(artifacts)],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    assert "2 artifact(s) registered" in register()
    with updating(path, rep.recipe) as r:  # what the warm build writes
        for s in r.stages:
            s.status, s.seconds = "hit", 0.0
    assert "nothing changed since the last registration" in register()
    with updating(path, rep.recipe) as r:
        r.stages[0].status, r.stages[0].reason = "failed", "killed"
    assert "artifact(s) registered" in register()
