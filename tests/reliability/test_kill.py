"""A build or an eval killed with SIGKILL, then run again: the rerun completes, every stored
entry matches its manifest, no temp folder is left, and report.json agrees with the store.

Real `quantforge` processes on a real (small, trained) model. The kill points:

* inside a library call: while llm-compressor quantizes (a sampling thread in the
  process sees llm-compressor's modifier code on the main thread's stack and kills);
* while writing: the stage's temp folder holds files but no manifest yet (polled from
  outside; the whole process group is killed, as a cancelled CI job or the OOM killer
  of a container would);
* just before the rename: the manifest is written and fsynced, the folder complete,
  only ``os.rename`` into the store is missing (deterministic, see killer.py);
* the parent alone, while its converter child writes the GGUF: the child ends with it, and
  the rerun removes the temp folder it was writing;
* while an altered artifact is being replaced (between moving the old folder aside and
  renaming the new one in);
* for the eval job: before its source result is stored, while an artifact's eval worker
  runs, before an artifact's result is stored, and right before report.json is replaced.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from pipeline.core.report import read_report, report_path
from pipeline.core.store import MANIFEST
from tests.reliability.helpers import (
    NAME, check_report, check_store, cli, entries, files_in, group_alive, kill_group, killer, recipe_text, run, start,
    tmp_folders, wait_gone, wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(tmp_path, mini_model):
    def make(targets: str):
        recipe = tmp_path / "rel.yaml"
        recipe.write_text(recipe_text(mini_model, targets))
        return recipe, (tmp_path / "artifacts").resolve()

    return make


def _files_without_manifest(artifacts, kind):
    for folder in tmp_folders(artifacts, kind):
        files = files_in(folder)
        if files and MANIFEST not in files:
            return files
    return None


def _rerun_build(recipe, artifacts, tmp_path, killed_stage: str):
    rerun = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    stored = check_store(artifacts)
    report = check_report(artifacts)
    stages = {s.name: s.status for s in report.stages}
    assert stages[killed_stage] == "built", stages
    assert set(stages.values()) <= {"built", "hit"}, stages
    return stored


def test_build_killed_inside_llm_compressor(setup, tmp_path):
    recipe, artifacts = setup("fp8")
    stack = tmp_path / "stack.txt"
    killed = run(killer("inside:llmcompressor.modifiers", stack, "build", recipe, "--artifacts-dir", artifacts), tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "llmcompressor/modifiers" in stack.read_text(), "killed while llm-compressor quantized"
    assert entries(artifacts, "llmc-fp8") == [], "nothing of the killed stage is in the store"
    assert tmp_folders(artifacts, "llmc-fp8"), "its temp folder is what remains until the next run"
    assert read_report(report_path(artifacts, NAME)) is None, "a build killed midway has written no report"
    stored = _rerun_build(recipe, artifacts, tmp_path, "fp8/quantize")
    assert len(stored["llmc-fp8"]) == 1


def test_build_killed_while_writing(setup, tmp_path):
    recipe, artifacts = setup("fp8")
    log = tmp_path / "killed.log"
    proc = start(cli("build", recipe, "--artifacts-dir", artifacts), log)
    files = wait_until(proc, lambda: _files_without_manifest(artifacts, "llmc-fp8"), log)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert entries(artifacts, "llmc-fp8") == []
    (left,) = tmp_folders(artifacts, "llmc-fp8")
    assert not (left / MANIFEST).exists() and files
    _rerun_build(recipe, artifacts, tmp_path, "fp8/quantize")


def test_build_killed_just_before_the_rename(setup, tmp_path):
    recipe, artifacts = setup("gguf")
    killed = run(killer("rename:gguf-quantize", tmp_path / "stack.txt", "build", recipe, "--artifacts-dir", artifacts), tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "commit" in (tmp_path / "stack.txt").read_text()
    (left,) = tmp_folders(artifacts, "gguf-quantize")
    assert (left / MANIFEST).is_file() and (left / "tiny-llama-mini-Q8_0.gguf").is_file(), "complete, manifest written, not renamed"
    assert entries(artifacts, "gguf-quantize") == [], "a folder outside the store is never taken as finished"
    plan = run(cli("plan", recipe, "--artifacts-dir", artifacts), tmp_path / "plan.log")
    assert plan.returncode == 0 and "miss" in plan.stdout, plan.stdout[-2000:]
    stored = _rerun_build(recipe, artifacts, tmp_path, "gguf/quantize/Q8_0")
    assert {"gguf-convert", "gguf-quantize"} <= set(stored)


def test_build_killed_while_replacing_an_altered_artifact(setup, tmp_path):
    """An artifact altered after its build is built again and replaces the stored one:
    killed between moving the old folder aside and renaming the new one into place, the
    key names no folder at all (never a half-replaced one), and the rerun completes."""
    recipe, artifacts = setup("fp8")
    assert run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "build.log").returncode == 0
    (entry,) = entries(artifacts, "llmc-fp8")
    (entry / "config.json").write_text((entry / "config.json").read_text().replace('"', "'", 1))
    killed = run(killer("rename:llmc-fp8", tmp_path / "stack.txt", "build", recipe, "--artifacts-dir", artifacts), tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "the stored files changed since they were built" in killed.stdout
    assert entries(artifacts, "llmc-fp8") == [], "the altered folder was moved aside, the new one not yet in place"
    left = {p.name.split("-")[0] for p in tmp_folders(artifacts)}
    assert left == {"llmc", "replaced"}, left
    _rerun_build(recipe, artifacts, tmp_path, "fp8/quantize")


def test_build_killed_alone_while_its_converter_child_writes(setup, tmp_path):
    """Only the build process is killed; the llama.cpp converter it started ends with it (it
    asked the kernel for that, PR_SET_PDEATHSIG) instead of writing on as an orphan, and the
    rerun removes the temp folder it was writing."""
    recipe, artifacts = setup("gguf")
    log = tmp_path / "killed.log"
    proc = start(cli("build", recipe, "--artifacts-dir", artifacts), log)
    wait_until(proc, lambda: any((f / "base.gguf").is_file() for f in tmp_folders(artifacts, "gguf-convert")), log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        wait_gone(proc.pid, timeout=10)  # the converter (same process group) is gone too
        _rerun_build(recipe, artifacts, tmp_path, "gguf/convert")
        check_store(artifacts)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_eval_killed_at_each_point_then_rerun(setup, tmp_path):
    recipe, artifacts = setup("fp8 gguf")
    built = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "build.log")
    assert built.returncode == 0, built.stdout[-3000:]

    def report_now() -> dict:
        data = json.loads(report_path(artifacts, NAME).read_text())  # whole JSON: never half-written
        data.pop("updated")
        return data

    before = report_now()

    def evaluate(at: str | None, step: str):
        args = ("eval", recipe, "--artifacts-dir", artifacts)
        if at:
            return run(killer(at, None, *args), tmp_path / f"{step}.log")
        log = tmp_path / f"{step}.log"
        proc = start(cli(*args), log)
        # an artifact's eval worker (a child process) is running: its job file is in the temp folder
        wait_until(proc, lambda: any(n.endswith("-job.json") for f in tmp_folders(artifacts, "eval-artifact") for n in files_in(f)), log)
        kill_group(proc)
        return proc

    # 1. the source's eval finished, its result not yet in the store
    assert evaluate("rename:eval-source", "kill1").returncode == -signal.SIGKILL
    assert entries(artifacts, "eval-source") == [] and tmp_folders(artifacts, "eval-source")
    # 2. while the first artifact's eval worker runs
    assert evaluate(None, "kill2").returncode == -signal.SIGKILL
    assert len(entries(artifacts, "eval-source")) == 1, "the rerun stored the source's eval"
    assert not tmp_folders(artifacts, "eval-source"), "and removed the dead run's temp folder"
    assert entries(artifacts, "eval-artifact") == []
    # 3. an artifact's eval finished, its result not yet in the store
    assert evaluate("rename:eval-artifact", "kill3").returncode == -signal.SIGKILL
    assert entries(artifacts, "eval-artifact") == []
    # 4. every eval stored, killed right before report.json with the results replaces the build's
    assert evaluate("report:suite_fingerprint", "kill4").returncode == -signal.SIGKILL
    assert len(entries(artifacts, "eval-artifact")) == 2
    assert report_now() == before, "report.json is still the build's"
    check_report(artifacts)  # still consistent with the store

    final = run(cli("eval", recipe, "--artifacts-dir", artifacts), tmp_path / "final.log")
    assert final.returncode == 0, final.stdout[-3000:]
    assert "] done in" not in final.stdout, "every eval stage was stored before the last kill: all hits now"
    check_store(artifacts)
    report = check_report(artifacts, evaluated=True)
    assert {a.name for a in report.artifacts} == {"fp8", "gguf-Q8_0"}
    assert json.loads(report_path(artifacts, NAME).read_text())["artifacts"][0]["evals"]["cpu"]["status"] == "done"
