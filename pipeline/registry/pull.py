"""The pull job: a registered build, brought to this machine (for an eval job on another runner).

Finds the recipe's build run, merges its report parts (the same merge and the same
gate/recommendation decision registration applies), and puts every registered version's
files into the local store through the store's one run-once mechanism
(:meth:`pipeline.core.store.Store.run_once`: lock, temp folder, manifest, atomic rename),
after checking them with the one manifest verifier (:func:`pipeline.core.store.verify_folder`)
and against the content hash the build recorded. The merged report is then merged into
the local one with local paths, so ``quantforge eval`` and ``quantforge register`` run
here as if the build had run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.core.report import ArtifactReport, RegistryEntry, Report, merge_reports, report_path as report_path_for, updating
from pipeline.core.store import MANIFEST, Store, verify_folder
from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.registry import parts as P, promotion
from pipeline.registry.writes import REF_FILE, canonical_version, model_name_for, search_runs
from pipeline.registry.tracking import (
    TAG_PREFIX, check_reachable, client as make_client, first_line, is_connection_error, local_db, quiet, tracking_uri_for,
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
#: manifest fields the store writes itself on commit
_STORE_FIELDS = ("key", "kind", "files", "bytes", "content_sha256", "created")


def _note(a: ArtifactReport, pulled: bool, reason: str | None = None, source: str | None = None) -> None:
    a.pulled = pulled  # extra fields: ArtifactReport keeps unknown keys
    a.pull_reason = reason
    a.pulled_from = source


def _sizes_match(folder: Path, manifest: dict) -> bool:
    """The store's own trust rule (a manifest is written last), plus every file present at its size."""
    try:
        return all((folder / row["path"]).stat().st_size == row["bytes"] for row in manifest["files"])
    except (OSError, KeyError, TypeError):
        return False


class Pull:
    def __init__(self, recipe: str, artifacts_dir: Path, tracking_uri: str, recipe_sha256: str | None, log: Callable[[str], Any]):
        self.recipe, self.dir, self.uri, self.sha, self.log = recipe, artifacts_dir, tracking_uri, recipe_sha256, log
        self.store = Store(artifacts_dir)
        self.client = make_client(tracking_uri)
        self.counts = {"downloaded": 0, "present": 0, "not_pulled": 0, "bytes": 0}
        self.failures: list[str] = []

    def unavailable(self, exc: BaseException) -> RegistryUnavailable:
        return RegistryUnavailable(f"MLflow at {self.uri} is unreachable ({first_line(exc)}). Nothing was pulled; "
                                   "start the server (or fix --tracking-uri / MLFLOW_TRACKING_URI) and run `quantforge pull` again.")

    def build_run(self):
        from mlflow.entities import LifecycleStage

        exp = self.client.get_experiment_by_name(self.recipe)
        if exp is None or exp.lifecycle_stage == LifecycleStage.DELETED:
            names = sorted(e.name for e in self.client.search_experiments(max_results=100) if e.name != "Default")
            raise InvalidInput(f"nothing registered for recipe {self.recipe!r} in {self.uri} (no experiment of that name; "
                               f"experiments there: {', '.join(names) or 'none'}). Register a build of it first: `quantforge register RECIPE`.")
        role = {f"{TAG_PREFIX}role": "build"}
        every = search_runs(self.client, exp.experiment_id, role)
        sha = self.sha
        if not sha and every:
            sha = max(every, key=lambda r: r.info.start_time or 0).data.tags.get(f"{TAG_PREFIX}recipe_sha256")
        runs = [r for r in every if r.data.tags.get(f"{TAG_PREFIX}recipe_sha256") == sha]
        for run in runs:  # oldest first: the canonical build run (see register.py)
            if P.list_parts(self.client, run.info.run_id) or run.data.tags.get(P.REPORT_TAG):
                return exp, run
        if self.sha and not runs:
            shas = [r.data.tags.get(f"{TAG_PREFIX}recipe_sha256", "?")[:12] for r in sorted(every, key=lambda r: -(r.info.start_time or 0))[:10]]
            raise InvalidInput(f"no build of recipe {self.recipe!r} with recipe sha256 {self.sha[:12]} is registered in {self.uri} "
                               f"(registered builds: {', '.join(shas) or 'none'}): the recipe changed since, or its build job has not registered yet")
        raise InvalidInput(f"recipe {self.recipe!r} in {self.uri} has no build run with a report: run `quantforge register` for it again")

    def remote_report(self, run) -> Report:
        run_id = run.info.run_id
        _, merged = P.merged_view(self.client, run_id, lambda n: P.read_part(self.client, run_id, n), self.log, "pull")
        if merged is None:
            raise StageFailed(f"build run {run.info.run_id} of {self.recipe!r} in {self.uri}: no readable report")
        return promotion.decide(merged)

    def run(self) -> Path:
        from mlflow.exceptions import MlflowException

        try:
            check_reachable(self.client)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot pull now"
            raise self.unavailable(exc) from None
        exp, parent = self.build_run()
        remote = self.remote_report(parent)
        self.log(f"pull: {self.recipe}: build run {parent.info.run_id} (recipe sha256 {remote.recipe_sha256[:12]})")
        config = remote.recipe_config or {}
        for a in remote.artifacts:
            if a.status != "built" or not a.content_sha256:
                continue
            name = model_name_for(config, remote.recipe, a)
            try:
                mv = canonical_version(self.client, name, a.content_sha256)
                if mv is None:
                    self.not_pulled(a, "built but not registered (its registration failed or has not run)")
                    continue
                a.registry = RegistryEntry(name=name, version=str(mv.version), uri=f"models:/{name}/{mv.version}", run_id=mv.run_id,
                                           aliases=sorted(mv.aliases or []))
                self.pull_one(a, mv)
            except StageFailed as exc:
                self.failures.append(str(exc))
                self.not_pulled(a, str(exc), quiet=True)
            except MlflowException as exc:  # e.g. the version was deleted since
                if is_connection_error(exc):
                    raise
                self.failures.append(f"{a.name}: models:/{name}: {first_line(exc)}")
                self.not_pulled(a, self.failures[-1], quiet=True)
        remote.registry.tracking_uri = self.uri
        remote.registry.experiment_id = exp.experiment_id
        remote.registry.experiment_name = self.recipe
        remote.registry.parent_run_id = parent.info.run_id
        rpath = report_path_for(self.dir, self.recipe)
        with updating(rpath, self.recipe) as rep:
            merged = merge_reports(rep if rep.artifacts or rep.source else None, remote)
            for field in type(merged).model_fields:
                setattr(rep, field, getattr(merged, field))
            for k, v in (merged.model_extra or {}).items():
                setattr(rep, k, v)
        c = self.counts
        self.log(f"pull: {c['downloaded']} artifact(s) downloaded ({c['bytes'] / 2**20:.2f} MB), {c['present']} already in the store, "
                 f"{c['not_pulled']} not pulled; report {rpath}")
        if self.failures:
            raise StageFailed("pull incomplete:\n" + "\n".join(self.failures))
        return rpath

    def not_pulled(self, a: ArtifactReport, reason: str, quiet: bool = False) -> None:
        # No local folder: path None makes eval and register pass it by (the merge keeps a path
        # this machine already had).
        a.path = None
        _note(a, False, reason, a.registry.uri if a.registry else None)
        self.counts["not_pulled"] += 1
        if not quiet:
            self.log(f"pull: {a.name}: NOT PULLED: {reason}")

    def _read_manifest(self, mv) -> dict:
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="qf-manifest-") as tmp:
            try:
                got = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{MANIFEST}", dst_path=tmp, tracking_uri=self.uri)
                return json.loads(Path(got).read_text())
            except Exception as exc:  # noqa: BLE001
                if is_connection_error(exc):
                    raise
                raise StageFailed(f"models:/{mv.name}/{mv.version} has no readable {MANIFEST} ({first_line(exc)}); nothing was pulled for it") from None

    def pull_one(self, a: ArtifactReport, mv) -> None:
        import mlflow.artifacts

        uri = a.registry.uri
        kind = Path(a.path).parent.name if a.path else None
        key = a.stage_key
        known = bool(kind and key and _SAFE_NAME.match(kind) and self.store.get(kind, key))
        if not known:
            # Not here under the build's name: the version's files say where they belong.
            listing = [Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=mv.source, tracking_uri=self.uri)]
            if REF_FILE in listing:
                where = (mv.tags or {}).get("artifact_ref") or f"see {REF_FILE} in the version's files"
                self.not_pulled(a, f"registered by reference only (above registry.upload_max_mb), its files were not uploaded: {where}")
                return
            manifest = self._read_manifest(mv)
            kind, key = manifest.get("kind"), manifest.get("key")
            for field, value in (("kind", kind), ("key", key)):
                if not _SAFE_NAME.match(str(value or "")):
                    raise StageFailed(f"{a.name}: the manifest of {uri} names {field} {value!r}, not a store name; nothing was pulled for it")

        def produce(tmp: Path) -> dict:
            dl = self.store.new_tmp("pull-dl", key)
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dl), tracking_uri=self.uri))
                try:
                    manifest = json.loads((got / MANIFEST).read_text())
                except (OSError, ValueError) as exc:
                    raise StageFailed(f"{a.name}: {uri} has no readable {MANIFEST} ({first_line(exc)}); nothing was pulled for it") from None
                problems = verify_folder(got, manifest)
                if manifest.get("content_sha256") != a.content_sha256:
                    problems.append(f"its manifest's content_sha256 {str(manifest.get('content_sha256'))[:12]} is not the report's {a.content_sha256[:12]}")
                if (manifest.get("kind"), manifest.get("key")) != (kind, key):
                    problems.append(f"its manifest names {manifest.get('kind')}/{str(manifest.get('key'))[:12]}, expected {kind}/{key[:12]}")
                if problems:
                    problems = [p.replace("changed since it was stored (sha256 differs)", "sha256 differs from the manifest") for p in problems]
                    raise StageFailed(f"{a.name}: the files of {uri} ({mv.source}) do not match their manifest: " + "; ".join(problems[:10])
                                      + "; nothing was pulled for it")
                for entry in got.iterdir():
                    if entry.name != MANIFEST:
                        os.rename(entry, tmp / entry.name)
                self.counts["bytes"] += int(manifest.get("bytes") or 0)
                return {k: v for k, v in manifest.items() if k not in _STORE_FIELDS}
            finally:
                shutil.rmtree(dl, ignore_errors=True)

        def accept(manifest: dict) -> bool:
            return manifest.get("content_sha256") == a.content_sha256 and _sizes_match(self.store.path_for(kind, key), manifest)

        have = self.store.get(kind, key)
        if have is not None and not accept(have):
            self.log(f"pull: {a.name}: the store's {kind}/{key[:12]} holds other bytes; the registered ones replace them")
        entry = self.store.run_once(kind, key, produce, accept=accept, expect_content=a.content_sha256)
        a.path = str(entry.path)
        _note(a, True, source=uri)
        if entry.hit:
            self.counts["present"] += 1
            self.log(f"pull: {a.name}: already in the store at {entry.path}")
        else:
            self.counts["downloaded"] += 1
            self.log(f"pull: {a.name}: {uri} -> {entry.path} ({len(entry.manifest['files'])} files verified against the manifest)")


def pull_report(recipe_name: str, artifacts_dir: Path, tracking_uri: str | None = None, recipe_sha256: str | None = None,
                log: Callable[[str], Any] = print) -> Path:
    """Bring a registered build to this machine: the merged report.json and the registered files.

    Finds experiment ``recipe_name`` and its build run (with ``recipe_sha256``, if given;
    else the newest build), merges its report parts, then puts every built and registered
    artifact's version files into ``<artifacts_dir>/store/<kind>/<key[:24]>/`` (kind and key
    from the manifest; every file's sha256 checked; through ``Store.run_once``), and merges
    the report into ``<artifacts_dir>/<recipe>/report.json`` with local paths. Artifacts
    already in the store are not downloaded again. Artifacts registered by reference (above
    upload_max_mb) or not registered are left with ``pulled: false`` and a reason.

    Raises RegistryUnavailable (quickly) if the server is unreachable, InvalidInput for an
    unknown recipe or build, StageFailed if a download does not match its manifest (the
    others are pulled and recorded; nothing is left for that one). Returns the report's path.
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    uri = tracking_uri_for(artifacts_dir, tracking_uri)
    db = local_db(uri)
    if db is not None and not db.is_file():
        raise InvalidInput(f"no MLflow store at {uri}: pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the server the build jobs registered into")
    puller = Pull(recipe_name, artifacts_dir, uri, recipe_sha256, log)
    try:
        with quiet():
            return puller.run()
    except (RegistryUnavailable, InvalidInput, StageFailed):
        raise
    except Exception as exc:
        if is_connection_error(exc):
            raise puller.unavailable(exc) from exc
        raise
