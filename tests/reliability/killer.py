"""Run the `quantforge` CLI in this process and SIGKILL it at a chosen point (fault injection).

    python tests/reliability/killer.py --at POINT [--stack FILE] -- build RECIPE --artifacts-dir DIR

POINT is one of

* ``rename:<kind>``: in :meth:`pipeline.core.store.Store.commit`, right before the
  temp folder of a ``<kind>`` stage (manifest already written) is renamed into place;
* ``report[:<text>]``: in :func:`pipeline.core.report.write_report`, right before a new
  report.json (written and fsynced to a temp file) replaces the old one, the first
  time the new one contains ``<text>`` (any new one without it);
* ``inside:<module prefix>``: as soon as the main thread is running code of a module
  whose name starts with the prefix (not its import), e.g. ``inside:llmcompressor.`` while
  llm-compressor quantizes; a sampling thread looks at the main thread's stack every
  millisecond, and writes the stack it killed in to ``--stack``.

Nothing in the product is changed for this: the patches live only in this process
(``pipeline.core.store.os`` is replaced by a proxy whose ``rename`` kills), so the
product needs no fault-injection hook. SIGKILL cannot be caught: no ``finally``, no
``except BaseException`` cleanup, no atexit handler runs, exactly as with the OOM
killer or a cancelled CI job.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def die(stack_file: str | None = None, frame=None) -> None:
    if stack_file:
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "".join(traceback.format_stack())
        Path(stack_file).write_text(stack)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_rename(kind: str, stack_file: str | None) -> None:
    import pipeline.core.store as store

    real = os

    class OsProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def rename(src, dst, *a, **kw):
            src_path = Path(src)
            if src_path.parent.name == ".tmp" and src_path.name.startswith(f"{kind}-") and (src_path / "manifest.json").is_file():
                die(stack_file)
            return real.rename(src, dst, *a, **kw)

    store.os = OsProxy("os")


def kill_before_report_replace(text: str, stack_file: str | None) -> None:
    import pipeline.core.report as report

    real = os

    class OsProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def replace(src, dst, *a, **kw):
            if Path(dst).name == "report.json" and text in Path(src).read_text():
                die(stack_file)
            return real.replace(src, dst, *a, **kw)

    report.os = OsProxy("os")


def kill_inside(prefix: str, stack_file: str | None) -> None:
    main = threading.main_thread().ident

    def inside(frame) -> bool:
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith(prefix) and frame.f_code.co_name != "<module>" and not _importing(frame):
                return True
            frame = frame.f_back
        return False

    def watch() -> None:
        while True:
            frame = sys._current_frames().get(main)
            if frame is not None and inside(frame):
                die(stack_file, frame)
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True, name="killer").start()


def _importing(frame) -> bool:
    """True while the frame runs under an import (module bodies of the library)."""
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            return True
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--at", required=True)
    ap.add_argument("--stack")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    where, _, what = ns.at.partition(":")
    if where == "rename":
        kill_before_rename(what, ns.stack)
    elif where == "report":
        kill_before_report_replace(what, ns.stack)
    elif where == "inside":
        kill_inside(what, ns.stack)
    else:
        raise SystemExit(f"unknown kill point {ns.at!r}")
    sys.path.insert(0, str(REPO))
    from pipeline.cli.main import app

    app(args=args, prog_name="quantforge")


if __name__ == "__main__":
    main()
