"""The one launcher for child processes, and the one protocol between quantforge and its Python children.

quantforge runs some work in a child process on purpose: a library that can crash
the interpreter (llama.cpp kernels), a check that must see a checkpoint as a fresh
process would (verification), and measurements whose memory must be their own
(eval workers). They all start here, so they all get the same environment (this
checkout on ``PYTHONPATH``, thread settings), the same timeout handling and the
same way of turning a crash into one readable line.

The protocol, for every Python child (eval workers, verifiers, converters, checks):

* The parent calls :func:`call` with a module and a JSON-able request. The request goes
  to a file, and the child runs as ``python -m MODULE --child REQUEST.json RESPONSE.json``.
* The child's ``main`` is :func:`serve` with a handler: request dict in, result dict out.
  It writes ``{"ok": true, "result": {...}}`` (exit 0), or for an exception of the handler
  ``{"ok": false, "error": {"type", "message", "trace"}}`` (exit 1; the traceback also goes
  to stderr). Whatever else the child prints (progress, library logs, native messages) is
  its log, never the channel: :func:`call` copies it to the parent's stderr, which in a
  stage is the stage's log.
* The parent returns the result, or raises :class:`ChildFailed`: with the child's error for
  a structured one; else (no answer, a non-zero exit, a signal, a timeout) with how the child
  ended and the most telling line of its output (:func:`crash_report`: for a native abort
  the library's own line). Either way a second line, where there is one, says where in
  Python it was, so the runner's one-line reason names the stage's log file.

External programs (llama.cpp's tools, nvidia-smi, trtllm-build, git) run through
:func:`run_tool`, which turns their failures into the same :class:`ChildFailed`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import StageFailed

REPO_ROOT = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
#: The child's command line: ``python -m MODULE --child REQUEST.json RESPONSE.json``.
CHILD_FLAG = "--child"
#: How much of a child's output :func:`call` copies into the parent's log (the end of it: where failures are).
ECHO_CHARS = 50_000


class ChildFailed(StageFailed):
    """A child process or external tool failed. The message says how (its first line: how it ended
    and the telling line); ``returncode``, ``output`` (what it printed) and ``error`` (the child's
    structured error, when it sent one) are there for callers that look closer (the converter)."""

    def __init__(self, message: str, *, returncode: int | None = None, output: str = "", error: dict | None = None):
        super().__init__(message)
        self.returncode = returncode
        self.output = output
        self.error = error


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


def _text(output: str | bytes | None) -> str:
    """A timed-out child's partial output: subprocess hands it over undecoded."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


def run_python(module: str, args: Sequence[object], *, timeout: float | None = None, env: Mapping[str, str] | None = None,
               threads: int | None = None, cwd: Path | None = None, merge_output: bool = False,
               what: str | None = None) -> subprocess.CompletedProcess:
    """``python -m module args...`` with output captured as text (stderr into stdout with
    ``merge_output``); a timeout becomes :class:`ChildFailed`."""
    cmd = python_command(module, args)
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                              text=True, errors="replace", timeout=timeout, env=child_env(env, threads), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"{what or f'`python -m {module}`'} did not finish within {timeout:.0f} s",
                          output=_text(exc.output) + _text(exc.stderr)) from None


# ------------------------------------------------------------------ the protocol: parent side
def call(module: str, request: Mapping[str, Any], *, what: str, timeout: float | None = None, threads: int | None = None,
         env: Mapping[str, str] | None = None, tag: str | None = None, workdir: Path | None = None) -> dict:
    """Run ``python -m module`` as a child (see the module docstring) on `request`; its result.

    `what` names the child in failure messages ("the llama_cpp worker"); `tag` names its request
    file ``.TAG.json`` (default: the module's last part), which is what :data:`ABORT_ENV` can match.
    The request and response files live in `workdir` (a stage's folder: what a killed run leaves
    is removed with it) or else in a temporary folder, and are removed when the child is done.
    Raises :class:`ChildFailed`."""
    import shutil

    name = tag or module.rpartition(".")[2]
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qf-child-"))
    req, resp = folder / f".{name}.json", folder / f".{name}.out.json"
    try:
        req.write_text(json.dumps(request, default=str), encoding="utf-8")
        try:
            proc = run_python(module, [CHILD_FLAG, req, resp], timeout=timeout, env=env, threads=threads, merge_output=True, what=what)
        except ChildFailed as exc:
            _echo(exc.output)
            raise
        _echo(proc.stdout)
        response = _read_response(resp)
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            req.unlink(missing_ok=True)
            resp.unlink(missing_ok=True)
    return answer(what, proc.returncode, proc.stdout, response)


def answer(what: str, returncode: int, output: str, response: dict | None) -> dict:
    """The result of a child that ended with `returncode` after printing `output` and writing
    `response` (None: it wrote none); else :class:`ChildFailed`. A structured error is what the
    child said went wrong; without one, how it ended says it. A result from a child that then
    crashed (at exit, say) is not trusted."""
    if response is not None and not response.get("ok"):
        error = response.get("error") or {}
        frame = _last_frame(error.get("trace", ""))
        msg = f"{what} failed: {error.get('type', 'Error')}: {error.get('message', '')}"
        raise ChildFailed(msg + (f"\nin Python at {frame}" if frame else ""), returncode=returncode, output=output, error=error)
    if response is not None and returncode == 0:
        return response.get("result") or {}
    if returncode == 0:
        raise ChildFailed(f"{what} ended with exit 0 without an answer: {first_error_line(output)}", returncode=0, output=output)
    raise ChildFailed(crash_report(what, returncode, output), returncode=returncode, output=output)


def _read_response(path: Path) -> dict | None:
    try:
        response = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or cut short by a crash while writing it
        return None
    return response if isinstance(response, dict) else None


def _echo(output: str) -> None:
    """The child's output into this process's stderr: in a stage, its log (the runner captures fd 2)."""
    if not output:
        return
    if len(output) > ECHO_CHARS:
        output = f"[... the first {len(output) - ECHO_CHARS} characters of the child's output left out]\n" + output[-ECHO_CHARS:]
    sys.stderr.write(output if output.endswith("\n") else output + "\n")
    sys.stderr.flush()


def _last_frame(trace: str) -> str | None:
    """The innermost 'File "x.py", line 3, in f' of a Python traceback."""
    frames = [ln.strip() for ln in (trace or "").splitlines() if ln.strip().startswith('File "')]
    return frames[-1] if frames else None


# ------------------------------------------------------------------- the protocol: child side
def serve(handler: Callable[[dict], Mapping[str, Any]], argv: Sequence[str] | None = None) -> int:
    """A child module's ``main``: :func:`die_with_parent`, then `handler` on the request, and the
    response written for :func:`call`. Returns the exit status (0 answered, 1 the handler raised,
    2 not started by :func:`call`). An exception is the handler's failure, sent back; ``sys.exit``
    in the handler (a library's way to give up) ends the process as it would anyway, and the
    parent reports the exit with the library's last words."""
    die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != CHILD_FLAG:
        print(f"usage: python -m MODULE {CHILD_FLAG} REQUEST.json RESPONSE.json (a child process: "
              "pipeline.core.proc.call starts it)", file=sys.stderr)
        return 2
    request, response = Path(argv[1]), Path(argv[2])
    try:
        result = dict(handler(json.loads(request.read_text(encoding="utf-8"))))
        text = json.dumps({"ok": True, "result": result}, default=str)
        status = 0
    except Exception as exc:  # noqa: BLE001 - every failure of the handler goes back to the parent
        trace = traceback.format_exc()
        sys.stderr.write(trace)  # the log keeps the whole traceback, as an uncaught exception would
        text = json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc), "trace": trace[-20000:]}})
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    response.write_text(text, encoding="utf-8")
    return status


# ------------------------------------------------------------------ start-up and crashes
def die_with_parent() -> None:
    """Called first by every child process (by :func:`serve`, or by a child module that serves otherwise): its start-up.

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


# ------------------------------------------------------------------------ external programs
def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


#: Run first in place of an external program: asks the kernel to end it with the process that
#: started it (PR_SET_PDEATHSIG survives exec for ordinary binaries), then becomes the program.
#: Python children do this themselves (die_with_parent); a compiled tool cannot, and
#: ``preexec_fn`` is unsafe in a parent running threads, as torch does.
LAUNCH_FAILED = "quantforge-launch: "  # the launcher's line when the program itself cannot start
_LAUNCHER = ("import ctypes, os, signal, sys\n"
             "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)\n"  # 1 = PR_SET_PDEATHSIG
             "os.getppid() == 1 and os._exit(1)\n"  # the parent died before the call above
             "try:\n"
             "    os.execvp(sys.argv[1], sys.argv[1:])\n"
             "except OSError as exc:\n"
             f"    sys.stderr.write('{LAUNCH_FAILED}' + str(exc) + '\\n')\n"
             "    os._exit(127)\n")


def _dying_with_us(cmd: list[str]) -> list[str]:
    return [sys.executable, "-S", "-c", _LAUNCHER, *cmd] if sys.platform.startswith("linux") else cmd


def run_tool(cmd: Sequence[object], *, what: str | None = None, timeout: float | None = None, cwd: Path | None = None,
             merge: bool = True) -> str:
    """Run an external program (llama.cpp's tools, nvidia-smi, trtllm-build, git); its output: stdout
    and stderr together in the order written, or with ``merge=False`` stdout alone (a program whose
    stdout is data, which a warning on stderr must not spoil).

    Its output is its result (llama-bench's JSON, nvidia-smi's CSV, a tool's log the caller keeps),
    so unlike :func:`call` nothing is copied to the log here. A program that cannot start, runs
    past `timeout`, exits non-zero or dies by a signal raises :class:`ChildFailed`: how it ended
    and its telling line, then its output's last lines."""
    cmd = [str(c) for c in cmd]
    what = what or Path(cmd[0]).name
    try:
        proc = subprocess.run(_dying_with_us(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                              text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.output) + _text(exc.stderr)
        raise ChildFailed(f"{what} did not finish within {timeout:.0f} s" + (f":\n{tail(output)}" if output.strip() else ""),
                          output=output) from None
    except OSError as exc:
        raise ChildFailed(f"{what} could not start: {exc}") from None
    if proc.returncode == 127 and LAUNCH_FAILED in (proc.stderr or proc.stdout or ""):
        why = (proc.stderr or proc.stdout).split(LAUNCH_FAILED, 1)[1].strip()
        raise ChildFailed(f"{what} could not start: {why}")
    if proc.returncode != 0:
        output = proc.stdout + (proc.stderr or "")
        raise ChildFailed(f"{what} ended with {how_it_ended(proc.returncode)}: {first_error_line(output, proc.returncode)}\n"
                          f"{tail(output)}", returncode=proc.returncode, output=output)
    return proc.stdout
