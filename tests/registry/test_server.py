"""Registration against a real `mlflow server` (scripts/mlflow_server.sh): proxied uploads,
an unreachable server, four registrations at once, and a server killed mid-upload.

Real processes throughout: the CLI entry point, the server, SIGKILL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.core.report import Report, read_report, report_digest
from pipeline.core.store import MANIFEST, verify_folder
from pipeline.registry import parts as P
from pipeline.registry.promotion import decide
from pipeline.registry.register import register_report
from tests.registry.conftest import QUANTFORGE, REPO, Server, client_for, download_tree, quiet, snapshot, store_tree
from tests.registry.reports import FP8, GGUF, evaluated_on, rebuilt, variant, write


def register_cli(path: Path, uri: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*QUANTFORGE, "register", str(path), "--tracking-uri", uri, "--artifacts-dir", str(path.parent.parent)],
                          capture_output=True, text=True, cwd=REPO, timeout=kw.pop("timeout", 600), **kw)


def test_unreachable_server_exits_1_in_seconds_then_registers_when_up(server, report, tmp_path):
    if server.up():
        server.stop()
    # fp8 (5.5 MB) is over the 4 MB limit: registered by reference, not uploaded; the GGUF (3.6 MB) is uploaded.
    path = write(variant(report, "srv", registry={"upload_max_mb": 4.0}), tmp_path)
    t0 = time.monotonic()
    res = register_cli(path, server.uri)
    took = time.monotonic() - t0
    print(f"unreachable: exit {res.returncode} after {took:.1f} s")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr  # one line, no traceback
    assert lines[0].startswith(f"error: MLflow at {server.uri} is unreachable") and "start the server" in lines[0]
    assert f"quantforge register {path}" in lines[0] or "quantforge register recipes/srv.yaml" in lines[0]
    assert took < 60  # MLflow's own retries would take minutes
    assert read_report(path).registry.tracking_uri is None

    server.start()
    out = register_report(path, tracking_uri=server.uri, log=quiet)
    c = client_for(server.uri)
    assert out.registry.tracking_uri == server.uri
    gguf, fp8 = out.artifact(GGUF), out.artifact(FP8)
    v = c.get_model_version(gguf.registry.name, gguf.registry.version)
    assert v.source.startswith("mlflow-artifacts:/")  # uploaded through the server's proxy
    assert "candidate" in v.aliases and "production" in v.aliases and v.tags["content_sha256"] == gguf.content_sha256
    assert download_tree(server.uri, v.source, tmp_path / "dl-gguf") == store_tree(gguf.path)
    assert f"MLFLOW_TRACKING_URI={server.uri} mlflow artifacts download --artifact-uri models:/{v.name}/{v.version} -d DIR" in v.description
    # The referenced artifact: manifest, card and a pointer to the store, not the model files.
    ref_run = c.get_run(fp8.registry.run_id)
    assert ref_run.data.tags["quantforge.artifact_ref"].startswith(fp8.path)
    vf = c.get_model_version(fp8.registry.name, fp8.registry.version)
    assert vf.tags["artifact_ref"] == ref_run.data.tags["quantforge.artifact_ref"]
    got = download_tree(server.uri, vf.source, tmp_path / "dl-fp8")
    assert sorted(got) == ["ARTIFACT_REF.json", "README.md", MANIFEST]
    assert json.loads((tmp_path / "dl-fp8" / "artifact" / "ARTIFACT_REF.json").read_text())["content_sha256"] == fp8.content_sha256

    # Re-registering through the server adds nothing, uploads nothing.
    exp = out.registry.experiment_id
    before = snapshot(c, exp, "srv-", server.dir / "artifacts")
    register_report(path, tracking_uri=server.uri, log=quiet)
    assert snapshot(c, exp, "srv-", server.dir / "artifacts") == before


# ------------------------------------------------------------------ concurrency
#: tags that name a run, a job or a machine's files: they differ between any two registrations
RUN_SPECIFIC = {"mlflow.parentRunId", "quantforge.job", "quantforge.plots_sha256", "mlflow.user", "mlflow.source.name", "mlflow.source.type",
                "mlflow.source.git.commit", "quantforge.report_sha256"}  # the last: a digest of the view, which names run ids


def end_state(uri: str, recipe: str, tmp: Path) -> dict:
    """What a registration leaves, less what differs by nature between two servers (run ids, the URI)."""
    c = client_for(uri)
    exp = c.get_experiment_by_name(recipe)
    builds = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'build'")
    arts = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'artifact'")
    assert len(builds) == 1, [r.info.run_id for r in builds]
    parent = builds[0]
    names = P.list_parts(c, parent.info.run_id)
    merged = decide(P.merge_parts([P.read_part(c, parent.info.run_id, n) for n in names]))
    view = Report.model_validate_json(Path(c.download_artifacts(parent.info.run_id, P.REPORT_ARTIFACT, str(tmp))).read_text())
    for a in view.artifacts:
        if a.registry:
            assert a.registry.run_id in {r.info.run_id for r in arts}
            a.registry.run_id = None
    view.registry = type(view.registry)()
    models = {m.name: m for m in c.search_registered_models(f"tags.recipe = '{recipe}'")}
    versions = {}
    for name in models:
        for v in c.search_model_versions(f"name = '{name}'"):
            versions[(name, str(v.version))] = {
                "tags": v.tags, "description": v.description.replace(uri, "URI"),
                "run_metrics": {k: round(x, 9) for k, x in c.get_run(v.run_id).data.metrics.items() if x == x},
                "run_tags": {k: x for k, x in c.get_run(v.run_id).data.tags.items() if k not in RUN_SPECIFIC},
            }
    return {
        "versions": sorted(versions),
        "version_facts": versions,
        "aliases": {n: {k: str(v) for k, v in m.aliases.items()} for n, m in models.items()},
        "artifact_runs": sorted(r.data.tags["quantforge.artifact"] for r in arts),
        "parts": names,
        "merged": report_digest(merged),
        "view": report_digest(view),
        "view_report": view,
        "build_note": parent.data.tags["mlflow.note.content"],
        "build_tags": {k: x for k, x in parent.data.tags.items() if k not in RUN_SPECIFIC},
        "build_params": parent.data.params,
        "build_metrics": {k: x for k, x in parent.data.metrics.items()},
    }


def test_four_registrations_at_once_end_like_four_in_a_row(tmp_path, report, empty_db):
    """CI's eval jobs (cpu twice, l4, h100) registering one build into one server at the same time."""
    base = variant(report, "conc", devices=["cpu", "l4", "h100"])
    jobs = {
        "cpu-a": evaluated_on(base, "cpu"),
        "cpu-b": evaluated_on(base, "cpu"),  # the same job run twice (a CI retry)
        "l4": evaluated_on(base, "l4"),
        # On h100 the GGUF misses the gate: fp8 is the one to ship there, and the only one promotable.
        "h100": evaluated_on(base, "h100", {GGUF: {"delta_ppl_pct": 9.0}}),
    }
    written = {}
    for name, rep in jobs.items():
        path = write(rep, tmp_path / "jobs" / name)
        written[name] = path
    # The same files for both runs: each registration writes back into its report.
    for run in ("together", "in-a-row"):
        shutil.copytree(tmp_path / "jobs", tmp_path / run)

    together, in_a_row = Server(tmp_path / "a", empty_db), Server(tmp_path / "b", empty_db)
    with ThreadPoolExecutor(2) as pool:  # both servers start at once (each takes seconds)
        list(pool.map(Server.start, (together, in_a_row)))
    try:
        t0 = time.monotonic()
        procs = {name: subprocess.Popen([*QUANTFORGE, "register", str(tmp_path / "together" / name / "conc" / "report.json"),
                                         "--tracking-uri", together.uri, "--artifacts-dir", str(tmp_path / "together" / name)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for name in jobs}
        outs = {name: p.communicate(timeout=600) for name, p in procs.items()}
        print(f"4 registrations at once: {time.monotonic() - t0:.1f} s")
        for name, (out, _) in outs.items():  # what the races did (they vary from run to run)
            print(name, [line for line in out.splitlines() if "another job" in line or "removed" in line or "created" in line])
        for name, p in procs.items():
            assert p.returncode == 0, f"{name}:\n{outs[name][0]}\n{outs[name][1]}"
            assert "Traceback" not in outs[name][1], outs[name][1]
        t0 = time.monotonic()
        for name in jobs:
            register_report(tmp_path / "in-a-row" / name / "conc" / "report.json", tracking_uri=in_a_row.uri, log=quiet)
        print(f"4 registrations in a row: {time.monotonic() - t0:.1f} s")

        a = end_state(together.uri, "conc", tmp_path / "view-a")
        b = end_state(in_a_row.uri, "conc", tmp_path / "view-b")
    finally:
        together.stop()
        in_a_row.stop()

    # One version per content, one run per artifact, one build run; nothing lost, nothing twice.
    assert a["versions"] == b["versions"] == [("conc-fp8", "1"), ("conc-gguf-Q8_0", "1")]
    assert a["artifact_runs"] == b["artifact_runs"] == [FP8, GGUF]
    assert a["aliases"] == b["aliases"] == {
        "conc-fp8": {"candidate": "1", "production": "1", "recommended-h100": "1"},
        "conc-gguf-Q8_0": {"candidate": "1", "recommended-cpu": "1", "recommended-l4": "1"},
    }
    # cpu-a and cpu-b have one content (uploaded once, or by both when they raced: merged twice, same result)
    assert {P.digest_of(n) for n in a["parts"]} == {P.digest_of(n) for n in b["parts"]} and len({P.digest_of(n) for n in a["parts"]}) == 3
    assert a["merged"] == b["merged"] and a["view"] == b["view"]
    view = a["view_report"]
    assert set(view.devices) == {"cpu", "l4", "h100"} and all(i.status == "done" for i in view.devices.values())
    assert view.artifact(FP8).gates.promotable and view.artifact(GGUF).gates.status == "failed"
    for v in a["version_facts"]:
        for part in ("tags", "run_metrics", "run_tags"):
            x, y = a["version_facts"][v][part], b["version_facts"][v][part]
            assert x == y, (v, part, {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)})
    assert a["version_facts"] == b["version_facts"]
    assert a["build_note"] == b["build_note"] and a["build_metrics"] == b["build_metrics"]
    assert a["build_tags"] == b["build_tags"] and a["build_params"] == b["build_params"]
    for name, path in written.items():
        local = read_report(tmp_path / "together" / name / "conc" / "report.json")
        assert {x.name: x.registry.version for x in local.artifacts} == {FP8: "1", GGUF: "1"}


# ------------------------------------------------------------------ faults
@pytest.mark.slow
def test_server_killed_mid_upload_leaves_nothing_half_registered(tmp_path, report, empty_db):
    srv = Server(tmp_path / "srv", empty_db)
    srv.start()
    try:
        # A GGUF made large enough (256 MiB of padding) that its upload takes a while.
        rep = rebuilt(variant(report, "crash"), tmp_path / "job", GGUF, "padded", extra_bytes=256 << 20)
        path = write(rep, tmp_path / "job")
        proc = subprocess.Popen([*QUANTFORGE, "register", str(path), "--tracking-uri", srv.uri, "--artifacts-dir", str(tmp_path / "job")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if f"{GGUF}: uploading" in line:
                srv.kill()
                break
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, "".join(seen) + out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: MLflow at {srv.uri} is unreachable"), err

        # What the dead server's store holds: fp8 registered completely, the GGUF not at all.
        db = f"sqlite:///{srv.dir / 'mlflow.db'}"
        c = client_for(db)
        assert [str(v.version) for v in c.search_model_versions("name = 'crash-fp8'")] == ["1"]
        assert c.search_model_versions(f"name = 'crash-{GGUF.replace('gguf-', 'gguf-')}'") == []
        for v in c.search_model_versions("name LIKE 'crash-%'"):
            # every version's files are all there, as built (the proxied store is srv.dir/artifacts)
            folder = srv.dir / "artifacts" / v.source.split("mlflow-artifacts:/", 1)[1]
            assert verify_folder(folder, json.loads((folder / MANIFEST).read_text())) == []
        orphans = [r for r in c.search_runs([c.get_experiment_by_name("crash").experiment_id]) if r.data.tags.get("quantforge.artifact") == GGUF]
        assert [r.info.status for r in orphans] == ["RUNNING"]  # the upload that never finished

        # The server comes back on the same store: the next register completes the job.
        srv.start()
        done = register_report(path, tracking_uri=srv.uri, log=quiet)
        c = client_for(srv.uri)
        g = done.artifact(GGUF)
        assert g.registry.version == "1" and "production" in g.registry.aliases
        v = c.get_model_version(g.registry.name, "1")
        folder = srv.dir / "artifacts" / v.source.split("mlflow-artifacts:/", 1)[1]
        assert verify_folder(folder, json.loads((folder / MANIFEST).read_text())) == []
        assert json.loads((folder / MANIFEST).read_text())["content_sha256"] == g.content_sha256
        # The abandoned run (its job's process is gone) was removed; one run per artifact remains.
        runs = c.search_runs([done.registry.experiment_id], filter_string="tags.`quantforge.role` = 'artifact'")
        assert sorted(r.data.tags["quantforge.artifact"] for r in runs) == [FP8, GGUF]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert done.artifact(FP8).registry.version == "1"
    finally:
        if srv.up():
            srv.stop()
