"""`quantforge run --executor ray` end to end, on a local Ray cluster of 2 CPUs and a small trained
model (not the demo recipe: that takes ~11 min locally; two targets of the kinds the demo has
are what the overlap needs): the same report as the local executor's, the two targets built at
once by different workers, registration after it; and a worker SIGKILLed in the middle of a
stage, which Ray runs again, leaving nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from pipeline.core.report import read_report, report_path
from tests.reliability.helpers import check_report, check_store, cli, kill_group, recipe_text, run, start, tmp_folders

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

NAME = "rel"
EXECUTION = "execution: {workers: 2}\n"  # the local cluster's CPUs; ignored by the local executor


def _keys(value, path="") -> set[str]:
    """Every key path of a JSON document (list items share their parent's path)."""
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(f"{path}.{k}")
            out |= _keys(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            out |= _keys(v, path + "[]")
    return out


def _interval(report, stage: str):
    record = next(s for s in report.stages if s.name == stage)
    return record.started, record.ended, record.pid, record.node


def test_run_on_ray_matches_the_local_run(tmp_path, mini_model):
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8 gguf") + EXECUTION)
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = run(cli("run", recipe, "--artifacts-dir", local_dir, "--tracking-uri", f"sqlite:///{tmp_path / 'local.db'}"),
                tmp_path / "local.log")
    assert local.returncode == 0, local.stdout[-3000:]
    on_ray = run(cli("run", recipe, "--artifacts-dir", ray_dir, "--executor", "ray",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'ray.db'}"), tmp_path / "ray.log")
    assert on_ray.returncode == 0, on_ray.stdout[-3000:]
    assert "[ray] started a local Ray cluster: 1 node(s), 2 CPU(s)" in on_ray.stdout
    assert "[fp8/quantize] started on " in on_ray.stdout and "[gguf/convert] started on " in on_ray.stdout

    check_store(ray_dir)
    mine = check_report(ray_dir, evaluated=True)
    theirs = check_report(local_dir, evaluated=True)
    raw = {d: json.loads(report_path(d, NAME).read_text()) for d in (local_dir, ray_dir)}
    assert _keys(raw[ray_dir]) == _keys(raw[local_dir]), _keys(raw[ray_dir]) ^ _keys(raw[local_dir])
    # Every kind here is deterministic: the same bytes whichever executor (and worker) built them.
    assert {a.name: a.content_sha256 for a in mine.artifacts} == {a.name: a.content_sha256 for a in theirs.artifacts}
    assert {s.name: s.key for s in mine.stages} == {s.name: s.key for s in theirs.stages}
    assert [a.registry.version for a in mine.artifacts] == ["1", "1"], "registered as after a local run"

    fp8, gguf = _interval(mine, "fp8/quantize"), _interval(mine, "gguf/convert")
    assert fp8[0] < gguf[1] and gguf[0] < fp8[1], f"the two targets ran at the same time: fp8 {fp8[:2]}, gguf {gguf[:2]}"
    assert fp8[2] != gguf[2], "in two different worker processes"
    assert fp8[3] == gguf[3] and fp8[3] != os.uname().nodename, "of the one Ray node (its id, not a host name)"
    locally = {s.name: s for s in theirs.stages}
    assert {locally[n].pid for n in ("fp8/quantize", "gguf/convert")} == {locally["source"].pid}, "the local run: one process"


def test_worker_killed_mid_stage_is_retried_and_leaves_nothing_half_written(tmp_path, mini_model):
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8") + EXECUTION)
    artifacts = (tmp_path / "artifacts").resolve()
    log = tmp_path / "build.log"
    proc = start(cli("build", recipe, "--artifacts-dir", artifacts, "--executor", "ray"), log)
    try:
        deadline = time.time() + 300
        victim = None
        while victim is None and time.time() < deadline and proc.poll() is None:
            # The fp8 stage's temp folder is named after the worker process writing it.
            for folder in tmp_folders(artifacts, "llmc-fp8"):
                victim = int(folder.name.rsplit("-", 2)[-2])
            time.sleep(0.05)
        assert victim is not None, "the fp8 stage never started:\n" + log.read_text()[-3000:]
        assert victim != proc.pid, "a Ray worker builds it, not the driver"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        kill_group(proc)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "[fp8/quantize] started again (its worker was lost: Ray retried it)" in output, output[-3000:]
    stored = check_store(artifacts)  # every entry intact, and the killed worker's temp folder is gone
    assert len(stored["llmc-fp8"]) == 1
    report = check_report(artifacts)
    record = next(s for s in report.stages if s.name == "fp8/quantize")
    assert record.status == "built" and record.pid != victim
    assert read_report(report_path(artifacts, NAME)).artifacts[0].status == "built"
