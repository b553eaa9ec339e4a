"""A full disk fails a stage cleanly: exit 1, a message that says the disk is full (and the
space needed, where a stage checks before writing), nothing half-kept in the store,
nothing registered; with space again, the same command completes.

The artifacts dir lies on a real small filesystem: a tmpfs mounted for the test (root,
or passwordless sudo; skipped otherwise, with the reason)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.core.report import read_report, report_path
from tests.reliability.helpers import NAME, check_report, check_store, cli, entries, recipe_text, run, tmp_folders


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) mounts a tmpfs of that size at tmp_path/disk; remount(size) resizes it."""
    where = tmp_path / "disk"
    where.mkdir()
    owner = f",uid={os.getuid()},gid={os.getgid()}" if os.geteuid() else ""
    mounted = []

    def mount(size: str) -> Path:
        cmd = _sudo() + ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{owner}", "tmpfs", str(where)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a small tmpfs here ({exc}); a full disk needs a real small filesystem")
        if out.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root or passwordless sudo): {out.stderr.strip()[:200]}")
        mounted.append(where)
        return where

    def remount(size: str) -> None:
        subprocess.run(_sudo() + ["mount", "-o", f"remount,size={size}", str(where)], check=True, timeout=30)

    mount.remount = remount
    yield mount
    for w in mounted:
        subprocess.run(_sudo() + ["umount", "-l", str(w)], capture_output=True, timeout=60)


def _registered(db: Path) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_registered_models(), client.search_model_versions("")


@pytest.mark.slow
def test_full_disk_fails_cleanly_registers_nothing_and_recovers(small_disk, tmp_path, mini_model, empty_db):
    disk = small_disk("4m")  # the fp8 checkpoint is 5.5 MB, the converted GGUF 6.7 MB
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8 gguf"))
    artifacts = disk / "artifacts"

    built = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "build.log")
    out = built.stdout
    assert built.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # written while safetensors saved: the library's own error, named for what it is
    assert "[fp8/quantize] FAILED" in out and "the disk is full while writing under" in out and "No space left on device" in out
    # checked before writing: the space needed and the space free
    assert "[gguf/convert] FAILED" in out and "not enough disk space for the converted GGUF" in out
    assert "needed" in out and "free on" in out

    for kind in ("llmc-fp8", "gguf-convert", "gguf-quantize"):
        assert entries(artifacts, kind) == [], f"nothing of {kind} is kept"
    assert tmp_folders(artifacts) == [], "the failed stages' temp folders are removed"
    check_store(artifacts)  # what is there (the source's entry) is whole
    report = read_report(report_path(artifacts, NAME))
    status = {a.name: (a.status, a.reason or "") for a in report.artifacts}
    assert status["fp8"][0] == "failed" and "the disk is full" in status["fp8"][1]
    assert status["gguf-Q8_0"][0] in ("failed", "skipped") and "not enough disk space" in status["gguf-Q8_0"][1]

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_db, db)
    reg = run(cli("register", recipe, "--artifacts-dir", artifacts, "--tracking-uri", f"sqlite:///{db}"), tmp_path / "register.log")
    assert reg.returncode in (0, 1) and "Traceback" not in reg.stdout, reg.stdout[-3000:]
    models, versions = _registered(db)
    assert versions == [] and models == [], "a failed build registers no model and no version"

    # Free space: the same command completes, nothing of the failure in the way.
    small_disk.remount("64m")
    again = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "again.log")
    assert again.returncode == 0, again.stdout[-3000:]
    check_store(artifacts)
    check_report(artifacts)


def test_disk_full_before_the_build_ends_without_a_traceback(small_disk, tmp_path, mini_model):
    disk = small_disk("2m")
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8"))
    artifacts = disk / "artifacts"
    (artifacts / NAME).mkdir(parents=True)
    with open(disk / "filler", "wb") as f:  # someone else filled the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    built = run(cli("build", recipe, "--artifacts-dir", artifacts), tmp_path / "build.log")
    assert built.returncode == 1, built.stdout[-3000:]
    assert "disk is full" in built.stdout
    assert "Traceback" not in built.stdout, built.stdout[-3000:]
    assert not [p.name for p in (artifacts / NAME).iterdir() if p.name.startswith(".report-")], "no half-written report left"
    assert tmp_folders(artifacts) == []
