"""Calls into an object that lives in another process, over that process's stdin and stdout.

Why a pipe and not a shared process: some native libraries cannot share a process with
others (a CUDA build of llama.cpp aborts or segfaults beside pyarrow, pandas, numpy-first
or torch: seen on an H200). The library then lives in a child made for it, and whoever
needs it (lm-evaluation-harness, which imports datasets -> pandas -> pyarrow) calls it
through this pipe.

Protocol: one JSON object per line. A request is ``{"method": NAME, "args": [...]}``; the
answer is ``{"result": ...}`` or ``{"error": {"type": ..., "message": ...}}``, which the
caller raises as :class:`RemoteError`. The server's stdout is the channel: :func:`serve`
moves the process's own fd 1 to stderr first, so a library that prints cannot corrupt it.
Only methods the served object lists in ``remote_methods`` can be called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

from pipeline.core.proc import ChildFailed


class RemoteError(ChildFailed):
    """A call failed in the server process (its exception), or the server died (how, and its last lines):
    the one failure type of child processes (:mod:`pipeline.core.proc`), for a child that answers many calls."""


def serve(obj: Any) -> int:
    """Answer calls on stdin/stdout until stdin closes or ``close`` is called; returns an exit code."""
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # from now on anything printed to stdout (native or Python) goes to stderr
    sys.stdout = sys.stderr
    allowed = set(getattr(obj, "remote_methods", ())) | {"close"}
    for line in sys.stdin:
        if not line.strip():
            continue
        method = None
        try:
            req = json.loads(line)
            method = req["method"]
            if method not in allowed:
                raise AttributeError(f"{type(obj).__name__} has no remote method {method!r}")
            result = getattr(obj, method)(*req.get("args", []))
            reply = {"result": result}
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        channel.write(json.dumps(reply) + "\n")
        if method == "close":
            break
    channel.flush()
    return 0


class Client:
    """The caller's end: starts ``python -m MODULE ARGS`` and calls methods of the object it serves."""

    def __init__(self, module: str, args: Sequence[object], *, env: dict | None = None, stderr=None,
                 what: str = "the server process"):
        from pipeline.core.proc import child_env, python_command

        self.what = what
        self._stderr_path = getattr(stderr, "name", None)
        self.proc = subprocess.Popen(python_command(module, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr, text=True, encoding="utf-8", bufsize=1, env=child_env(env))

    def call(self, method: str, *args: Any) -> Any:
        if self.proc.poll() is not None:
            raise self._died()
        try:
            self.proc.stdin.write(json.dumps({"method": method, "args": list(args)}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            raise self._died()
        reply = json.loads(line)
        if "error" in reply:
            e = reply["error"]
            raise RemoteError(f"{self.what}: {e['type']}: {e['message']}")
        return reply["result"]

    def _died(self) -> RemoteError:
        from pipeline.core.proc import first_error_line, how_it_ended

        code = self.proc.poll()
        tail = ""
        if self._stderr_path and os.path.isfile(self._stderr_path):
            with open(self._stderr_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-20000:]
        where = f" (its log: {self._stderr_path})" if self._stderr_path else ""
        return RemoteError(f"{self.what} ended with {how_it_ended(code if code is not None else 0)}: "
                           f"{first_error_line(tail)}{where}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close")
            except RemoteError:
                pass
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
