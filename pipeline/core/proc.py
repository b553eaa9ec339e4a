"""The one launcher for Python child processes.

quantforge runs some work in a child process on purpose: a library that can crash
the interpreter (llama.cpp kernels), a check that must see a checkpoint as a fresh
process would (verification), and measurements whose memory must be their own
(eval workers). They all start here, so they all get the same environment (this
checkout on ``PYTHONPATH``, thread settings), the same timeout handling and the
same way of turning a crash into one readable line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.errors import StageFailed

REPO_ROOT = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def child_env(extra: Mapping[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """This process's environment, with the checkout importable and optional thread caps."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        for var in THREAD_VARS:
            env[var] = str(threads)
    env.update(extra or {})
    return env


def python_command(module: str, args: Sequence[object]) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_python(module: str, args: Sequence[object], *, timeout: float | None = None, env: Mapping[str, str] | None = None,
               threads: int | None = None, cwd: Path | None = None, merge_output: bool = False) -> subprocess.CompletedProcess:
    """``python -m module args...`` with output captured as text (stderr into stdout with
    ``merge_output``); a timeout becomes StageFailed."""
    cmd = python_command(module, args)
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                              text=True, errors="replace", timeout=timeout, env=child_env(env, threads), cwd=cwd)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"`python -m {module}` did not finish within {timeout:.0f} s") from None


def die_with_parent() -> None:
    """Called first by every child module: end this process when the job that started it dies
    (a job killed with SIGKILL cannot stop its children itself, which would run on, orphaned).

    Linux's PR_SET_PDEATHSIG, set by the child rather than through ``preexec_fn`` (which is
    unsafe in a parent running threads, as torch does); elsewhere a no-op.
    """
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that id exists (a lock's owner, say)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit {returncode}"


_PY_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failed|Refused|Unavailable|Missing)\b.*")
_NATIVE_ERROR = re.compile(r"(terminate called|what\(\):|Segmentation fault|Aborted|GGML_ASSERT|error:|out_of_range|std::)", re.I)


def first_error_line(text: str) -> str:
    """The line of a child's output that says what went wrong: the raised exception of a
    Python traceback (its last one), else the first native abort/assert line, else the last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    py = [ln for ln in lines if _PY_ERROR.match(ln)]
    if py:
        return py[-1]
    native = [ln for ln in lines if _NATIVE_ERROR.search(ln) and not ln.startswith("#")]
    if native:
        return native[0]
    return lines[-1] if lines else "no output"
