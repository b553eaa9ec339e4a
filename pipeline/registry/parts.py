"""Report parts on the build run: how several jobs share one report without losing each other's results.

MLflow has no compare-and-swap on artifacts: two jobs that read ``report.json``, merge
their results in and upload it again can overwrite each other. So no job rewrites a
shared file. Each registration uploads **its own part** — its report, less what is
local to its machine — to the build run under a name no other content can have::

    quantforge/reports/<updated>-<sha256 of the content>.json

and every reader (register, pull) merges **all** parts, in name order (oldest facts
first), with the one merge rule :func:`pipeline.core.report.merge_reports`. A part is
written once and never changed (same content, same name: a job that finds its digest
already there uploads nothing), so a reader that sees a set of names always computes
the same merged report; the digest in the name lets a reader check it did not read a
part while it was still being written (MLflow's artifact stores copy files in place).
Two jobs with the same content that upload at the same moment leave it twice, under
two times: merging the same facts twice changes nothing.

``quantforge/report.json`` on the build run is a *view*: the merged report, written by
each registration once it has merged every part it can see (see
:func:`pipeline.registry.register.register_report` for why the last writer writes the
complete one).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.core.report import Report, merge_reports, report_digest
from pipeline.registry.tracking import TAG_PREFIX, first_line, is_connection_error

PARTS_DIR = "quantforge/reports"
REPORT_ARTIFACT = "quantforge/report.json"  # the merged view on the build run
REPORT_TAG = f"{TAG_PREFIX}report_sha256"  # digest of that view (less timestamps)
#: facts about one machine's copy that pull writes into a local report; never uploaded
LOCAL_NOTES = ("pulled", "pull_reason", "pulled_from")
READ_ATTEMPTS = 6


class PartUnreadable(Exception):
    pass


def part_of(report: Report) -> Report:
    """The facts a job contributes: its report less registry state (derived from MLflow by
    whoever reads the parts) and less the notes pull writes about this machine's copy."""
    part = report.model_copy(deep=True)
    for a in part.artifacts:
        a.registry = None
        for note in LOCAL_NOTES:
            (a.model_extra or {}).pop(note, None)
    part.registry = type(part.registry)()
    return part


def _stamp(updated: str) -> str:
    return "".join(ch for ch in str(updated) if ch.isalnum()) or "0"


def part_name(part: Report) -> str:
    return f"{_stamp(part.updated)}-{report_digest(part)}.json"


def digest_of(name: str) -> str:
    return Path(name).stem.rsplit("-", 1)[-1]


def list_parts(client: Any, run_id: str) -> list[str]:
    """Names of the parts on a build run, in merge order."""
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, PARTS_DIR) if not f.is_dir and f.path.endswith(".json"))


def upload_part(client: Any, run_id: str, part: Report, present: list[str]) -> str | None:
    """Upload a part unless one with its content is there; returns the name uploaded (or None)."""
    name = part_name(part)
    if digest_of(name) in {digest_of(n) for n in present}:
        return None
    with tempfile.TemporaryDirectory(prefix="qf-part-") as tmp:
        f = Path(tmp) / name
        f.write_text(json.dumps(part.model_dump(mode="json"), indent=1, sort_keys=True, default=str))
        client.log_artifact(run_id, str(f), PARTS_DIR)
    return name


def read_part(client: Any, run_id: str, name: str) -> Report:
    """One part, checked against the digest in its name (re-read while another job is still writing it)."""
    from mlflow.exceptions import MlflowException

    problem = ""
    for attempt in range(READ_ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="qf-part-") as tmp:
            try:
                got = Path(client.download_artifacts(run_id, f"{PARTS_DIR}/{name}", tmp))
                part = Report.model_validate_json(got.read_text())
                if report_digest(part) == digest_of(name):
                    return part
                problem = "its content does not hash to its name"
            except (MlflowException, OSError, ValueError) as exc:
                if is_connection_error(exc):
                    raise
                problem = first_line(exc)
        time.sleep(0.2 * (attempt + 1))
    raise PartUnreadable(f"report part {PARTS_DIR}/{name} on run {run_id} is unreadable: {problem}")


class PartCache:
    """Parts read once per job: a part never changes after it is written."""

    def __init__(self, client: Any):
        self.client = client
        self.parts: dict[str, Report] = {}

    def get(self, run_id: str, name: str) -> Report:
        if name not in self.parts:
            self.parts[name] = read_part(self.client, run_id, name)
        return self.parts[name]


def merge_parts(parts: list[Report]) -> Report | None:
    """Every part merged, oldest first (the caller passes them in name order)."""
    merged: Report | None = None
    for p in parts:
        merged = merge_reports(merged, p)
    return merged


def merged_view(client: Any, run_id: str, read: Callable[[str], Report], log: Callable[[str], Any],
                who: str) -> tuple[list[str], Report | None]:
    """(the build run's part names, every readable part merged): the one view registration and pull
    both decide on. A part no reader can read is left out by all alike; without parts, the run's
    report.json view (a build run registered by quantforge 0.1); None when neither is readable."""
    names = list_parts(client, run_id)
    parts = []
    for n in names:
        try:
            parts.append(read(n))
        except PartUnreadable as exc:
            log(f"{who}: {exc}; left out of the merge")
    merged = merge_parts(parts)
    if merged is None:
        merged = read_view(client, run_id, log)
    return names, merged


def read_view(client: Any, run_id: str, log: Callable[[str], Any]) -> Report | None:
    """The build run's report.json view (what quantforge 0.1 wrote instead of parts), or None."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="qf-report-") as tmp:
        try:
            got = Path(client.download_artifacts(run_id, REPORT_ARTIFACT, tmp))
            return Report.model_validate_json(got.read_text())
        except (MlflowException, OSError, ValueError) as exc:
            if is_connection_error(exc):
                raise
            log(f"registry: run {run_id} has no readable {REPORT_ARTIFACT} ({first_line(exc)})")
            return None
