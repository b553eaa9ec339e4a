"""report.json: the machine-readable result that CI jobs pass between them.

Written to ``<artifacts-dir>/<recipe name>/report.json`` by build, eval and
register; each merges its part into what is there, so a build job, eval jobs on
several devices and a register job converge on one report. Writes are atomic
(temp file + rename) under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_VERSION = 1


class Loose(BaseModel):
    # Reports are read back by later quantforge versions and other tools: keep unknown keys.
    model_config = ConfigDict(extra="allow")


class SourceReport(Loose):
    model: str
    revision: str = "main"
    commit: str | None = None
    fingerprint: str = ""
    dtype: str = "bfloat16"
    path: str | None = None
    config: dict[str, Any] = {}


class ArtifactReport(Loose):
    name: str
    target: str
    kind: str
    variant: str | None = None
    status: Literal["built", "skipped", "failed", "planned"] = "planned"
    reason: str | None = None
    path: str | None = None
    bytes: int | None = None
    content_sha256: str | None = None
    stage_key: str | None = None
    format: str = ""
    runtimes: list[str] = []
    bits: int | None = None
    group_size: int | str | None = None
    build_seconds: float | None = None
    #: device name -> {"runtime": ..., "fingerprint": ..., metrics...} or {"status": "pending"|"skipped", "reason": ...}
    evals: dict[str, dict[str, Any]] = {}
    gates: dict[str, Any] = {}
    registry: dict[str, Any] = {}


class StageRecord(Loose):
    name: str
    kind: str
    key: str | None = None
    status: Literal["hit", "built", "failed", "skipped"]
    seconds: float = 0.0
    reason: str | None = None
    target: str | None = None


class Report(Loose):
    report_version: int = REPORT_VERSION
    recipe: str
    recipe_path: str = ""
    recipe_sha256: str = ""
    #: the validated recipe (defaults filled in), so register can work from report.json alone
    recipe_config: dict[str, Any] = {}
    quantforge_version: str = ""
    git_commit: str | None = None
    tools: dict[str, str] = {}
    source: SourceReport | None = None
    #: device -> the source model's own evals on that device
    baseline: dict[str, dict[str, Any]] = {}
    #: device -> {"status": "done"|"pending", "fingerprint": {...}}
    devices: dict[str, dict[str, Any]] = {}
    artifacts: list[ArtifactReport] = []
    stages: list[StageRecord] = []
    registry: dict[str, Any] = {}
    updated: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def artifact(self, name: str) -> ArtifactReport | None:
        return next((a for a in self.artifacts if a.name == name), None)

    def upsert_artifact(self, entry: ArtifactReport) -> ArtifactReport:
        """Replace the build facts of an artifact, keeping evals/registry of the same content."""
        old = self.artifact(entry.name)
        if old is not None:
            if old.content_sha256 and old.content_sha256 == entry.content_sha256:
                entry.evals = {**old.evals, **entry.evals}
                entry.gates = entry.gates or old.gates
                entry.registry = entry.registry or old.registry
            self.artifacts[self.artifacts.index(old)] = entry
        else:
            self.artifacts.append(entry)
        return entry


def report_path(artifacts_dir: Path, recipe_name: str) -> Path:
    return Path(artifacts_dir) / recipe_name / "report.json"


def read_report(path: Path) -> Report | None:
    if not path.is_file():
        return None
    return Report.model_validate_json(path.read_text())


@contextlib.contextmanager
def updating(path: Path, recipe_name: str) -> Iterator[Report]:
    """Read-modify-write the report under a lock, so parallel jobs don't lose each other's parts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        report = read_report(path) or Report(recipe=recipe_name)
        yield report
        report.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_report(path, report)


def write_report(path: Path, report: Report) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=False, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
