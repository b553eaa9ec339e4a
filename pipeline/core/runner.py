"""Run stages: each once per cache key, through the store's one run-once mechanism.

A stage whose key is in the store is a hit and does no work, except that a stored
artifact (a stage with ``artifact`` info: what eval and register check and users
ship) is used only while its files match its manifest: one altered since the build
is built again and replaces it, so "rebuild it" is what `quantforge build` does.
A failed stage leaves nothing in the store; stages that need it are skipped with
the reason, and independent stages still run. Build stages and eval stages run
here alike.

Where they run is the executor's business (:mod:`pipeline.executors`): this
process, one stage after another (the default), or a Ray cluster, each stage a task.
Both run a stage through :func:`run_stage`, so a stage behaves the same anywhere.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pipeline
from pipeline.core.stage import Stage, StageContext, StageOutput
from pipeline.core.store import Store, verify_folder
from pipeline.errors import InvalidInput, QuantforgeError

Log = Callable[[str], None]
REASON_CHARS = 300

#: -q: -1 (failures only), default 0 (one line per stage), -v: 1 (also each stage's own messages and its
#: libraries' output, which always go to the stage's log file). Set by the CLI (set_verbosity).
VERBOSITY = 0
_ACTIVE: list = []  # the capture of the stage running now (at most one)


def set_verbosity(level: int) -> None:
    global VERBOSITY
    VERBOSITY = level


class _Capture:
    """Everything written to file descriptors 1 and 2 while a stage runs goes to its log file (and, with -v, to
    the terminal too): print, tqdm bars, warnings, logging and loguru handlers (they hold the original
    sys.stdout/sys.stderr objects, which write to those descriptors), native libraries and child processes.

    A pipe and a reader thread rather than pointing the descriptors at the file: the thread can copy to
    the terminal as well (-v), and the log file stays one file written in order."""

    def __init__(self, log_file: Path, echo: bool):
        self.log_file, self.echo = log_file, echo
        self.terminal_fd: int | None = None

    def __enter__(self) -> "_Capture":
        import os
        import sys
        import threading

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self.saved = (os.dup(1), os.dup(2))
        self.terminal_fd = self.saved[0]
        read, write = os.pipe()
        self.sink = open(self.log_file, "ab")
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._rich_terminal()
        self._python_streams()

        def pump() -> None:
            while True:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                self.sink.write(chunk)
                self.sink.flush()
                if self.echo:
                    try:
                        os.write(self.saved[0], chunk)
                    except OSError:
                        pass
            os.close(read)

        self.thread = threading.Thread(target=pump, name="stage-log", daemon=True)
        self.thread.start()
        _ACTIVE.append(self)
        return self

    def _rich_terminal(self) -> None:
        """rich's global console (progress bars refresh from a thread) keeps drawing on the terminal."""
        import os

        self._rich = None
        try:
            import rich

            console = rich.get_console()
        except ImportError:  # pragma: no cover - rich is a CLI dependency
            return
        self._rich = (console, console._file)
        console.file = os.fdopen(os.dup(self.saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")

    def _python_streams(self) -> None:
        """sys.stdout/sys.stderr, and logging handlers holding them, into the pipe too: they may not be
        descriptors 1 and 2 (an embedding application, a test harness)."""
        import logging
        import os
        import sys

        self.py = (sys.stdout, sys.stderr)
        self.stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stdout = sys.stderr = self.stream
        self.handlers = []
        for logger in [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
            for h in logger.handlers:
                if type(h) is logging.StreamHandler and h.stream in self.py:
                    self.handlers.append((h, h.stream))
                    h.setStream(self.stream)

    def write_terminal(self, text: str) -> None:
        import os

        try:
            os.write(self.saved[0], text.encode("utf-8", "replace"))
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        import os
        import sys

        _ACTIVE.remove(self)
        for h, stream in self.handlers:
            h.setStream(stream)
        sys.stdout, sys.stderr = self.py
        for stream in (self.stream, *self.py):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self.stream.close()
        os.dup2(self.saved[0], 1)  # closes the pipe's write ends held by 1 and 2: the reader sees EOF
        os.dup2(self.saved[1], 2)
        # A child process the stage left running may still hold the pipe: do not wait for it forever.
        self.thread.join(timeout=10)
        if self._rich is not None:
            console, original = self._rich
            opened = console._file
            console._file = original
            try:
                opened.close()
            except OSError:
                pass
        for fd in self.saved:
            os.close(fd)
        self.sink.close()


@dataclass
class StageResult:
    stage: Stage
    key: str
    status: str  # hit | built | failed | skipped
    output: StageOutput | None = None
    reason: str | None = None
    seconds: float = 0.0
    log_file: Path | None = None
    # Where and when it ran (the report's stage records say it): the host and the executor's
    # node id (the host name locally, a Ray node id on a cluster), the process, wall-clock
    # start and end (epoch seconds).
    host: str | None = None
    node: str | None = None
    pid: int | None = None
    started: float | None = None
    ended: float | None = None


def stage_keys(stages: list[Stage]) -> dict[str, str]:
    """Every stage's cache key; keys chain through inputs, so order matters."""
    keys: dict[str, str] = {}
    for s in stages:
        keys[s.name] = s.key(keys)
    return keys


def stage_status(stages: list[Stage], artifacts_dir: Path, keys: dict[str, str]) -> list[tuple[Stage, str, str]]:
    """(stage, key, hit|miss|skip: reason) without running anything."""
    store = Store(artifacts_dir)
    rows = []
    for s in stages:
        if s.skip_reason:
            rows.append((s, keys[s.name], f"skip: {s.skip_reason}"))
        else:
            rows.append((s, keys[s.name], "hit" if store.get(s.kind, keys[s.name]) else "miss"))
    return rows


def execute(
    stages: list[Stage],
    artifacts_dir: Path,
    log: Log = print,
    keys: dict[str, str] | None = None,
    logs_dir: Path | None = None,
    progress: Callable[[StageResult], None] | None = None,
    inputs: dict[str, StageOutput] | None = None,
) -> dict[str, StageResult]:
    """Run `stages` in this process, stage after stage (the local executor); `inputs` are outputs of
    stages outside this list. :func:`pipeline.executors.execute` chooses between this and a cluster."""
    keys = keys or stage_keys(stages)
    store = Store(artifacts_dir)
    store.clean_stale_tmp()
    results: dict[str, StageResult] = {}
    for stage in stages:
        ready = resolve_inputs(stage, keys[stage.name], results, inputs or {})
        if isinstance(ready, StageResult):
            results[stage.name] = ready
        else:
            results[stage.name] = run_stage(stage, keys, ready, store, Path(artifacts_dir), log, logs_dir)
        if progress:
            progress(results[stage.name])
    return results


def resolve_inputs(stage: Stage, key: str, results: dict[str, StageResult],
                   outside: dict[str, StageOutput]) -> dict[str, StageOutput] | StageResult:
    """The outputs a stage reads, or the StageResult that skips it (skipped at plan time, or an
    input that did not complete: a failure fails only what depends on it)."""
    if stage.skip_reason:
        return StageResult(stage, key, "skipped", reason=stage.skip_reason)
    inputs: dict[str, StageOutput] = {}
    for local, upstream in stage.inputs.items():
        if upstream in outside:
            inputs[local] = outside[upstream]
            continue
        r = results.get(upstream)
        if r is None or r.output is None:
            why = r.reason if r else "not run"
            return StageResult(stage, key, "skipped", reason=f"needs {upstream}, which did not complete ({why})")
        inputs[local] = r.output
    return inputs


def run_stage(stage: Stage, keys: dict[str, str], inputs: dict[str, StageOutput], store: Store, artifacts_dir: Path,
              log: Log, logs_dir: Path | None, node: str | None = None) -> StageResult:
    """One stage through the store's run-once mechanism: a hit, built, or failed (never raises but
    for invalid input). The same code runs in this process and inside a Ray task."""
    started = time.time()
    where = {"host": socket.gethostname(), "node": node or socket.gethostname(), "pid": os.getpid(), "started": started}
    result = _run_stage(stage, keys, inputs, store, artifacts_dir, log, logs_dir)
    for k, v in where.items():
        setattr(result, k, v)
    result.ended = time.time()
    return result


def _run_stage(stage: Stage, keys, inputs: dict[str, StageOutput], store: Store, artifacts_dir: Path,
               log: Log, logs_dir: Path | None) -> StageResult:
    key = keys[stage.name]
    log_file = _log_file(stage, logs_dir)
    stage_log = _stage_logger(stage, log, log_file)
    start = time.perf_counter()
    seconds = 0.0

    def produce(tmp: Path) -> dict:
        nonlocal seconds
        if VERBOSITY > 0:
            log(f"[{stage.name}] running ({stage.description or stage.kind})")
        if log_file is not None:
            _append(log_file, f"[{stage.name}] {stage.description or stage.kind} (key {key})")
        ctx = StageContext(stage=stage, out_dir=tmp, inputs=inputs, log=stage_log, artifacts_dir=artifacts_dir, key=key)
        if log_file is None or not stage.run:
            facts = stage.run(ctx) if stage.run else {}
        else:
            with _Capture(log_file, echo=VERBOSITY > 0):
                facts = stage.run(ctx)
        seconds = time.perf_counter() - start
        return {
            "stage": stage.name,
            "version": stage.version,
            "params": stage.params,
            "inputs": {k: {"stage": v, "key": keys.get(v) or inputs[k].key} for k, v in stage.inputs.items()},
            "tools": stage.tools,
            "device_fingerprint": stage.device_fingerprint,
            "external_key": stage.external_key,
            "quantforge_version": pipeline.__version__,
            "seconds": round(seconds, 3),
            "result": facts or {},
        }

    altered: list[str] = []

    def intact(manifest: dict) -> bool:
        problems = verify_folder(store.path_for(stage.kind, key), manifest)
        if problems and not altered:  # run_once asks again under the lock: say it once
            altered.append(problems[0])
            log(f"[{stage.name}] the stored files changed since they were built ({'; '.join(problems[:3])}): building it again")
        return not problems

    try:
        entry = store.run_once(stage.kind, key, produce, accept=intact if stage.artifact is not None else None)
    except InvalidInput:
        raise
    except Exception as exc:
        seconds = time.perf_counter() - start
        full = str(exc) if isinstance(exc, QuantforgeError) else f"{type(exc).__name__}: {exc}"
        if disk_full(exc):
            full = f"the disk is full while writing under {store.root}: {full}. Free space (or point --artifacts-dir at a bigger disk) and run again; nothing was kept"
        stage_log(full)
        stage_log(traceback.format_exc())
        reason = short_reason(full, log_file)
        log(f"[{stage.name}] FAILED after {seconds:.1f}s: {reason}")
        return StageResult(stage, key, "failed", reason=reason, seconds=seconds, log_file=log_file)
    output = StageOutput(stage.name, key, entry.path, entry.manifest)
    if entry.hit:
        return StageResult(stage, key, "hit", output=output, log_file=log_file)
    if VERBOSITY >= 0:
        log(f"[{stage.name}] done in {seconds:.1f}s" + (f" (log: {log_file})" if log_file is not None else ""))
    return StageResult(stage, key, "built", output=output, seconds=seconds, log_file=log_file)


def disk_full(exc: BaseException) -> bool:
    """The disk (or a quota) ran out: an OSError with ENOSPC/EDQUOT anywhere in the chain, or a
    library's own error that only carries the OS message (safetensors raises
    ``SafetensorError: ... No space left on device (os error 28)``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def short_reason(message: str, log_file: Path | None = None) -> str:
    """What a table shows of a failure: its first meaningful line (never a backtrace) and where the rest is."""
    first = ""
    for line in message.strip().splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File \"", "#", "[")):
            first = line
            break
    first = first or message.strip().splitlines()[0] if message.strip() else "failed"
    if len(first) > REASON_CHARS:
        first = first[: REASON_CHARS - 3] + "..."
    more = len(message.strip().splitlines()) > 1 or len(message) > REASON_CHARS
    return first + (f" (full log: {log_file})" if log_file is not None and more else "")


def _log_file(stage: Stage, logs_dir: Path | None) -> Path | None:
    if logs_dir is None:
        return None
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a full disk (or a read-only one): the stage runs, its log goes to the console only
        return None
    return logs_dir / (stage.name.replace("/", "__") + ".log")


def _append(log_file: Path, msg: str) -> None:
    try:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(msg.rstrip() + "\n")
    except OSError:
        # The log shares the artifacts dir's disk: when it is full, the failure
        # must still reach the console and the report, not end in a traceback.
        pass


def _stage_logger(stage: Stage, log: Log, log_file: Path | None) -> Log:
    """A stage's own messages: into its log file; on the terminal only with -v (or when there is no log
    file), one line each. While the stage's output is captured, the file is appended to directly; the
    capture's pipe carries the libraries' output."""

    def emit(msg: str) -> None:
        if log_file is not None:
            _append(log_file, msg)
        if (log_file is None or VERBOSITY > 0) and "Traceback" not in msg and "\n" not in msg.strip():
            if _ACTIVE and not getattr(log, "captures_safe", False):
                # the terminal itself: `log` writes to stdout, which goes to this file now
                _ACTIVE[-1].write_terminal(f"[{stage.name}] {msg}\n")
            else:
                log(f"[{stage.name}] {msg}")

    return emit
