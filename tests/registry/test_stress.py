"""Eight `quantforge register` jobs at once against one real `mlflow server`, round after round,
with random pauses before each registry call (the test hook ``QUANTFORGE_TEST_REGISTRY_DELAY_S``,
read by :func:`pipeline.registry.tracking.client`; every call still goes to the real server).

The jobs are CI's eval jobs of one build: three on cpu (retries of one job: the same content),
two on l4, three on h100 (where the GGUF misses its gate). On a quiet machine such jobs rarely
interleave; the pauses make them overlap at every step (create, describe, tag, alias), so
versions are created in parallel and removed as duplicates while their creators still work
on them. Every job must exit 0 without a traceback, and the registry must end as one job
would leave it: one version per content, one run per artifact, one build run, the aliases
the merged results ask for.

Rounds: ``QUANTFORGE_STRESS_ROUNDS`` (default 2: a few minutes on 2 cores);
benchmarks/results/registry-stress/ records a 20-round run.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.report import read_report
from pipeline.registry import parts as P
from pipeline.registry.tracking import DELAY_ENV
from tests.registry.conftest import QUANTFORGE, REPO, Server, client_for
from tests.registry.reports import FP8, GGUF, evaluated_on, variant, write

pytestmark = pytest.mark.slow

JOBS = {f"cpu-{i}": "cpu" for i in (1, 2, 3)} | {f"l4-{i}": "l4" for i in (1, 2)} | {f"h100-{i}": "h100" for i in (1, 2, 3)}
DELAY_S = "0.25"  # up to 0.25 s before each registry call, one call in ten up to 2.5 s
START_SPREAD_S = 15.0
EXPECTED_ALIASES = {
    FP8: {"candidate": "1", "production": "1", "recommended-h100": "1"},
    GGUF: {"candidate": "1", "recommended-cpu": "1", "recommended-l4": "1"},
}


def rounds() -> int:
    return int(os.environ.get("QUANTFORGE_STRESS_ROUNDS", "2"))


def one_round(srv: Server, report, root: Path, name: str) -> dict:
    """Eight jobs of recipe `name` at once; checks the registry they leave; returns what the races did."""
    # fp8 (5.5 MB) over 4 MB: registered by reference; the GGUF (3.6 MB) uploaded and verified.
    base = variant(report, name, devices=["cpu", "l4", "h100"], registry={"upload_max_mb": 4.0})
    paths = {}
    for job, device in JOBS.items():
        rep = evaluated_on(base, device, {GGUF: {"delta_ppl_pct": 9.0}} if device == "h100" else None)
        paths[job] = write(rep, root / job)
    env = {**os.environ, DELAY_ENV: DELAY_S, "PYTHONPATH": str(REPO)}
    # Staggered starts, as CI's jobs (and their retries) start: a late job finds a version
    # already there and removes the duplicates of jobs that are still working on theirs.
    starts = sorted(random.uniform(0.0, START_SPREAD_S) for _ in JOBS)
    t0 = time.monotonic()
    procs = {}
    for (job, path), at in zip(paths.items(), starts):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        procs[job] = subprocess.Popen([*QUANTFORGE, "register", str(path), "--tracking-uri", srv.uri, "--artifacts-dir", str(path.parent.parent)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    outs = {job: p.communicate(timeout=900) for job, p in procs.items()}
    seconds = time.monotonic() - t0
    for job, p in procs.items():
        out, err = outs[job]
        assert p.returncode == 0, f"{name}/{job} exit {p.returncode}:\n{out[-4000:]}\n{err[-4000:]}"
        assert "Traceback" not in err and "Traceback" not in out, f"{name}/{job}:\n{err[-4000:]}"

    c = client_for(srv.uri)
    exp = c.get_experiment_by_name(name)
    models = {m.name: m for m in c.search_registered_models(f"tags.recipe = '{name}'")}
    assert sorted(models) == [f"{name}-{FP8}", f"{name}-{GGUF}"]
    for art, want in EXPECTED_ALIASES.items():
        model = f"{name}-{art}"
        assert [str(v.version) for v in c.search_model_versions(f"name = '{model}'")] == ["1"], model
        assert {k: str(v) for k, v in models[model].aliases.items()} == want, model
        v = c.get_model_version(model, "1")
        assert v.description and f"models:/{model}/1" in v.description  # described from the merged results
        assert v.tags["gate.passed"] == ("true" if art == FP8 else "false")
    builds = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'build'")
    arts = c.search_runs([exp.experiment_id], filter_string="tags.`quantforge.role` = 'artifact'")
    assert len(builds) == 1, [r.info.run_id for r in builds]
    assert sorted(r.data.tags["quantforge.artifact"] for r in arts) == [FP8, GGUF]
    assert all(r.info.status == "FINISHED" for r in [*builds, *arts])
    # Every job's results are in the merge (three contents: cpu, l4, h100), and every local report
    # records the surviving versions.
    merged = P.merge_parts([P.read_part(c, builds[0].info.run_id, n) for n in P.list_parts(c, builds[0].info.run_id)])
    assert all(merged.devices[d].status == "done" for d in ("cpu", "l4", "h100"))
    for job, path in paths.items():
        local = read_report(path)
        assert {a.name: a.registry.version for a in local.artifacts} == {FP8: "1", GGUF: "1"}, job
    said = Counter()
    said["versions created"] = sum(len(re.findall(r": created \S+ version \d+", out)) for out, _ in outs.values())
    for out, _ in outs.values():
        said["duplicate versions adopted"] += out.count("adopted it and removed the duplicate")
        said["build runs folded"] += out.count("folded into it")
        said["races looked at again"] += out.count("looking again")
    return {"seconds": round(seconds, 1), **said}


def test_eight_concurrent_registrations_never_fail_a_job(report, tmp_path, empty_db):
    srv = Server(tmp_path / "mlflow", empty_db)
    srv.start()
    try:
        for i in range(rounds()):
            said = one_round(srv, report, tmp_path / f"round{i}", f"stress{i}")
            print(f"round {i + 1}/{rounds()}: 8 jobs ok, {said}")
    finally:
        srv.stop()
