"""The registration job: report.json -> MLflow runs, metrics, verified uploads, model versions, aliases.

Split by job: this module looks and converges (experiment, build run, versions, runs, the
merge of every job's part); :mod:`~pipeline.registry.writes` holds the writes that must
survive parallel jobs, :mod:`~pipeline.registry.upload` the verified uploads,
:mod:`~pipeline.registry.describe` what runs, versions and the experiment say.

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

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.core.report import ArtifactReport, RegistryEntry, RegistryInfo, Report, read_report, updating
from pipeline.core.store import MANIFEST, verify_folder
from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.registry import parts as P, promotion
from pipeline.registry.describe import Describing
from pipeline.registry.upload import Uploading
from pipeline.registry.writes import (
    ARTIFACT_DIR, LEASE_S, MAX_ROUNDS, Writes, artifact_identity, build_identity, canonical_version, model_name_for, recipe_config,
    search_runs,
)
from pipeline.registry.tracking import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TAG_PREFIX, check_reachable, client as make_client,
    first_line, flatten, is_connection_error, is_race, key, local_artifact_root, quiet, quote, retry_races,
    tracking_uri_for, ui_hint,
)


class Registration(Describing, Uploading, Writes):
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
