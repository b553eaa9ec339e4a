"""Shared by the fault-injection tests: run the real CLI in child processes, kill them,
and check what a user would rely on afterwards (the store, its temp folders, report.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.core.report import read_report, report_path
from pipeline.core.store import MANIFEST, Store, verify_folder

REPO = Path(__file__).resolve().parents[2]
KILLER = Path(__file__).with_name("killer.py")
NAME = "rel"

EVALS = "{devices: [cpu], max_windows: 2, context: 128, speed: {prompt_lengths: [32], decode_tokens: 4, warmup: 0, min_iterations: 1, min_seconds: 0}}"


def recipe_text(model: Path, targets: str = "fp8 gguf", name: str = NAME) -> str:
    rows = {
        "fp8": "  - {name: fp8, kind: fp8, scheme: dynamic}",
        "gguf": "  - {name: gguf, kind: gguf, quants: [Q8_0], pre_tokenizer: gpt-2}",
    }
    body = "\n".join(rows[t] for t in targets.split())
    return f"name: {name}\nsource: {{model: {model}, dtype: bfloat16}}\ntargets:\n{body}\nevals: {EVALS}\nregistry: {{model_name: {name}}}\n"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QUANTFORGE_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def cli(*args) -> list[str]:
    """The `quantforge` console script's command line (the module, when the script is not installed)."""
    script = Path(sys.executable).with_name("quantforge")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli.main"]
    return head + [str(a) for a in args]


def killer(at: str, stack: Path | None, *args) -> list[str]:
    return [sys.executable, str(KILLER), "--at", at] + (["--stack", str(stack)] if stack else []) + ["--"] + [str(a) for a in args]


def run(cmd: list[str], log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to completion in its own session, output to `log` (returned as .stdout too)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True)
    out.close()
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pgid: int, timeout: float = 120) -> None:
    """Wait for every process of a group (orphans of a killed parent included) to exit."""
    deadline = time.time() + timeout
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        raise AssertionError(f"processes of group {pgid} were still running after {timeout:.0f} s")


def wait_until(proc: subprocess.Popen, condition: Callable[[], object], log: Path, timeout: float = 300, poll: float = 0.005):
    """Poll `condition` until it returns something true (returned); fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the kill point:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(poll)
    kill_group(proc)
    raise AssertionError(f"kill point not reached within {timeout:.0f} s:\n" + log.read_text(errors="replace")[-3000:])


def tmp_folders(artifacts: Path, kind: str | None = None) -> list[Path]:
    root = Store(artifacts).root / ".tmp"
    if not root.is_dir():
        return []
    try:
        return sorted(p for p in root.iterdir() if kind is None or p.name.startswith(f"{kind}-"))
    except FileNotFoundError:
        return []


def files_in(folder: Path) -> list[str]:
    """File names in a folder that may be renamed or removed while we look ([] then)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


def entries(artifacts: Path, kind: str) -> list[Path]:
    folder = Store(artifacts).root / kind
    return sorted(folder.iterdir()) if folder.is_dir() else []


def check_store(artifacts: Path) -> dict[str, list[dict]]:
    """Every entry in the store is finished and intact, and no temp folder is left: kind -> manifests."""
    store = Store(artifacts)
    found: dict[str, list[dict]] = {}
    for kind_dir in sorted(p for p in store.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(kind_dir.iterdir()):
            manifest_file = entry / MANIFEST
            assert manifest_file.is_file(), f"{entry} is in the store without a manifest"
            manifest = json.loads(manifest_file.read_text())
            assert entry.name == manifest["key"][: len(entry.name)], f"{entry} holds the manifest of another key"
            assert store.verify(kind_dir.name, manifest["key"]) == [], f"{entry}: {store.verify(kind_dir.name, manifest['key'])}"
            assert verify_folder(entry, manifest) == []
            found.setdefault(kind_dir.name, []).append(manifest)
    left = tmp_folders(artifacts)
    assert not left, f"temp folders left in the store: {[p.name for p in left]}"
    return found


def check_report(artifacts: Path, name: str = NAME, evaluated: bool = False):
    """report.json agrees with the store: every artifact built, its folder, key and content are
    the stored entry's; with `evaluated`, every artifact and the source are measured on cpu."""
    report = read_report(report_path(artifacts, name))
    assert report is not None, "no report.json"
    assert report.artifacts, "the report lists no artifacts"
    for a in report.artifacts:
        assert a.status == "built", (a.name, a.status, a.reason)
        folder = Path(a.path)
        manifest = json.loads((folder / MANIFEST).read_text())
        assert folder.parent.parent == Store(artifacts).root, folder
        assert manifest["key"] == a.stage_key and manifest["content_sha256"] == a.content_sha256 and manifest["bytes"] == a.bytes
        assert verify_folder(folder, manifest) == []
        if evaluated:
            assert a.evals["cpu"].status == "done", (a.name, a.evals["cpu"].reason)
            assert a.evals["cpu"].metrics.perplexity and a.evals["cpu"].metrics.kl_mean is not None
    if evaluated:
        assert report.baseline["cpu"].status == "done"
    return report
