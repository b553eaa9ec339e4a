"""report.json names no machine's folders; store entries are readable like any other files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from pipeline.core.report import ArtifactReport, Report, SourceReport, StageRecord, read_report, report_path, write_report
from pipeline.core.store import Store


def _report(artifacts: Path) -> Report:
    store = artifacts.resolve() / "store"
    return Report(
        recipe="r", recipe_path="/elsewhere/recipes/r.yaml",
        source=SourceReport(model="builtin:x", path=str(store / "source" / "abc")),
        artifacts=[ArtifactReport(name="a", target="a", kind="gguf", status="built", path=str(store / "gguf" / "def")),
                   ArtifactReport(name="b", target="b", kind="fp8", status="failed", path="/outside/the/artifacts")],
        stages=[StageRecord(name="a", kind="gguf", status="failed", log=str(artifacts.resolve() / "r" / "logs" / "a.log"))],
    )


def test_paths_inside_the_artifacts_dir_are_stored_relative_and_read_absolute(tmp_path):
    artifacts = tmp_path / "artifacts"
    rpath = report_path(artifacts, "r")
    rpath.parent.mkdir(parents=True)
    write_report(rpath, _report(artifacts))
    raw = json.loads(rpath.read_text())
    assert raw["source"]["path"] == "store/source/abc"
    assert raw["artifacts"][0]["path"] == "store/gguf/def"
    assert raw["stages"][0]["log"] == "r/logs/a.log"
    assert raw["artifacts"][1]["path"] == "/outside/the/artifacts"  # not inside: kept as it is
    assert str(tmp_path) not in json.dumps(raw["source"]) + json.dumps(raw["artifacts"][0])
    # Moved elsewhere (another runner, a downloaded copy), the paths follow the artifacts dir.
    moved = tmp_path / "elsewhere" / "art"
    shutil.move(artifacts, moved)
    report = read_report(report_path(moved, "r"))
    assert report.source.path == str(moved.resolve() / "store" / "source" / "abc")
    assert report.artifacts[0].path == str(moved.resolve() / "store" / "gguf" / "def")
    assert report.stages[0].log == str(moved.resolve() / "r" / "logs" / "a.log")
    # Written again unchanged, the file is the same bytes.
    before = report_path(moved, "r").read_bytes()
    write_report(report_path(moved, "r"), report)
    assert report_path(moved, "r").read_bytes() == before


def test_store_entries_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        def produce(tmp: Path) -> dict:
            (tmp / "sub").mkdir()
            fd, name = tempfile.mkstemp(dir=tmp / "sub")  # 0600, as safetensors and others write
            os.write(fd, b"weights")
            os.close(fd)
            tool = tmp / "tool.sh"
            tool.write_text("#!/bin/sh\n")
            tool.chmod(0o700)
            return {}

        entry = Store(tmp_path / "artifacts").run_once("kind", "k" * 64, produce)
    finally:
        os.umask(mask)
    modes = {p.relative_to(entry.path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in entry.path.rglob("*")}
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o755
    assert modes["sub"] == 0o755 and modes["tool.sh"] == 0o755 and modes["manifest.json"] == 0o644
    assert [m for p, m in modes.items() if p.startswith("sub/")] == [0o644]
    assert Store(tmp_path / "artifacts").verify("kind", "k" * 64) == []
