"""Registration's writes to MLflow, each safe against parallel jobs and a server that goes away
(see register.py, "Concurrency"): tags, metrics and params in batches, runs created, finished
and deleted, steps repeated after losing to a parallel job.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.core.report import ArtifactReport, Report
from pipeline.core.proc import pid_alive
from pipeline.errors import InvalidInput, RegistryUnavailable
from pipeline.registry.tracking import (
    MAX_BATCH_METRICS, MAX_BATCH_PARAMS_TAGS, MAX_PARAM_VALUE, TAG_PREFIX, first_line,
    is_connection_error, is_race, key, quote, retry_races, tag_value,
)


ARTIFACT_DIR = "artifact"  # the artifact run's folder that a model version's source points at
REF_FILE = "ARTIFACT_REF.json"
RECIPE_ARTIFACT = "quantforge/recipe.yaml"  # on the build run
JOB_TAG = f"{TAG_PREFIX}job"
LEASE_S = 3600.0
MAX_ROUNDS = 30
RACE_ATTEMPTS = 8  # looks again after losing to a parallel job, per step (each loss means that job made progress)


def model_name_for(recipe_config: dict, recipe_name: str, artifact: ArtifactReport) -> str:
    base = (recipe_config.get("registry") or {}).get("model_name") or recipe_name
    parts = [base, artifact.target] + ([artifact.variant] if artifact.variant else [])
    return "-".join(str(p) for p in parts)


def recipe_config(report: Report) -> dict:
    """The validated recipe as a dict: report.recipe_config, else re-read from report.recipe_path."""
    if report.recipe_config:
        return report.recipe_config
    if report.recipe_path and Path(report.recipe_path).is_file():
        from pipeline.validation import load_recipe

        return load_recipe(report.recipe_path, check_source=False).recipe.model_dump(mode="json")
    raise InvalidInput(f"report for {report.recipe!r} has no recipe_config and its recipe_path {report.recipe_path!r} is not readable")


def build_identity(report: Report) -> dict[str, str]:
    fp = (report.source.fingerprint if report.source else "") or "-"
    return {f"{TAG_PREFIX}role": "build", f"{TAG_PREFIX}recipe_sha256": report.recipe_sha256 or "-", f"{TAG_PREFIX}source_fingerprint": fp}


def artifact_identity(report: Report, a: ArtifactReport) -> dict[str, str]:
    b = build_identity(report)
    return {**b, f"{TAG_PREFIX}role": "artifact", f"{TAG_PREFIX}artifact": a.name, f"{TAG_PREFIX}content_sha256": a.content_sha256 or "-"}


def search_runs(client: Any, experiment_id: str, tags: dict[str, str]) -> list:
    """Active runs carrying every tag, oldest first (start_time, then run_id: one total order)."""
    filt = " and ".join(f"tags.`{k}` = {quote(v)}" for k, v in tags.items())
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filt, max_results=1000, page_token=token)
        runs += list(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def canonical_version(client: Any, name: str, content_sha256: str):
    """The lowest active version of a model with this content (None if there is none)."""
    found = client.search_model_versions(f"name = {quote(name)} and tags.content_sha256 = {quote(content_sha256)}")
    return min(found, key=lambda v: int(v.version)) if found else None


def _nan_equal(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


class Writes:
    """The primitive writes a registration makes (self.client, self.log, self.counts come from Registration)."""

    def unavailable(self, exc: BaseException) -> RegistryUnavailable:
        recipe = self.report.recipe_path or str(self.report_path)
        return RegistryUnavailable(
            f"MLflow at {self.uri} is unreachable ({first_line(exc)}). Nothing was lost: the results stay on disk in "
            f"{self.report_path}; start the server (or fix --tracking-uri / MLFLOW_TRACKING_URI) and run "
            f"`quantforge register {recipe}` again to register them."
        )

    # ------------------------------------------------------- primitives

    def _tags(self, run_id: str, have: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        todo = [RunTag(key(k), tag_value(v)) for k, v in tags.items() if have.get(key(k)) != tag_value(v)]
        for i in range(0, len(todo), MAX_BATCH_PARAMS_TAGS):
            self.client.log_batch(run_id, tags=todo[i: i + MAX_BATCH_PARAMS_TAGS])

    def _metrics(self, run_id: str, have: dict[str, float], metrics: dict[str, float], step: int) -> None:
        """Log only values that changed, at `step` (so a re-run adds no points, and the fullest merge is the latest)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        todo = [Metric(k, v, now, step) for k, v in metrics.items() if not _nan_equal(have.get(k), v)]
        for i in range(0, len(todo), MAX_BATCH_METRICS):
            self.client.log_batch(run_id, metrics=todo[i: i + MAX_BATCH_METRICS])
        self.counts["metrics_logged"] += len(todo)

    def _params(self, run, params: dict[str, str]) -> list[str]:
        """Log params not yet on the run (params are immutable in MLflow); return the keys truncated."""
        from mlflow.entities import Param

        truncated, todo = [], []
        for k, v in params.items():
            k = key(k)
            if len(v) > MAX_PARAM_VALUE:
                truncated.append(k)
                v = v[: MAX_PARAM_VALUE - 14] + "...[truncated]"
            if k not in run.data.params:
                todo.append(Param(k, v))
        for i in range(0, len(todo), MAX_BATCH_PARAMS_TAGS):
            retry_races(self.client.log_batch, run.info.run_id, params=todo[i: i + MAX_BATCH_PARAMS_TAGS])
        return truncated

    def _create_run(self, experiment_id: str, name: str, tags: dict[str, str]):
        run = self.client.create_run(experiment_id, tags={**tags, JOB_TAG: self.job}, run_name=name)
        self.mine.add(run.info.run_id)
        self.counts["runs_created"] += 1
        return run

    def _delete_run(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(run_id)
        except MlflowException as exc:
            if is_connection_error(exc):
                raise
            # already deleted by another job: the same outcome

    def _finish(self, run) -> None:
        from mlflow.exceptions import MlflowException

        if run.info.status != "FINISHED":
            try:
                self.client.set_terminated(run.info.run_id, "FINISHED")
            except MlflowException as exc:
                if is_connection_error(exc):
                    raise

    def _stale(self, run) -> bool:
        """Left by a registration that is over: it failed, or its process is gone, or its lease ran out."""
        if run.info.run_id in self.mine:
            return False
        if run.info.status in ("FAILED", "KILLED", "FINISHED"):
            return True
        host, _, rest = (run.data.tags.get(JOB_TAG) or "").partition(":")
        pid = rest.partition(":")[0]
        if host == self.host and pid.isdigit() and not pid_alive(int(pid)):
            return True
        return (time.time() * 1000 - (run.info.start_time or 0)) > self.lease_s * 1000

    # ------------------------------------------------------- experiment

    def racing(self, what: str, step: Callable[[], Any]) -> Any:
        """Run a step that looks at the registry and then writes to it, again from the look when a
        parallel job changed what it wrote to in between (see tracking.is_race): each step starts by
        reading what the registry holds, so a repeat adopts what the other job left."""
        for attempt in range(RACE_ATTEMPTS):
            try:
                return step()
            except Exception as exc:  # noqa: BLE001 - re-raised unless a parallel job caused it
                if not is_race(exc) or attempt == RACE_ATTEMPTS - 1:
                    raise
                self.counts["races"] += 1
                self.log(f"register: {what}: a parallel job changed the registry meanwhile ({first_line(exc)}); looking again")
                time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")
