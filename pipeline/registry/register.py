"""The registration job: report.json -> MLflow runs, metrics, verified uploads, model versions, aliases.

It works from ``report.json`` alone plus the artifact folders it points at, so a CI
job on any machine can register what build and eval jobs left on disk.

What it writes, for a report of recipe ``demo``::

    experiment "demo"            tag mlflow.experimentKind=custom_model_development (the UI's training view)
      build run   one per build (tags quantforge.role=build, recipe_sha256, source_fingerprint):
                  params = the flattened recipe; metrics "<device>.<metric>" = the source model;
                  description = the per-device results table; artifacts: quantforge/reports/<part>.json
                  (one per registration, see parts.py), quantforge/report.json (their merge), plots
        artifact run   one per artifact and content, nested under the build run: metrics
                  "<device>.<metric>" (the same keys on every artifact run), artifact/ (the files,
                  or a reference above registry.upload_max_mb), quantforge/report_excerpt.json
    registered model "<model_name>-<target>[-<variant>]"
      version     one per distinct content (tag content_sha256), source = <artifact run>/artifact;
                  description = download and serve commands and the measured table
      aliases     see promotion.py: candidate, production, recommended-<device>

Order per artifact: check the files against their manifest -> upload to the artifact run
-> download them back and compare every sha256 with the manifest -> create the version.
A mismatch creates no version, so the registry never points at missing or different files.

**Concurrency** (any number of registrations of one recipe against one server at once,
and crashes at any point). Nothing relies on a lock or on a read-modify-write of a
shared object; each step relies on something MLflow's SQL store guarantees:

* *Versions*: a version number is allocated as max+1 inside the insert's transaction and
  retried on a unique-key conflict (``SqlAlchemyStore.create_model_version``,
  mlflow/store/model_registry/sqlalchemy_store.py:1044-1096), and the max (:1050) counts deleted
  versions, so numbers are never reused and a version created later has a higher number.
  Its ``content_sha256`` tag is written in the same transaction. So "the lowest version
  with this content" is one well-defined version that never changes once visible: each
  job creates its version only after its verified upload, then searches, keeps the lowest
  and deletes any other (a complete duplicate: safe to delete by anyone).
* *Registered models and the experiment*: ``create_registered_model`` and
  ``create_experiment`` turn the unique-name conflict into RESOURCE_ALREADY_EXISTS
  (sqlalchemy_store.py:421 and store/tracking/sqlalchemy_store.py:644): create, and on
  that error use the one that exists.
* *Runs* have no unique key (``create_run`` draws a uuid4, store/tracking/
  sqlalchemy_store.py:1052). The build run is the one with the lowest (start_time,
  run_id) among active runs carrying the build's identity tags; a job that created
  another one moves every report part on it to that run and deletes it. A job only
  creates a build run after finding none, and re-checks before it finishes, so the
  racers converge on one. An artifact run is the run of the artifact's canonical version;
  a job whose own run lost deletes it; runs left by a job that died (RUNNING with a dead
  pid on this host, or older than ``QUANTFORGE_REGISTER_LEASE_S``, default an hour) or
  that failed are deleted by the next registration of that artifact.
* *Upserts* (aliases, version tags, params) that race on a unique key come back as
  BAD_REQUEST ``UNIQUE constraint failed`` (``session.merge`` at
  model_registry/sqlalchemy_store.py:1468 and :1530; store/db/utils.py:186-188; the client does not
  retry 4xx): :func:`pipeline.registry.tracking.retry_races` repeats them. Run tags are
  retried by MLflow itself (store/tracking/sqlalchemy_store.py:2258-2275).
* *Writes after a look*: a job looks (searches, lists), then writes (creates, describes, tags,
  sets aliases); between the two a parallel job may have deleted what it writes to as a
  duplicate (its version, its artifact run, its build run). MLflow then answers
  RESOURCE_DOES_NOT_EXIST, or INVALID_PARAMETER_VALUE for a deleted run
  (:func:`pipeline.registry.tracking.is_race`), and the job repeats the step from the look,
  which finds and adopts what survived. A new version is created with its tags in the insert
  and nothing else is written to it before that look, so a job never fails because its own
  version was removed as a duplicate. ``QUANTFORGE_TEST_REGISTRY_DELAY_S`` (a test hook, in
  tracking.py) pauses at random before each call, so a test can make jobs interleave.
* *The report*: no job rewrites a shared report. Each uploads its own part once, named by
  its content's digest (parts.py); everything registered about the build (gates,
  recommendations, metrics, tags, descriptions, aliases, the report.json view) is then
  derived from the merge of **all** parts. After applying it, a job lists the parts
  again and repeats until the list (and the build run) did not change. Any part uploaded
  after a job's last listing belongs to a job that applies after it, so the last job to
  apply has seen every part and the end state is the merge of all of them, whatever the
  order. Metrics are logged at step = the number of parts merged, so the fullest merge
  is MLflow's latest value whatever the clocks of the machines.

Limits, by design: ``production`` only ever moves forward (a build that fails leaves it
where it was), so where it ends can depend on which partial views were applied when two
registrations carry *different contents* of one artifact; for the same content (CI's eval
jobs of one build) it cannot. Parts are ordered by their report's ``updated`` time (1 s
resolution): two jobs that measured the same device of the same content within one
second disagree by digest order, the same for every reader.

Registering an unchanged report again creates no runs, uploads, versions or metric points.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.core.report import ArtifactReport, RegistryEntry, RegistryInfo, Report, read_report, updating
from pipeline.core.proc import pid_alive
from pipeline.core.store import MANIFEST, sha256_file, verify_folder
from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.registry import cards, parts as P, promotion
from pipeline.registry.tracking import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MAX_BATCH_METRICS, MAX_BATCH_PARAMS_TAGS, MAX_PARAM_VALUE,
    TAG_PREFIX, check_reachable, client as make_client, first_line, flatten, is_connection_error, is_race, key, local_artifact_root,
    quiet, quote, retry_races, tag_value, tracking_uri_for, ui_hint,
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


class Registration:
    """One registration of one report; holds the client and what it has done."""

    def __init__(self, report_path: Path, report: Report, tracking_uri: str, log: Callable[[str], Any]):
        from pipeline.recipe import Recipe

        self.report_path = report_path
        self.report = report
        self.uri = tracking_uri
        self.log = log
        self.config = recipe_config(report)
        try:
            self.recipe = Recipe.model_validate(self.config)
        except ValueError as exc:
            raise InvalidInput(f"{report_path}: its recipe_config is not a recipe this quantforge reads "
                               f"({first_line(exc)}); register it with the quantforge version that built it, or build it again") from None
        self.spec = self.recipe.registry
        if self.spec.promotion_alias == promotion.CHAMPION_ALIAS:
            raise InvalidInput(f"{report.recipe_path or report_path}: registry.promotion_alias: {promotion.CHAMPION_ALIAS!r} is kept for "
                               "people to promote by hand (quantforge never moves it); use another name, e.g. 'production'")
        self.user_tags = {key(k): str(v) for k, v in self.spec.tags.items()}
        self.client = make_client(tracking_uri)
        self.host = socket.gethostname()
        self.job = f"{self.host}:{os.getpid()}:{int(time.time() * 1000)}"
        self.lease_s = float(os.environ.get("QUANTFORGE_REGISTER_LEASE_S", LEASE_S))
        self.counts = {"runs_created": 0, "uploads": 0, "versions_created": 0, "duplicates_removed": 0, "metrics_logged": 0, "parts_uploaded": 0,
                       "races": 0}
        self.failures: list[str] = []
        self.mine: set[str] = set()  # runs this job created
        self.parts = P.PartCache(self.client)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.merged: Report | None = None
        self.entries: dict[str, RegistryEntry] = {}

    # ------------------------------------------------------------ errors
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
    def experiment(self) -> str:
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        name = self.report.recipe
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            root = local_artifact_root(self.uri)
            location = (root / name).resolve().as_uri() if root is not None else None
            try:
                eid = self.client.create_experiment(name, artifact_location=location,
                                                    tags={f"{TAG_PREFIX}recipe": name, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                self.log(f"register: created experiment {name!r}")
                return eid
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a parallel job made it
                    raise
            exp = self.client.get_experiment_by_name(name)
        if exp.lifecycle_stage == LifecycleStage.DELETED:
            self.client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            retry_races(self.client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    # -------------------------------------------------------- build run
    def build_run(self, experiment_id: str, create: bool):
        """The canonical build run (created if there is none and `create`); other runs of the
        same build are folded into it (their report parts moved) and deleted."""
        ident = build_identity(self.report)
        runs = search_runs(self.client, experiment_id, ident)
        if not runs:
            if not create:
                return None
            r = self.report
            run = self._create_run(experiment_id, f"{r.recipe}-{(r.recipe_sha256 or 'nosha')[:8]}", ident)
            self.log(f"register: created build run {run.info.run_id}")
            runs = search_runs(self.client, experiment_id, ident) or [run]
        canonical = runs[0]
        for other in runs[1:]:
            self._fold(canonical, other)
        return canonical

    def _fold(self, canonical, other) -> None:
        """Move another build run's report parts onto the canonical one, then delete it."""
        present = set(P.list_parts(self.client, canonical.info.run_id))
        for name in P.list_parts(self.client, other.info.run_id):
            if name in present:
                continue
            part = self.parts.get(other.info.run_id, name)
            P.upload_part(self.client, canonical.info.run_id, part, sorted(present))
            present.add(name)
        self._delete_run(other.info.run_id)
        self.log(f"register: build run {other.info.run_id} duplicated {canonical.info.run_id} (created at the same time by another job): folded into it")

    # ------------------------------------------------------- one artifact
    def register_artifact(self, experiment_id: str, a: ArtifactReport, folder: Path) -> None:
        """Registered model, verified upload and version for one artifact of this report (once per content)."""
        name = model_name_for(self.config, self.report.recipe, a)
        manifest = json.loads((folder / MANIFEST).read_text())
        self.registered_model(name, a)
        mv = canonical_version(self.client, name, a.content_sha256)
        if mv is None:
            problems = verify_folder(folder, manifest, a.content_sha256)  # set: run() registers only artifacts with one
            if problems:
                raise StageFailed(f"{a.name}: the files in {folder} changed since the build: " + "; ".join(problems[:5])
                                  + "; nothing was uploaded and no model version was created (build it again)")
            run = self._create_run(experiment_id, a.name, artifact_identity(self.report, a))
            self._params(run, flatten({"target": a.target, "kind": a.kind, "variant": a.variant, "format": a.format,
                                       "bits": a.bits, "group_size": a.group_size, "runtimes": a.runtimes}))
            try:
                referenced = self.upload(run, a, folder)
                self.verify(run, a, folder, manifest, referenced)
            except StageFailed:
                self.client.set_terminated(run.info.run_id, "FAILED")
                raise
            mine = self.create_version(name, a, run, manifest, referenced)
            mv = canonical_version(self.client, name, a.content_sha256)
            if mv is None:  # deleted by a person meanwhile: ours is it
                mv = mine
            if str(mv.version) != str(mine.version):
                # Another job registered the same content first: its version is the one.
                self._remove_version(name, mine.version)
                self._delete_run(run.info.run_id)
                self.log(f"register: {a.name}: {name} v{mv.version} has this content (registered at the same time by another job); "
                         f"adopted it and removed the duplicate v{mine.version}")
        # Remove duplicates of the canonical version left by jobs that stopped between creating and removing them.
        for v in self.client.search_model_versions(f"name = {quote(name)} and tags.content_sha256 = {quote(a.content_sha256)}"):
            if int(v.version) > int(mv.version):
                self._remove_version(name, v.version)
        run = self.artifact_run(experiment_id, a, mv, create=True)
        self._cleanup_runs(experiment_id, a, keep=run.info.run_id if run else None)
        if run is not None:
            self._finish(run)

    def registered_model(self, name: str, a: ArtifactReport) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        src = self.report.source
        tags = {"recipe": self.report.recipe, "target": a.target, "kind": a.kind, "variant": a.variant or "-",
                "source_model": src.model if src else "-", **self.user_tags}
        desc = (f"{a.kind} artifact '{a.target}'" + (f" ({a.variant})" if a.variant else "")
                + f" of {src.model if src else 'the source model'}, built by quantforge recipe '{self.report.recipe}'. "
                "Versions: one per distinct content; each version's description says how to download and serve it.")
        try:
            self.client.create_registered_model(name, tags=tags, description=desc)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a parallel job made it
                raise

    def create_version(self, name: str, a: ArtifactReport, run, manifest: dict, referenced: bool):
        gguf = next((row["path"] for row in manifest.get("files", []) if row["path"].endswith(".gguf")), None)
        tags = {"content_sha256": a.content_sha256, "artifact": a.name, "files": str(len(manifest.get("files", [])))}
        if gguf:
            tags["gguf_file"] = gguf
        if referenced:
            tags["artifact_ref"] = run.data.tags.get(f"{TAG_PREFIX}artifact_ref") or "files not uploaded"
        # Tags go in with the insert (one transaction); the description comes from the merge of all
        # parts in apply(). Nothing is written to the version after the create here: a parallel job
        # may delete it as the duplicate of its own at any moment (the caller adopts that one).
        mv = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id, tags=tags,
                                              await_creation_for=None)
        self.counts["versions_created"] += 1
        self.log(f"register: {a.name}: created {name} version {mv.version}")
        return mv

    def _remove_version(self, name: str, version: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version(name, str(version))
            self.counts["duplicates_removed"] += 1
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def artifact_run(self, experiment_id: str, a: ArtifactReport, mv, create: bool):
        """This build's run for the artifact: the canonical version's run if this build made it,
        else the oldest run of this build for the content (created if `create`: same content
        already registered by another build, so nothing is uploaded again)."""
        from mlflow.exceptions import MlflowException

        ident = artifact_identity(self.report, a)
        if mv.run_id:
            try:
                run = self.client.get_run(mv.run_id)
                if run.info.lifecycle_stage == "active" and all(run.data.tags.get(k) == v for k, v in ident.items()):
                    return run
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        runs = [r for r in search_runs(self.client, experiment_id, ident) if r.data.tags.get(f"{TAG_PREFIX}artifact_ref")]
        if runs or not create:
            return runs[0] if runs else None
        ref = f"same content as models:/{mv.name}/{mv.version}, registered by an earlier build; not uploaded again"
        run = self._create_run(experiment_id, a.name, {**ident, f"{TAG_PREFIX}artifact_ref": ref})
        self.log(f"register: {a.name}: {ref}")
        runs = [r for r in search_runs(self.client, experiment_id, ident) if r.data.tags.get(f"{TAG_PREFIX}artifact_ref")]
        if runs and runs[0].info.run_id != run.info.run_id:
            self._delete_run(run.info.run_id)
            return runs[0]
        return run

    def _cleanup_runs(self, experiment_id: str, a: ArtifactReport, keep: str | None) -> None:
        """Delete this artifact's other runs of this build once they are over (duplicates, failed or abandoned uploads)."""
        for r in search_runs(self.client, experiment_id, artifact_identity(self.report, a)):
            if r.info.run_id != keep and (r.info.run_id in self.mine or self._stale(r)):
                self._delete_run(r.info.run_id)
                self.log(f"register: {a.name}: removed run {r.info.run_id} ({r.info.status.lower()}, no model version: a duplicate or an abandoned upload)")

    def upload(self, run, a: ArtifactReport, folder: Path) -> bool:
        """Put the artifact files (or a reference) under <run>/artifact; returns True for a reference."""
        limit_mb = float(self.spec.upload_max_mb)
        size = a.bytes if a.bytes is not None else sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if size > limit_mb * 2**20:
            with tempfile.TemporaryDirectory(prefix="qf-ref-") as tmp:
                stub = Path(tmp)
                shutil.copy2(folder / MANIFEST, stub / MANIFEST)
                if (folder / "README.md").is_file():
                    shutil.copy2(folder / "README.md", stub / "README.md")
                (stub / REF_FILE).write_text(json.dumps({
                    "store_path": str(folder), "bytes": size, "content_sha256": a.content_sha256,
                    "reason": f"{size / 2**20:.3g} MB is above registry.upload_max_mb={limit_mb:g}; files stay in the store",
                }, indent=2))
                self.client.log_artifacts(run.info.run_id, str(stub), ARTIFACT_DIR)
            ref = f"{folder} ({size / 2**20:.3g} MB > upload_max_mb {limit_mb:g}): manifest and reference uploaded, files not"
            self._tags(run.info.run_id, {}, {f"{TAG_PREFIX}artifact_ref": ref})
            run.data.tags[f"{TAG_PREFIX}artifact_ref"] = ref
            self.counts["uploads"] += 1
            self.log(f"register: {a.name}: {size / 2**20:.3g} MB over upload_max_mb={limit_mb:g}; logged a reference to {folder}")
            return True
        self.log(f"register: {a.name}: uploading {size / 2**20:.2f} MB")
        self.client.log_artifacts(run.info.run_id, str(folder), ARTIFACT_DIR)
        self.counts["uploads"] += 1
        return False

    def verify(self, run, a: ArtifactReport, folder: Path, manifest: dict, referenced: bool) -> None:
        """Download <run>/artifact back and compare every file's sha256 with the manifest (MLflow issue 18581)."""
        import mlflow.artifacts

        source = f"{run.info.artifact_uri}/{ARTIFACT_DIR}"
        # Download beside the report, not in /tmp: artifacts can be GBs and /tmp may be small.
        with tempfile.TemporaryDirectory(prefix=".verify-", dir=self.report_path.parent) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=self.uri))
            problems = []
            if not (got / MANIFEST).is_file() or sha256_file(got / MANIFEST) != sha256_file(folder / MANIFEST):
                problems.append(f"{MANIFEST} missing or different")
            if referenced:
                have = sorted(p.name for p in got.iterdir())
                want = sorted({MANIFEST, REF_FILE} | ({"README.md"} if (folder / "README.md").is_file() else set()))
                if have != want:
                    problems.append(f"the reference holds {have}, expected {want}")
                elif (got / "README.md").is_file() and sha256_file(got / "README.md") != sha256_file(folder / "README.md"):
                    problems.append("README.md did not arrive intact")
            else:
                problems += [p.replace("changed since it was stored (sha256 differs)", "sha256 differs from the manifest")
                             for p in verify_folder(got, manifest)]
        if problems:
            raise StageFailed(f"{a.name}: the uploaded artifact at {source} does not match its manifest: " + "; ".join(problems[:10])
                              + "; no model version was created")
        self.log(f"register: {a.name}: download verified ({len(manifest.get('files', []))} files match the manifest)")

    # ------------------------------------------------------ convergence
    def view(self, parent) -> tuple[list[str], Report]:
        run_id = parent.info.run_id
        names, merged = P.merged_view(self.client, run_id, lambda n: self.parts.get(run_id, n), self.log, "register")
        return names, promotion.decide(merged if merged is not None else P.part_of(self.report))

    def converge(self, experiment_id: str, mine: Report) -> None:
        """Upload this job's part, then apply the merge of all parts until no job adds one meanwhile."""
        from mlflow.exceptions import MlflowException

        seen: tuple | None = None
        errors = races = 0
        parent = merged = None
        for _ in range(MAX_ROUNDS):
            try:
                parent = self.build_run(experiment_id, create=True)
                names = P.list_parts(self.client, parent.info.run_id)
                if P.upload_part(self.client, parent.info.run_id, mine, names):
                    self.counts["parts_uploaded"] += 1
                names, merged = self.view(parent)
                state = (parent.info.run_id, tuple(names))
                if state == seen:
                    break
                self.apply(experiment_id, parent, merged, step=len(names))
            except MlflowException as exc:
                if is_connection_error(exc):
                    raise
                # A parallel job deleted what this round wrote to (its duplicate build run, a
                # duplicate version or run) or won an upsert: look again. Anything else (not forever).
                if is_race(exc):
                    races += 1
                    self.counts["races"] += 1
                    if races >= MAX_ROUNDS:
                        raise
                    time.sleep(min(2.0, 0.1 * 2**min(races, 5)) * (0.5 + random.random()))
                else:
                    errors += 1
                    if errors >= 3:
                        raise
                self.log(f"register: {first_line(exc)}; looking again")
                seen = None
                continue
            seen = state
        else:
            self.log(f"register: other jobs kept adding results for {MAX_ROUNDS} rounds; the next `quantforge register` completes the view")
        self.parent_id = parent.info.run_id
        self.merged = merged

    def apply(self, experiment_id: str, parent, merged: Report, step: int) -> None:
        """Make MLflow describe the merged report: metrics, tags, descriptions, aliases, report.json."""
        recipe = merged.recipe
        versions: dict[str, tuple[str, str]] = {}
        runs: dict[str, Any] = {}
        mvs: dict[str, Any] = {}
        for a in merged.built():
            if not a.content_sha256:
                continue
            name = model_name_for(self.config, recipe, a)
            mv = canonical_version(self.client, name, a.content_sha256)
            if mv is None:
                continue  # not registered (yet, or its upload failed)
            mvs[a.name] = mv
            versions[a.name] = (name, str(mv.version))
            runs[a.name] = self.artifact_run(experiment_id, a, mv, create=False)
        # Aliases first: each version's description offers a download by alias only where the
        # model holds that alias (a model whose gates never passed has no @production).
        recipe_models = sorted({m.name for m in self.client.search_registered_models(f"tags.recipe = {quote(recipe)}")} | {n for n, _ in versions.values()})
        moves = promotion.plan_aliases(merged, versions, recipe_models, self.spec.promotion_alias)
        promotion.apply_aliases(self.client, moves, self.log)
        if promotion.promotion_enabled():
            for a in merged.built():
                if a.name in versions and a.gates is not None and not a.gates.promotable:
                    why = f"pending on {', '.join(a.gates.pending_devices)}" if a.gates.pending_devices else a.gates.status
                    self.log(f"register: {a.name}: gates {why}; @{self.spec.promotion_alias} not moved")
        held = self._held(sorted({n for n, _ in versions.values()}), moves)
        keys = self._metric_keys(merged)
        for a in merged.built():
            if a.name not in versions:
                continue
            name, version = versions[a.name]
            run = runs[a.name]
            if run is not None:
                self._describe_run(run, parent, merged, a, name, version, keys, step)
            self._describe_version(mvs[a.name], merged, a, held.get(name, {}))
        self._describe_build(parent, merged, keys, step)
        self._describe_experiment(experiment_id, parent, merged)
        self.entries = self._entries(merged, versions, runs, held)
        self._write_view(parent, merged, experiment_id)
        self._log_files(parent)

    def _metric_keys(self, merged: Report) -> dict[str, list[str]]:
        """device -> metric names measured there for any model, so every run logs the same keys."""
        keys: dict[str, list[str]] = {}
        for device in cards.devices_of(merged):
            names: dict[str, None] = {}
            for ev in [merged.baseline.get(device), *(a.evals.get(device) for a in merged.built())]:
                if ev is not None:
                    names.update(dict.fromkeys(cards.entry_values(ev)))
            keys[device] = list(names)
        return keys

    @staticmethod
    def _device_metrics(evals: dict, keys: dict[str, list[str]] | None) -> dict[str, float]:
        """``<device>.<metric>``; with `keys`, every key measured for any model there (NaN where
        this one has no value), so the compare and chart views line up across formats."""
        out: dict[str, float] = {}
        for device in (keys if keys is not None else evals):
            ev = evals.get(device)
            values = cards.entry_values(ev) if ev is not None else {}
            for n in (keys[device] if keys is not None else values):
                out[key(f"{device}.{n}")] = values.get(n, float("nan"))
        return out

    def _eval_tags(self, evals: dict, prefix: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        for device, ev in evals.items():
            p = f"{prefix}.{device}" if prefix else device
            # Every field, "-" when unset: tags cannot be removed by a later view, only overwritten.
            tags[f"{p}.status"] = ev.status
            for field in ("runtime", "speed_runtime", "fingerprint", "reason", "speed_reason", "tasks_reason"):
                tags[f"{p}.{field}"] = tag_value(getattr(ev, field))
            tags[f"{p}.dequantized"] = "-" if ev.dequantized is None else str(ev.dequantized).lower()
        return tags

    def _describe_run(self, run, parent, merged: Report, a: ArtifactReport, name: str, version: str, keys: dict, step: int) -> None:
        ident = artifact_identity(merged, a)
        tags = {
            **ident,
            "mlflow.parentRunId": parent.info.run_id,
            f"{TAG_PREFIX}registered_model": name,
            f"{TAG_PREFIX}model_version": version,
            f"{TAG_PREFIX}source_model": merged.source.model if merged.source else "-",
            **promotion.gate_tags(a),
            **self._eval_tags(a.evals, "eval"),
            **{f"{TAG_PREFIX}recommended.{d}": str(v).lower() for d, v in promotion.recommended_on(merged, a.name).items()},
            **self.user_tags,
        }
        self._tags(run.info.run_id, run.data.tags, tags)
        metrics = self._device_metrics(a.evals, keys)
        if a.bytes is not None:
            metrics["size_mib"] = round(a.bytes / 2**20, 3)
        self._metrics(run.info.run_id, run.data.metrics, metrics, step)
        excerpt = {
            "recipe": merged.recipe, "recipe_sha256": merged.recipe_sha256,
            "source": merged.source.model_dump(mode="json", exclude={"config", "path"}) if merged.source else None,
            "baseline": {d: e.model_dump(mode="json") for d, e in merged.baseline.items()},
            "devices": {d: i.model_dump(mode="json") for d, i in merged.devices.items()},
            "recommendations": {d: r.model_dump(mode="json") for d, r in merged.recommendations.items()},
            "artifact": a.model_dump(mode="json", exclude={"registry", "path"}),
        }
        self._upload_json(run, excerpt, "quantforge/report_excerpt.json", f"{TAG_PREFIX}excerpt_sha256")
        self._finish(run)

    def _upload_json(self, run, data: Any, path: str, tag: str) -> None:
        self._upload_text(run, json.dumps(data, indent=2, sort_keys=True, default=str), path, tag)

    def _upload_text(self, run, text: str, path: str, tag: str) -> None:
        """A file on the run, uploaded again only when its content changes (its digest is a tag)."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if run.data.tags.get(tag) == digest:
            return
        with tempfile.TemporaryDirectory(prefix="qf-json-") as tmp:
            f = Path(tmp) / Path(path).name
            f.write_text(text)
            self.client.log_artifact(run.info.run_id, str(f), str(Path(path).parent))
        self._tags(run.info.run_id, {}, {tag: digest})

    def _describe_version(self, mv, merged: Report, a: ArtifactReport, held: dict[str, str]) -> None:
        src = merged.source
        tags = {
            "content_sha256": a.content_sha256, "artifact": a.name, "target": a.target, "kind": a.kind, "variant": a.variant or "-",
            "format": a.format or "-", "bits": tag_value(a.bits), "group_size": tag_value(a.group_size),
            "runtimes": ",".join(a.runtimes) or "-", "bytes": tag_value(a.bytes), "size_mib": f"{(a.bytes or 0) / 2**20:.2f}",
            "recipe": merged.recipe, "recipe_sha256": merged.recipe_sha256 or "-",
            "source_model": src.model if src else "-", "source_revision": src.revision if src else "-",
            "source_commit": (src.commit if src else None) or "-",
            **promotion.gate_tags(a),
            **{f"recommended.{d}": str(v).lower() for d, v in promotion.recommended_on(merged, a.name).items()},
            **self.user_tags,
        }
        for device, ev in a.evals.items():
            for k, v in cards.entry_values(ev).items():
                tags[f"{device}.{k}"] = repr(v)
            tags[f"{device}.runtime"] = tag_value(ev.runtime)
            tags[f"{device}.status"] = ev.status
        have = mv.tags or {}
        if a.kind == "gguf" and not have.get("gguf_file"):  # a version registered before the tag existed
            import mlflow.artifacts

            names = [Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=mv.source, tracking_uri=self.uri)]
            gguf = next((n for n in names if n.endswith(".gguf")), None)
            if gguf:
                tags["gguf_file"] = gguf
        for k, v in tags.items():
            k, v = key(k), tag_value(v)
            if have.get(k) != v:
                retry_races(self.client.set_model_version_tag, mv.name, str(mv.version), k, v)
        desc = cards.version_description(merged, a, mv.name, str(mv.version), self.uri, self.spec.promotion_alias,
                                         tags.get("gguf_file") or have.get("gguf_file"), held)
        if (mv.description or "") != desc:
            self.client.update_model_version(mv.name, str(mv.version), description=desc)

    def _describe_build(self, parent, merged: Report, keys: dict, step: int) -> None:
        from pipeline import __version__

        r, src = merged, merged.source
        truncated = self._params(parent, flatten(self.config))
        tags = {
            **build_identity(r),
            f"{TAG_PREFIX}recipe": r.recipe,
            f"{TAG_PREFIX}recipe_path": r.recipe_path or "-",
            f"{TAG_PREFIX}version": r.quantforge_version or __version__,
            f"{TAG_PREFIX}git_commit": r.git_commit or "-",
            f"{TAG_PREFIX}source_model": src.model if src else "-",
            f"{TAG_PREFIX}source_revision": src.revision if src else "-",
            f"{TAG_PREFIX}source_commit": (src.commit if src else None) or "-",
            **{f"tool.{k}": v for k, v in r.tools.items()},
            **self.user_tags,
            "mlflow.note.content": cards.build_note(r),
            **{f"{TAG_PREFIX}recommended.{d}": rec.artifact or "none" for d, rec in r.recommendations.items()},
        }
        if truncated:
            tags[f"{TAG_PREFIX}params_truncated"] = f"values over {MAX_PARAM_VALUE} chars cut: " + ", ".join(truncated)
        for device, info in r.devices.items():
            tags[f"device.{device}.status"] = info.status
            tags[f"device.{device}.fingerprint"] = tag_value(info.fingerprint_hash)
            tags[f"device.{device}.reason"] = tag_value(info.reason)
        tags.update(self._eval_tags(r.baseline, "baseline"))
        self._tags(parent.info.run_id, parent.data.tags, tags)
        self._metrics(parent.info.run_id, parent.data.metrics, self._device_metrics(r.baseline, None), step)
        # The recipe as validated (defaults filled in): the same bytes for every job of this build
        # run, whose identity includes its sha256.
        import yaml

        self._upload_text(parent, yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True), RECIPE_ARTIFACT, f"{TAG_PREFIX}recipe_yaml_sha256")

    def _describe_experiment(self, experiment_id: str, parent, merged: Report) -> None:
        """The experiment's description (what MLflow shows above its runs, by default): the
        formats side by side per device, of the build registered last."""
        note = cards.build_note(merged) + f"\n\nBuild run: `{parent.info.run_id}`."
        exp = self.client.get_experiment(experiment_id)
        if (exp.tags or {}).get("mlflow.note.content") != note:
            retry_races(self.client.set_experiment_tag, experiment_id, "mlflow.note.content", note)

    def _held(self, models: list[str], moves: list) -> dict[str, dict[str, str]]:
        """model -> {alias: version} it holds: the ones this policy decides from the plan, the
        others (a person's @champion, say) as MLflow holds them."""
        from mlflow.exceptions import MlflowException

        governed = {(m.model, m.alias): m.version for m in moves} if promotion.promotion_enabled() else {}
        out: dict[str, dict[str, str]] = {}
        for name in models:
            try:
                held: dict[str, str | None] = {k: str(v) for k, v in (self.client.get_registered_model(name).aliases or {}).items()}
            except MlflowException:
                held = {}
            for (model, alias), v in governed.items():
                if model == name:
                    held[alias] = v
            out[name] = {k: v for k, v in held.items() if v is not None}
        return out

    def _entries(self, merged: Report, versions: dict, runs: dict, held: dict[str, dict[str, str]]) -> dict[str, RegistryEntry]:
        """Where each artifact is registered, with the aliases its version holds."""
        out = {}
        for a in merged.built():
            if a.name not in versions:
                continue
            name, version = versions[a.name]
            aliases = sorted(al for al, v in held.get(name, {}).items() if v == version)
            run = runs.get(a.name)
            out[a.name] = RegistryEntry(name=name, version=version, uri=f"models:/{name}/{version}",
                                        run_id=run.info.run_id if run is not None else None, aliases=aliases)
        return out

    def _write_view(self, parent, merged: Report, experiment_id: str) -> None:
        view = merged.model_copy(deep=True)
        for a in view.artifacts:
            a.registry = self.entries.get(a.name)
        view.registry = RegistryInfo(tracking_uri=self.uri, experiment_id=experiment_id, experiment_name=view.recipe, parent_run_id=parent.info.run_id)
        text = json.dumps(view.model_dump(mode="json"), indent=2, default=str)
        from pipeline.core.report import report_digest

        digest = report_digest(view)
        if parent.data.tags.get(P.REPORT_TAG) != digest:
            with tempfile.TemporaryDirectory(prefix="qf-report-") as tmp:
                f = Path(tmp) / Path(P.REPORT_ARTIFACT).name
                f.write_text(text)
                self.client.log_artifact(parent.info.run_id, str(f), str(Path(P.REPORT_ARTIFACT).parent))
            self._tags(parent.info.run_id, {}, {P.REPORT_TAG: digest})
            registered = [a.name for a in view.artifacts if a.registry]
            self.log(f"register: merged report.json on build run {parent.info.run_id}: {', '.join(registered) or 'no'} artifact(s) registered so far")

    def _log_files(self, parent) -> None:
        """Plots and the HTML report next to report.json, on the build run; again only when they change."""
        files = sorted(p for p in self.report_path.parent.iterdir() if p.is_file() and p.suffix in (".png", ".html"))
        if not files:
            return
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
        if parent.data.tags.get(f"{TAG_PREFIX}plots_sha256") == h.hexdigest():
            return
        for p in files:
            self.client.log_artifact(parent.info.run_id, str(p), "plots" if p.suffix == ".png" else None)
        self._tags(parent.info.run_id, {}, {f"{TAG_PREFIX}plots_sha256": h.hexdigest()})

    # ------------------------------------------------------------- the job
    def run(self) -> None:
        try:
            check_reachable(self.client)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot register now"
            raise self.unavailable(exc) from None
        exp = self.experiment_id = self.experiment()
        for a in self.report.artifacts:
            if (a.model_extra or {}).get("pulled") is False:
                self.log(f"register: {a.name}: not on this machine ({(a.model_extra or {}).get('pull_reason') or 'not pulled'}); its registration stays as it is")
                continue
            if a.status != "built" or not a.content_sha256 or not a.path:
                self.log(f"register: {a.name}: skipped (status {a.status})")
                continue
            folder = Path(a.path)
            if not folder.is_absolute():
                folder = self.report_path.parent.parent / folder
            if not (folder / MANIFEST).is_file():
                self.failures.append(f"{a.name}: {folder} has no {MANIFEST}")
                continue
            try:
                self.racing(f"{a.name}: registration", lambda: self.register_artifact(exp, a, folder))
            except StageFailed as exc:
                self.failures.append(str(exc))
        self.converge(exp, P.part_of(self.report))
        self._finish(self.client.get_run(self.parent_id))

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


def register_report(report_path: Path, tracking_uri: str | None = None, log: Callable[[str], Any] = print) -> Report:
    """Register report.json's built artifacts in MLflow and record where they went in the report.

    ``tracking_uri``: explicit server or store; else $MLFLOW_TRACKING_URI; else the local
    SQLite store under the artifacts dir (the folder above ``<recipe>/report.json``).
    Raises RegistryUnavailable if the tracking server cannot be reached (quickly, or when
    it goes away midway: what was done is consistent, the next run completes it), and
    StageFailed if an upload did not come back identical (that artifact gets no version;
    the others are registered and recorded). Returns the local report as updated.
    """
    report_path = Path(report_path).resolve()
    report = read_report(report_path)
    if report is None:
        raise InvalidInput(f"{report_path}: no report; build the recipe first")
    uri = tracking_uri_for(report_path.parent.parent, tracking_uri)
    reg = Registration(report_path, report, uri, log)
    try:
        with quiet():
            reg.run()
    except (RegistryUnavailable, InvalidInput, StageFailed):
        raise
    except Exception as exc:
        if is_connection_error(exc):
            raise reg.unavailable(exc) from exc
        from mlflow.exceptions import MlflowException

        if isinstance(exc, (MlflowException, P.PartUnreadable)):
            # The server refused a request (a race lost RACE_ATTEMPTS times, a permission, a limit):
            # one line, and what is registered so far is consistent (every step is idempotent).
            recipe = report.recipe_path or str(report_path)
            raise StageFailed(f"MLflow at {uri} refused a request: {first_line(exc)}. What was registered is consistent; "
                              f"`quantforge register {recipe}` again completes it") from exc
        raise
    with updating(report_path, report.recipe) as rep:
        rep.registry = RegistryInfo(tracking_uri=uri, experiment_id=reg.experiment_id, experiment_name=report.recipe,
                                    parent_run_id=reg.parent_id, registered=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for art in rep.artifacts:
            entry = reg.entries.get(art.name)
            merged = reg.merged.artifact(art.name) if reg.merged else None
            # Only if the artifact on disk is still the content that was registered.
            if entry is not None and merged is not None and art.content_sha256 == merged.content_sha256:
                art.registry = entry
        final = rep.model_copy(deep=True)
    c = reg.counts
    log(f"register: {len(reg.entries)} artifact(s) registered in {uri}: {c['runs_created']} run(s), {c['uploads']} upload(s), "
        f"{c['versions_created']} version(s) created, {c['metrics_logged']} metric value(s) logged"
        + (f", {c['duplicates_removed']} duplicate version(s) of parallel jobs removed" if c["duplicates_removed"] else "")
        + (f", {c['races']} race(s) with parallel jobs resolved" if c["races"] else ""))
    for e in reg.entries.values():
        log(f"register:   {e.uri}" + (f"  @{' @'.join(e.aliases)}" if e.aliases else ""))
    run_ids = [reg.parent_id] + [e.run_id for e in reg.entries.values() if e.run_id]
    for line in ui_hint(uri, reg.experiment_id, [r for r in run_ids if r]):
        log(line)
    if reg.failures:
        raise StageFailed("registration incomplete:\n" + "\n".join(reg.failures))
    return final
