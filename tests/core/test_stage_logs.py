"""Each stage's output goes to its log file; the terminal shows one line per stage (-v: everything, -q: failures).

Run in a child process, as the CLI runs: its stdout and stderr are the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r'''
import json, logging, os, subprocess, sys, warnings
from pathlib import Path
from pipeline.core import runner
from pipeline.core.stage import Stage

def noisy(ctx):
    from loguru import logger
    from tqdm import tqdm
    print("print to stdout")
    os.write(2, b"native write to fd 2\n")
    logging.getLogger("some.library").warning("a logging warning")
    logger.info("a loguru line")
    warnings.warn("a python warning", UserWarning)
    for _ in tqdm(range(3), desc="a tqdm bar"):
        pass
    subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"], check=True)
    ctx.log("the stage's own message")
    (ctx.out_dir / "x").write_text("x")

def failing(ctx):
    print("what the library said before failing")
    raise RuntimeError("boom")

logging.basicConfig(level=logging.INFO)  # a root handler on sys.stderr, as libraries set one up
tmp = Path(sys.argv[1])
runner.set_verbosity(int(sys.argv[2]))
stages = [Stage(name=n, kind=f"test-{n}", version="1", params={}, run=f) for n, f in (("noisy", noisy), ("bad", failing))]
results = runner.execute(stages, tmp / "a", log=lambda m: print("LOG " + m, flush=True), logs_dir=tmp / "logs")
print("after the stages")
print("RESULT " + json.dumps({n: r.status for n, r in results.items()}))
'''


@pytest.mark.parametrize("level", [-1, 0, 1])
def test_library_output_goes_to_the_stage_log(tmp_path, level):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(level)], capture_output=True, text=True, env=env, timeout=120)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    text = (tmp_path / "logs" / "noisy.log").read_text()
    for want in ("print to stdout", "native write to fd 2", "a logging warning", "a loguru line", "a python warning",
                 "a tqdm bar", "child stdout", "child stderr", "the stage's own message"):
        assert want in text, (want, text)
    bad = (tmp_path / "logs" / "bad.log").read_text()
    assert "what the library said before failing" in bad and "RuntimeError: boom" in bad
    assert json.loads(proc.stdout.split("RESULT ")[1]) == {"noisy": "built", "bad": "failed"}
    assert "after the stages" in proc.stdout  # the terminal is back after the stages
    for library_line in ("print to stdout", "a loguru line", "child stdout", "a logging warning", "a tqdm bar"):
        assert (library_line in terminal) == (level > 0), (library_line, terminal)
    runner_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOG [noisy]")]
    assert len(runner_lines) == {-1: 0, 0: 1, 1: 2}[level], terminal  # -v adds "running"
    assert "LOG [bad] FAILED" in proc.stdout and "boom" in proc.stdout  # failures show even with -q
