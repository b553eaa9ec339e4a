"""The store and runner: stable keys, atomic outputs, no half-written artifacts, safe concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.core.runner import execute, stage_keys
from pipeline.core.stage import Stage
from pipeline.core.store import MANIFEST, Store

REPO = Path(__file__).resolve().parents[2]


def writer(text: str):
    def run(ctx):
        (ctx.out_dir / "out.txt").write_text(text + "".join((o.path / "out.txt").read_text() for o in ctx.inputs.values()))
        return {"chars": len(text)}

    return run


def chain(a_param="x", b_param="y"):
    a = Stage(name="a", kind="test-a", version="1", params={"p": a_param}, run=writer(a_param))
    b = Stage(name="b", kind="test-b", version="1", params={"p": b_param}, inputs={"up": "a"}, run=writer(b_param))
    return [a, b]


def test_keys_are_stable_and_chain():
    k1, k2 = stage_keys(chain()), stage_keys(chain())
    assert k1 == k2
    changed_up = stage_keys(chain(a_param="z"))
    assert changed_up["a"] != k1["a"] and changed_up["b"] != k1["b"], "a changed input changes downstream keys"
    changed_down = stage_keys(chain(b_param="z"))
    assert changed_down["a"] == k1["a"] and changed_down["b"] != k1["b"]


def test_version_tools_and_device_enter_the_key():
    base = Stage(name="s", kind="k", version="1", params={}, run=None)
    keys = {base.key({})}
    for change in ({"version": "2"}, {"tools": {"lib": "2.0"}}, {"device_fingerprint": "gpu-abc"}, {"external_key": "f00"}):
        keys.add(Stage(**{**base.__dict__, **change}).key({}))
    assert len(keys) == 5


def test_second_run_is_all_hits_and_outputs_have_manifests(tmp_path):
    first = execute(chain(), tmp_path, log=lambda m: None)
    assert [r.status for r in first.values()] == ["built", "built"]
    out = first["b"].output
    assert (out.path / "out.txt").read_text() == "yx"
    manifest = json.loads((out.path / MANIFEST).read_text())
    assert manifest["files"][0]["path"] == "out.txt" and len(manifest["files"][0]["sha256"]) == 64
    assert manifest["inputs"]["up"]["key"] == first["a"].key
    assert manifest["result"] == {"chars": 1}
    second = execute(chain(), tmp_path, log=lambda m: None)
    assert [r.status for r in second.values()] == ["hit", "hit"]
    assert Store(tmp_path).verify("test-b", first["b"].key) == []


def test_failed_stage_leaves_nothing_and_skips_dependents(tmp_path):
    def boom(ctx):
        (ctx.out_dir / "partial.bin").write_bytes(b"half")
        raise RuntimeError("quantizer exploded")

    a = Stage(name="a", kind="test-a", version="1", params={}, run=boom)
    b = Stage(name="b", kind="test-b", version="1", params={}, inputs={"up": "a"}, run=writer("b"))
    c = Stage(name="c", kind="test-c", version="1", params={}, run=writer("c"))
    results = execute([a, b, c], tmp_path, log=lambda m: None)
    assert results["a"].status == "failed" and "quantizer exploded" in results["a"].reason
    assert results["b"].status == "skipped" and "needs a" in results["b"].reason
    assert results["c"].status == "built"
    assert not list((tmp_path / "store").glob("test-a/*"))
    assert not list((tmp_path / "store" / ".tmp").iterdir())


def test_planned_skip_is_reported_not_run(tmp_path):
    s = Stage(name="engine", kind="engine", version="1", params={}, run=writer("never"), skip_reason="needs tensorrt-llm 1.x on a GPU")
    r = execute([s], tmp_path, log=lambda m: None)["engine"]
    assert r.status == "skipped" and r.reason == "needs tensorrt-llm 1.x on a GPU"
    assert not (tmp_path / "store" / "engine").exists()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.core.runner import execute
    from pipeline.core.stage import Stage

    def slow(ctx):
        (ctx.out_dir / "big.bin").write_bytes(b"x" * 1000)
        Path(sys.argv[2]).open("a").write("run\\n")
        time.sleep(float(sys.argv[3]))
        (ctx.out_dir / "done.txt").write_text("ok")

    s = Stage(name="slow", kind="test-slow", version="1", params={}, run=slow)
    r = execute([s], Path(sys.argv[1]), log=lambda m: None)["slow"]
    print(r.status)
    """
)


def _child(tmp_path: Path, sleep: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "art"), str(tmp_path / "runs.log"), str(sleep)], stdout=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists()


def test_killed_build_leaves_no_artifact_and_is_redone(tmp_path):
    proc = _child(tmp_path, sleep=30)
    _wait_for(tmp_path / "runs.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "art")
    assert not list(store.root.glob("test-slow/*")), "a killed build must not leave an output"
    assert list((store.root / ".tmp").iterdir()), "its temp folder is what remains"
    redo = _child(tmp_path, sleep=0)
    assert redo.communicate(timeout=120)[0].strip() == "built"
    assert not list((store.root / ".tmp").iterdir()), "the next run removes the dead build's temp folder"
    (out,) = store.root.glob("test-slow/*")
    assert (out / "done.txt").read_text() == "ok" and (out / MANIFEST).is_file()


def test_concurrent_builds_of_one_stage_run_it_once(tmp_path):
    procs = [_child(tmp_path, sleep=2) for _ in range(2)]
    statuses = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert statuses == ["built", "hit"]
    assert (tmp_path / "runs.log").read_text().count("run") == 1


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path):
    """One digest per file and state: read again only after a write, even one that puts the
    modification time back (the tamper check must still see it)."""
    import os

    from pipeline.core.store import HASHED, sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    before = dict(HASHED)
    first = sha256_file(f)
    assert sha256_file(f) == first
    assert HASHED["files"] - before["files"] == 1 and HASHED["cached"] - before["cached"] == 1
    st = os.stat(f)
    f.write_bytes(b"b" * 4096)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same modification time
    assert sha256_file(f) != first
    assert HASHED["files"] - before["files"] == 2
