"""External programs run through one function (pipeline.core.proc.run_tool), and end with the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.proc import ChildFailed, run_tool

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc/*/stat (the `children` file needs a kernel option)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tool_ends_with_the_job_that_started_it(tmp_path):
    """SIGKILL the job while a compiled program it started runs: the program ends too, instead of
    running on as an orphan (the job cannot stop it itself: SIGKILL gives it no chance)."""
    job = subprocess.Popen([sys.executable, "-c", "from pipeline.core.proc import run_tool; run_tool(['sleep', '120'])"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 30
        tool = []
        while time.time() < deadline and not tool:
            tool = [c for c in _children(job.pid) if _cmdline(c).startswith(b"sleep\0")]
            time.sleep(0.1)
        assert tool, "the tool did not start"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and _alive(tool[0]):
            time.sleep(0.1)
        assert not _alive(tool[0]), "the tool outlived the job that started it"
    finally:
        job.kill()


def test_a_tool_that_cannot_start_or_fails_says_so():
    assert run_tool(["echo", "hello"]).strip() == "hello"
    with pytest.raises(ChildFailed, match="no-such-program could not start: .*No such file"):
        run_tool(["no-such-program"])
    with pytest.raises(ChildFailed, match=r"sh ended with exit 3: broken here"):
        run_tool(["sh", "-c", "echo warming up; echo broken here >&2; exit 3"], what="sh")
    with pytest.raises(ChildFailed, match="killed by SIGABRT"):
        run_tool(["sh", "-c", "kill -ABRT $$"], what="sh")
