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
    """Called first by every child module: its start-up.

    * End this process when the job that started it dies (a job killed with SIGKILL cannot
      stop its children itself, which would run on, orphaned): Linux's PR_SET_PDEATHSIG, set
      by the child rather than through ``preexec_fn`` (which is unsafe in a parent running
      threads, as torch does); elsewhere a no-op.
    * Turn on :mod:`faulthandler`, so a native crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL)
      leaves the Python stack of every thread on stderr, which the parent logs.
    * The test hook :data:`ABORT_ENV`.
    """
    import faulthandler
    import signal

    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass
        else:
            if os.getppid() == 1:  # the parent died before the call above
                os._exit(1)
    _test_abort()


#: Test hook: a child whose command line contains this text aborts from native code at start-up,
#: as a native library does (glibc's heap check: a line on stderr, then ``abort()``), so tests can
#: see what a real native crash reports. Read here only; unset (the default) changes nothing.
ABORT_ENV = "QUANTFORGE_TEST_NATIVE_ABORT"
ABORT_LINE = "free(): invalid pointer"


def _test_abort() -> None:
    match = os.environ.get(ABORT_ENV)
    if not match or match not in " ".join(sys.argv):
        return
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stderr.flush()
    line = (ABORT_LINE + "\n").encode()
    libc.write(2, line, len(line))  # from C, unbuffered, as glibc writes it
    libc.abort()


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


#: What a signal usually means when it ends a quantforge child.
SIGNAL_MEANING = {
    "SIGABRT": "a native library aborted",
    "SIGSEGV": "a crash in native code",
    "SIGBUS": "a crash in native code",
    "SIGFPE": "a crash in native code",
    "SIGILL": "an instruction this CPU lacks",
    "SIGKILL": "killed from outside, often for lack of memory",
}


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        meaning = SIGNAL_MEANING.get(name)
        return f"killed by {name}" + (f" ({meaning})" if meaning else "")
    return f"exit {returncode}"


_PY_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failed|Refused|Unavailable|Missing)\b.*")
_NATIVE_ERROR = re.compile(r"(terminate called|what\(\):|Segmentation fault|Aborted|GGML_ASSERT|error:|out_of_range|std::|"
                           r"invalid pointer|double free|corrupted|free\(\)|malloc\(\)|CUDA error|illegal memory access)", re.I)
#: faulthandler's (and CPython's own) first line when the interpreter dies: "Fatal Python error: Aborted"
_FATAL = "Fatal Python error:"
#: what follows it: "Current thread 0x... (most recent call first):", stack frames, "Extension modules: ..."
_FAULTHANDLER = re.compile(r"^(Current thread|Thread 0x|Stack \(most recent|File \"|Extension modules:|<no Python frame>|Python runtime state)")


def first_error_line(text: str, returncode: int | None = None) -> str:
    """The line of a child's output that says what went wrong.

    For a process that a signal ended (``returncode`` < 0, or a "Fatal Python error" in the
    output): the native library's own message, which comes just before Python's "Fatal Python
    error: Aborted" (``free(): invalid pointer``, a GGML_ASSERT, a CUDA error); else the raised
    exception of a Python traceback (its last one), else the first native abort/assert line,
    else the last line.
    """
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith(_FATAL)), None)
    if fatal is not None or (returncode is not None and returncode < 0):
        before = lines[:fatal] if fatal is not None else lines
        native = [ln for ln in before if _NATIVE_ERROR.search(ln) and not ln.startswith("#") and not _FAULTHANDLER.match(ln)]
        if native:
            return native[-1]
        if fatal is not None:
            # nothing that looks native before it: the line just before, else Python's own
            plain = [ln for ln in before if not _FAULTHANDLER.match(ln) and not ln.startswith(("Traceback", "warn", "Warn"))]
            return plain[-1] if plain else lines[fatal]
    py = [ln for ln in lines if _PY_ERROR.match(ln)]
    if py:
        return py[-1]
    native = [ln for ln in lines if _NATIVE_ERROR.search(ln) and not ln.startswith("#")]
    if native:
        return native[0]
    return lines[-1] if lines else "no output"


def python_frame(text: str) -> str | None:
    """The innermost Python frame faulthandler printed for the crashing thread ('File "x.py", line 3 in f')."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith(("Current thread", "Thread 0x")) and "most recent call first" in ln:
            return next((f for f in lines[i + 1:] if f.startswith("File \"")), None)
    return None


def crash_report(what: str, returncode: int, output: str) -> str:
    """How a child ended, as a failure message: its first line says how it died and its most
    telling line; the next (when faulthandler left one) where in Python it was. A stage that
    raises it gets the path of its log added by the runner (pipeline.core.runner.short_reason)."""
    msg = f"{what} ended with {how_it_ended(returncode)}: {first_error_line(output, returncode)}"
    frame = python_frame(output)
    return msg + (f"\nin Python at {frame}" if frame else "")
