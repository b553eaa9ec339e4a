"""Register a build's report in MLflow: runs, metrics, artifacts, model versions, aliases.

The only module that imports mlflow (inside functions, so the CLI starts fast).
It works from ``report.json`` alone plus the artifact folders it points at, so a
CI job on any machine can register what build and eval jobs left on disk.

What it writes, for a report of recipe ``demo``::

    experiment "demo"
      parent run   one per build: tags quantforge.recipe_sha256 + quantforge.source_fingerprint,
                   params = the flattened recipe, metrics = the source model's baseline per device,
                   artifact quantforge/report.json = the MERGE of every report registered into
                   this run (several build jobs, each with its own targets; eval jobs per device)
        child run  one per artifact: tag quantforge.content_sha256, metrics "<device>.<metric>",
                   artifacts: artifact/ (the files, or a reference above upload_max_mb),
                   quantforge/report_excerpt.json, plots/*.png
    registered model "<model_name>-<target>[-<variant>]"
      version      one per distinct content (version tag content_sha256), source = <child>/artifact
      aliases      "candidate" -> the version this report registered;
                   promotion alias (default "production") -> moved only when the gates pass on
                   every required device with none pending

Order per artifact: upload to the child run -> download it back and compare sha256
with the manifest -> create the version. A mismatch creates no version, so the
registry never points at missing or different files.

Everything is looked up before it is created, so re-running with an unchanged
report creates no runs, uploads or versions, and a report with new device results
only adds metrics and tags and re-decides promotion.

``pull_report`` is the way back, for a CI job on another machine: it downloads the
parent run's merged report.json and every registered version's files into the local
store (verified against the manifest, temp folder + rename), and merges the report
into the local one. ``merge_reports`` is the one merge rule for both directions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import InvalidInput, RegistryUnavailable, StageFailed
from pipeline.core.report import ArtifactReport, Report, read_report, report_path as report_path_for, updating
from pipeline.core.store import MANIFEST, Store, content_hash, file_table, sha256_file

TAG_PREFIX = "quantforge."
CANDIDATE_ALIAS = "candidate"
REPORT_ARTIFACT = "quantforge/report.json"  # the merged report on the parent run
REPORT_TAG = f"{TAG_PREFIX}report_sha256"  # digest of that file's content (less timestamps)
#: facts about one machine's copy that pull writes into a local report; never uploaded
LOCAL_NOTES = ("pulled", "pull_reason", "pulled_from")
ARTIFACT_DIR = "artifact"  # the child run's folder that a model version's source points at
# MLflow 3.17 limits (mlflow/utils/validation.py); values over them are rejected.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_BATCH_PARAMS_TAGS = 100
MAX_BATCH_METRICS = 1000
# Quick reachability check: fail in seconds, not after MLflow's default 7 retries with backoff.
CHECK_RETRIES = "0"
CHECK_TIMEOUT_S = "5"

_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


# ------------------------------------------------------------------ URIs
def tracking_uri_for(artifacts_dir: Path | str, explicit: str | None = None) -> str:
    """The tracking URI to use: explicit argument, else $MLFLOW_TRACKING_URI, else a local SQLite store.

    The local store is ``<artifacts_dir>/mlflow/mlflow.db`` with artifacts under
    ``<artifacts_dir>/mlflow/artifacts`` (also what ``scripts/mlflow_server.sh start
    <artifacts_dir>/mlflow`` serves).
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = (Path(artifacts_dir) / "mlflow" / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Artifact root beside a SQLite store (``<db folder>/artifacts``); None for servers, which choose their own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    return db.parent / "artifacts"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _check_reachable(client) -> None:
    """One cheap request with no retries and a short timeout; raises whatever the client raised."""
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES=CHECK_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT=CHECK_TIMEOUT_S):
        client.search_experiments(max_results=1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _is_connection_error(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, requests.exceptions.ConnectionError) or (
        isinstance(exc, MlflowException) and any(s in str(exc) for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "Failed to establish"))
    )


# --------------------------------------------------------------- helpers
@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for a block (MLflow reads its HTTP settings per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _key(name: str) -> str:
    """A name MLflow accepts as param/metric/tag key (letters, digits, _ - . / space :)."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY]


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> dotted keys. Lists of scalars stay one JSON value; lists of dicts get indices."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = _scalar(obj)
    return out


def _numeric_metrics(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numbers in a (possibly nested) eval dict -> {"<prefix>.<name>": value}; bools and text are not metrics.

    An eval result with a flat ``metrics`` summary (what the evals write) contributes
    just that, so names read ``cpu.perplexity``, not the raw accuracy/speed records.
    """
    if isinstance(values.get("metrics"), dict):
        values = values["metrics"]
    out: dict[str, float] = {}
    for k, v in values.items():
        if k == "fingerprint":
            continue
        name = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_numeric_metrics(v, name))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:  # v == v drops NaN
            out[_key(name)] = float(v)
    return out


def _text_facts(values: dict[str, Any], prefix: str) -> dict[str, str]:
    """Non-numeric eval facts (runtime, status, reason, fingerprint) as tags."""
    out: dict[str, str] = {}
    for k, v in values.items():
        name = f"{prefix}.{k}"
        if k == "fingerprint":
            out[_key(name)] = _scalar(v)[:MAX_TAG_VALUE]
        elif isinstance(v, dict):
            out.update(_text_facts(v, name))
        elif isinstance(v, (str, bool)) or v is None:
            out[_key(name)] = _scalar(v)[:MAX_TAG_VALUE]
    return out


def _gate_word(passed: bool | None) -> str:
    return "true" if passed is True else ("false" if passed is False else "pending")


def _tag(value: Any) -> str:
    return "-" if value is None else _scalar(value)


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tree_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def gate_summary(gates: dict[str, Any]) -> tuple[bool | None, dict[str, bool | None], list[str]]:
    """(overall passed, passed per device, pending devices) from an artifact's ``gates`` entry.

    Accepts per-device results as ``gates["devices"][dev]["passed"]``, or derives them
    from ``gates["checks"]`` (a list of {"device", "passed", ...} or a dict device -> checks).
    """
    passed = gates.get("passed")
    pending = list(gates.get("pending_devices") or [])
    per: dict[str, bool | None] = {}
    devices = gates.get("devices")
    if isinstance(devices, dict):
        for dev, res in devices.items():
            per[dev] = res.get("passed") if isinstance(res, dict) else res
    checks = gates.get("checks")
    rows: list[tuple[str, Any]] = []
    if isinstance(checks, list):
        rows = [(c.get("device"), c.get("passed")) for c in checks if isinstance(c, dict) and c.get("device")]
    elif isinstance(checks, dict):
        for dev, res in checks.items():
            if isinstance(res, dict) and "passed" in res:
                rows.append((dev, res["passed"]))
            elif isinstance(res, list):
                rows += [(dev, c.get("passed")) for c in res if isinstance(c, dict)]
    derived: dict[str, list] = {}
    for dev, ok in rows:
        derived.setdefault(dev, []).append(ok)
    for dev, oks in derived.items():
        if dev in per:
            continue  # an explicit per-device result wins over one derived from checks
        per[dev] = False if any(ok is False for ok in oks) else (None if any(ok is None for ok in oks) else True)
    for dev in pending:
        per.setdefault(dev, None)
    return passed, per, pending


def promotion_enabled() -> bool:
    """False when QUANTFORGE_PROMOTE says so: CI builds of pull requests and side branches
    register their versions but must not move `candidate` or the promotion alias."""
    import os

    return os.environ.get("QUANTFORGE_PROMOTE", "true").strip().lower() not in ("0", "false", "no", "off")


def promotable(gates: dict[str, Any]) -> bool:
    """Promote only when the gates passed on every required device and none is still pending."""
    passed, _, pending = gate_summary(gates)
    return passed is True and not pending


def model_name_for(recipe_config: dict, recipe_name: str, artifact: ArtifactReport) -> str:
    base = (recipe_config.get("registry") or {}).get("model_name") or recipe_name
    parts = [base, artifact.target] + ([artifact.variant] if artifact.variant else [])
    return "-".join(str(p) for p in parts)


def _recipe_config(report: Report) -> dict:
    """The validated recipe as a dict: report.recipe_config, else re-read from report.recipe_path."""
    config = getattr(report, "recipe_config", None)
    if isinstance(config, dict) and config:
        return config
    if report.recipe_path and Path(report.recipe_path).is_file():
        from pipeline.validation import load_recipe

        return load_recipe(report.recipe_path, check_source=False).recipe.model_dump(mode="json")
    raise InvalidInput(f"report for {report.recipe!r} has no recipe_config and its recipe_path {report.recipe_path!r} is not readable")


# ------------------------------------------------------------- merging
def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _merge_per_device(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Device -> entry: the newer entry wins per device, but a bare ``pending`` never replaces a result."""
    out = dict(old)
    for device, entry in new.items():
        if isinstance(entry, dict) and entry.get("status") == "pending" and device in out and (out[device] or {}).get("status") != "pending":
            continue
        out[device] = entry
    return out


def _merge_artifact(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    if new.get("status") == "planned" and old.get("status") != "planned":
        return old  # "planned" carries no facts
    if not old.get("content_sha256") or old.get("content_sha256") != new.get("content_sha256"):
        return new  # other bytes (or none): the old evals and registry describe something else
    # Same content: the newer facts win, facts it lacks are kept, evals merge per device.
    out = {**old, **{k: v for k, v in new.items() if not _empty(v)}}
    out["evals"] = _merge_per_device(old.get("evals") or {}, new.get("evals") or {})
    return out


def merge_reports(old: Report | None, new: Report) -> Report:
    """One report from an older and a newer view of the same build; neither argument is changed.

    Artifacts merge by name: the newer entry wins, except that ``planned`` never replaces
    an entry, and for the same content the evals merge per device (a bare ``pending``
    never replaces a result) and empty fields keep the older value. ``baseline`` and
    ``devices`` merge per device the same way, ``tools`` and ``stages`` by name; other
    fields take the newer non-empty value. Reports of another recipe version (sha256) or
    source model (fingerprint) do not merge: the newer one is returned.
    """
    if old is None:
        return new.model_copy(deep=True)
    o, n = old.model_dump(mode="json"), new.model_dump(mode="json")
    o_fp, n_fp = (o.get("source") or {}).get("fingerprint"), (n.get("source") or {}).get("fingerprint")
    if o["recipe"] != n["recipe"] or (o["recipe_sha256"] and n["recipe_sha256"] and o["recipe_sha256"] != n["recipe_sha256"]) or (o_fp and n_fp and o_fp != n_fp):
        return new.model_copy(deep=True)
    merged_keys = ("artifacts", "stages", "baseline", "devices", "tools")
    out = {**o, **{k: v for k, v in n.items() if k not in merged_keys and not _empty(v)}}
    out["tools"] = {**o["tools"], **n["tools"]}
    out["baseline"] = _merge_per_device(o["baseline"], n["baseline"])
    out["devices"] = _merge_per_device(o["devices"], n["devices"])
    stages = {s["name"]: s for s in o["stages"]}
    stages.update({s["name"]: s for s in n["stages"]})
    out["stages"] = list(stages.values())
    arts = {a["name"]: a for a in o["artifacts"]}
    for a in n["artifacts"]:
        arts[a["name"]] = _merge_artifact(arts[a["name"]], a) if a["name"] in arts else a
    out["artifacts"] = list(arts.values())
    return Report.model_validate(out)


def report_digest(report: Report) -> str:
    """sha256 of a report's content, less the times it was written and registered."""
    data = report.model_dump(mode="json", exclude={"updated"})
    data.get("registry", {}).pop("registered", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _download_report(client, run_id: str, log: Callable[[str], Any]) -> Report | None:
    """The parent run's report.json, or None (logged) if it is missing or unreadable."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="qf-report-") as tmp:
        try:
            got = Path(client.download_artifacts(run_id, REPORT_ARTIFACT, tmp))
            return Report.model_validate_json(got.read_text())
        except (MlflowException, OSError, ValueError) as exc:
            if _is_connection_error(exc):
                raise
            log(f"registry: run {run_id} has no readable {REPORT_ARTIFACT} ({_first_line(exc)})")
            return None


# ------------------------------------------------------------ the client
class _Registrar:
    """One registration of one report; holds the client and what it has created."""

    def __init__(self, report_path: Path, report: Report, tracking_uri: str, log: Callable[[str], Any]):
        from mlflow.tracking import MlflowClient

        self.report_path = report_path
        self.report = report
        self.uri = tracking_uri
        self.log = log
        self.config = _recipe_config(report)
        self.registry_spec = self.config.get("registry") or {}
        self.user_tags = {_key(k): str(v) for k, v in (self.registry_spec.get("tags") or {}).items()}
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.counts = {"runs_created": 0, "uploads": 0, "versions_created": 0, "metrics_logged": 0}

    # -- reachability
    def check_reachable(self) -> None:
        try:
            _check_reachable(self.client)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot register now"
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> RegistryUnavailable:
        recipe = self.report.recipe_path or self.report.recipe
        first = _first_line(exc)
        return RegistryUnavailable(
            f"MLflow at {self.uri} is unreachable ({first}). Nothing was lost: the results stay on disk in "
            f"{self.report_path}; run `quantforge register {recipe}` to register them once it is up."
        )

    # -- experiment and runs
    def experiment_id(self) -> str:
        from mlflow.entities import LifecycleStage

        name = self.report.recipe
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        root = local_artifact_root(self.uri)
        location = (root / name).resolve().as_uri() if root is not None else None
        try:
            return self.client.create_experiment(name, artifact_location=location, tags={f"{TAG_PREFIX}recipe": name})
        except Exception:
            exp = self.client.get_experiment_by_name(name)  # created by a parallel job meanwhile
            if exp is None:
                raise
            return exp.experiment_id

    def _find_run(self, experiment_id: str, tags: dict[str, str]):
        filt = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=filt, max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def _create_run(self, experiment_id: str, name: str, tags: dict[str, str]):
        run = self.client.create_run(experiment_id, tags=tags, run_name=name)
        self.counts["runs_created"] += 1
        return run

    def _sync_tags(self, run, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        have = run.data.tags
        todo = [RunTag(_key(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items() if have.get(_key(k)) != str(v)[:MAX_TAG_VALUE]]
        for i in range(0, len(todo), MAX_BATCH_PARAMS_TAGS):
            self.client.log_batch(run.info.run_id, tags=todo[i : i + MAX_BATCH_PARAMS_TAGS])

    def _sync_metrics(self, run, metrics: dict[str, float]) -> None:
        """Log only metrics that are new or changed, so a re-run adds no history points."""
        from mlflow.entities import Metric

        have = run.data.metrics
        now = int(time.time() * 1000)
        todo = [Metric(k, v, now, 0) for k, v in metrics.items() if have.get(k) != v]
        for i in range(0, len(todo), MAX_BATCH_METRICS):
            self.client.log_batch(run.info.run_id, metrics=todo[i : i + MAX_BATCH_METRICS])
        self.counts["metrics_logged"] += len(todo)

    def _sync_params(self, run, params: dict[str, str]) -> list[str]:
        """Log params not yet on the run (params are immutable in MLflow); return the keys truncated."""
        from mlflow.entities import Param

        truncated = []
        todo = []
        for k, v in params.items():
            k = _key(k)
            if len(v) > MAX_PARAM_VALUE:
                truncated.append(k)
                v = v[: MAX_PARAM_VALUE - 14] + "...[truncated]"
            if k not in run.data.params:
                todo.append(Param(k, v))
        for i in range(0, len(todo), MAX_BATCH_PARAMS_TAGS):
            self.client.log_batch(run.info.run_id, params=todo[i : i + MAX_BATCH_PARAMS_TAGS])
        return truncated

    def parent_run(self, experiment_id: str):
        r = self.report
        src = r.source
        fingerprint = (src.fingerprint if src else "") or "-"
        ident = {f"{TAG_PREFIX}role": "build", f"{TAG_PREFIX}recipe_sha256": r.recipe_sha256 or "-", f"{TAG_PREFIX}source_fingerprint": fingerprint}
        run = self._find_run(experiment_id, ident)
        if run is None:
            run = self._create_run(experiment_id, f"{r.recipe}-{(r.recipe_sha256 or 'nosha')[:8]}", ident)
            self.log(f"register: created build run {run.info.run_id} in experiment {r.recipe!r}")
        else:
            self.log(f"register: reusing build run {run.info.run_id}")
        truncated = self._sync_params(run, _flatten(self.config))
        from pipeline import __version__

        tags = {
            **ident,
            f"{TAG_PREFIX}recipe": r.recipe,
            f"{TAG_PREFIX}recipe_path": r.recipe_path or "-",
            f"{TAG_PREFIX}version": r.quantforge_version or __version__,
            f"{TAG_PREFIX}git_commit": r.git_commit or "-",
            f"{TAG_PREFIX}source_model": src.model if src else "-",
            f"{TAG_PREFIX}source_revision": src.revision if src else "-",
            f"{TAG_PREFIX}source_commit": (src.commit if src else None) or "-",
            **{f"tool.{k}": v for k, v in r.tools.items()},
            **self.user_tags,
            "mlflow.note.content": self._parent_note(),
        }
        if truncated:
            tags[f"{TAG_PREFIX}params_truncated"] = f"values over {MAX_PARAM_VALUE} chars cut: " + ", ".join(truncated)
        for device, facts in r.devices.items():
            tags.update(_text_facts(facts, f"device.{device}"))
        for device, values in r.baseline.items():
            tags.update(_text_facts(values, f"baseline.{device}"))
        self._sync_tags(run, tags)
        # Baseline metrics carry the same names as the children's, so the runs table compares them.
        metrics: dict[str, float] = {}
        for device, values in r.baseline.items():
            metrics.update(_numeric_metrics(values, device))
        self._sync_metrics(run, metrics)
        return run

    def _parent_note(self) -> str:
        r = self.report
        lines = [f"**{r.recipe}** build of `{r.source.model if r.source else '?'}`"]
        if self.config.get("description"):
            lines.append(str(self.config["description"])[:2000])
        lines.append(f"recipe sha256 `{r.recipe_sha256}`; artifacts: " + ", ".join(a.name for a in r.artifacts))
        return "\n\n".join(lines)

    # -- one artifact
    def child_run(self, experiment_id: str, parent, a: ArtifactReport, name: str):
        ident = {
            f"{TAG_PREFIX}role": "artifact",
            f"{TAG_PREFIX}content_sha256": a.content_sha256,
            f"{TAG_PREFIX}artifact": a.name,
            "mlflow.parentRunId": parent.info.run_id,
        }
        run = self._find_run(experiment_id, ident)
        created = run is None
        if created:
            run = self._create_run(experiment_id, a.name, ident)
            self._sync_params(run, _flatten({"target": a.target, "kind": a.kind, "variant": a.variant, "format": a.format, "bits": a.bits, "group_size": a.group_size, "runtimes": a.runtimes}))
            self.log(f"register: {a.name}: created run {run.info.run_id}")
        passed, per_device, pending = gate_summary(a.gates)
        tags = {
            **ident,
            f"{TAG_PREFIX}recipe_sha256": self.report.recipe_sha256 or "-",
            f"{TAG_PREFIX}registered_model": name,
            f"{TAG_PREFIX}store_path": a.path or "-",
            "gate.passed": _gate_word(passed),
            "gate.pending_devices": ",".join(pending) or "-",
            **{f"gate.{d}.passed": _gate_word(p) for d, p in per_device.items()},
            **self.user_tags,
        }
        for device, values in a.evals.items():
            tags.update(_text_facts(values, f"eval.{device}"))
        self._sync_tags(run, tags)
        metrics = {}
        for device, values in a.evals.items():
            metrics.update(_numeric_metrics(values, device))
        if a.bytes is not None:
            metrics["size_mb"] = a.bytes / 2**20
        self._sync_metrics(run, metrics)
        return run, created

    def _refresh(self, run):
        return self.client.get_run(run.info.run_id)

    def upload(self, run, a: ArtifactReport, folder: Path, existing_version) -> None:
        """Put the artifact files (or a reference) under <run>/artifact, once per content."""
        if run.data.tags.get(f"{TAG_PREFIX}uploaded_sha256") == a.content_sha256:
            return
        limit_mb = float(self.registry_spec.get("upload_max_mb", 2048))
        size = a.bytes if a.bytes is not None else sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        tags: dict[str, str] = {}
        if existing_version is not None:
            # Same content already registered from another build: point at it, upload nothing.
            ref = f"models:/{existing_version.name}/{existing_version.version} ({existing_version.source})"
            tags[f"{TAG_PREFIX}artifact_ref"] = f"same content as {ref}; not uploaded again"
        elif size > limit_mb * 2**20:
            with tempfile.TemporaryDirectory(prefix="qf-ref-") as tmp:
                stub = Path(tmp)
                shutil.copy2(folder / MANIFEST, stub / MANIFEST)
                if (folder / "README.md").is_file():
                    shutil.copy2(folder / "README.md", stub / "README.md")
                (stub / "ARTIFACT_REF.json").write_text(json.dumps({
                    "store_path": str(folder), "bytes": size, "content_sha256": a.content_sha256,
                    "reason": f"{size / 2**20:.3g} MB is above registry.upload_max_mb={limit_mb:g}; files stay in the store",
                }, indent=2))
                self.client.log_artifacts(run.info.run_id, str(stub), ARTIFACT_DIR)
            tags[f"{TAG_PREFIX}artifact_ref"] = f"{folder} ({size / 2**20:.3g} MB > upload_max_mb {limit_mb:g}): manifest and reference uploaded, files not"
            self.counts["uploads"] += 1
            self.log(f"register: {a.name}: {size / 2**20:.3g} MB over upload_max_mb={limit_mb:g}; logged a reference to {folder}")
        else:
            self.client.log_artifacts(run.info.run_id, str(folder), ARTIFACT_DIR)
            self.counts["uploads"] += 1
            self.log(f"register: {a.name}: uploaded {size / 2**20:.2f} MB")
        if existing_version is None:
            self.verify(run, a, folder, referenced=f"{TAG_PREFIX}artifact_ref" in tags)
        tags[f"{TAG_PREFIX}uploaded_sha256"] = a.content_sha256
        self._sync_tags(run, tags)

    def verify(self, run, a: ArtifactReport, folder: Path, referenced: bool) -> None:
        """Download <run>/artifact back and compare every file's sha256 with the manifest (MLflow issue 18581)."""
        import mlflow.artifacts

        manifest = json.loads((folder / MANIFEST).read_text())
        expected = {row["path"]: row["sha256"] for row in manifest["files"]}
        source = f"{run.info.artifact_uri}/{ARTIFACT_DIR}"
        # Download beside the report, not in /tmp: artifacts can be GBs and /tmp may be small.
        with tempfile.TemporaryDirectory(prefix=".verify-", dir=self.report_path.parent) as tmp:
            got_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=self.uri))
            got = {p.relative_to(got_root).as_posix(): p for p in got_root.rglob("*") if p.is_file()}
            problems = []
            if MANIFEST not in got or sha256_file(got[MANIFEST]) != sha256_file(folder / MANIFEST):
                problems.append(f"{MANIFEST} missing or different")
            if referenced:
                # Files stay in the store: check them there, and that the reference arrived.
                if "ARTIFACT_REF.json" not in got:
                    problems.append("ARTIFACT_REF.json missing")
                for rel, sha in expected.items():
                    p = folder / rel
                    if not p.is_file() or sha256_file(p) != sha:
                        problems.append(f"store file {rel} missing or changed since the manifest")
                    elif rel == "README.md" and (rel not in got or sha256_file(got[rel]) != sha):
                        problems.append("README.md did not arrive")
            else:
                for rel, sha in expected.items():
                    if rel not in got:
                        problems.append(f"{rel} missing after upload")
                    elif sha256_file(got[rel]) != sha:
                        problems.append(f"{rel} sha256 differs from the manifest")
                extra = sorted(set(got) - set(expected) - {MANIFEST})
                if extra:
                    problems.append(f"unexpected files {extra}")
        if problems:
            raise StageFailed(f"{a.name}: the uploaded artifact at {source} does not match its manifest: " + "; ".join(problems[:10]) + "; no model version was created")
        self.log(f"register: {a.name}: download verified ({len(expected)} files match the manifest)")

    def registered_model(self, name: str, a: ArtifactReport) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        src = self.report.source
        tags = {
            "recipe": self.report.recipe, "target": a.target, "kind": a.kind, "variant": a.variant or "-",
            "source_model": src.model if src else "-", **self.user_tags,
        }
        desc = f"{a.kind} artifact '{a.target}'" + (f" ({a.variant})" if a.variant else "") + f" of {src.model if src else 'the source model'}, built by quantforge recipe '{self.report.recipe}'."
        try:
            self.client.create_registered_model(name, tags=tags, description=desc)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a parallel job made it
                raise

    def find_version(self, name: str, content_sha256: str):
        found = self.client.search_model_versions(f"name = {_quote(name)} and tags.content_sha256 = {_quote(content_sha256)}")
        return min(found, key=lambda v: int(v.version)) if found else None

    def version_tags(self, a: ArtifactReport, run, folder: Path) -> dict[str, str]:
        src = self.report.source
        passed, per_device, pending = gate_summary(a.gates)
        tags = {
            "content_sha256": a.content_sha256,
            "artifact": a.name, "target": a.target, "kind": a.kind, "variant": a.variant or "-",
            "format": a.format or "-", "bits": _tag(a.bits), "group_size": _tag(a.group_size),
            "runtimes": ",".join(a.runtimes) or "-", "bytes": _tag(a.bytes),
            "recipe": self.report.recipe, "recipe_sha256": self.report.recipe_sha256 or "-",
            "source_model": src.model if src else "-", "source_revision": src.revision if src else "-",
            "source_commit": (src.commit if src else None) or "-",
            "store_path": str(folder),
            "gate.passed": _gate_word(passed), "gate.pending_devices": ",".join(pending) or "-",
            **{f"gate.{d}.passed": _gate_word(p) for d, p in per_device.items()},
            **self.user_tags,
        }
        ref = run.data.tags.get(f"{TAG_PREFIX}artifact_ref")
        if ref:
            tags["artifact_ref"] = ref
        for device, values in a.evals.items():
            for k, v in _numeric_metrics(values, device).items():
                tags[k] = repr(v)
            runtime = values.get("runtime")
            if runtime:
                tags[f"{device}.runtime"] = str(runtime)
            if values.get("status") and values.get("status") != "done":
                tags[f"{device}.status"] = str(values["status"])
        return {_key(k): v for k, v in tags.items()}

    def version_description(self, a: ArtifactReport, folder: Path) -> str:
        """Markdown shown on the version page: metrics per device and the gate, kept current."""
        src = self.report.source
        passed, per_device, pending = gate_summary(a.gates)
        lines = [f"**{a.name}**: {a.kind}" + (f" {a.variant}" if a.variant else "") + f" of `{src.model if src else '?'}`"
                 f" ({a.format or '?'}, {a.bits or '?'} bits, runtimes {', '.join(a.runtimes) or '?'}); recipe `{self.report.recipe}`.", ""]
        devices = [d for d in a.evals if _numeric_metrics(a.evals[d], d)]
        if devices:
            rows: dict[str, dict[str, float]] = {}
            for d in devices:
                for k, v in _numeric_metrics(a.evals[d], "").items():
                    rows.setdefault(k.lstrip("."), {})[d] = v
            lines.append("| metric | " + " | ".join(devices) + " |")
            lines.append("|---|" + "---|" * len(devices))
            lines.append("| runtime | " + " | ".join(str(a.evals[d].get("runtime", "")) for d in devices) + " |")
            for k, vals in rows.items():
                lines.append(f"| {k} | " + " | ".join(f"{vals[d]:.6g}" if d in vals else "" for d in devices) + " |")
            lines.append("")
        gate = "passed" if passed is True else ("failed" if passed is False else "undecided")
        lines.append(f"Gates: **{gate}**" + "".join(f"; {d}: {_gate_word(p)}" for d, p in per_device.items()) + (f"; pending: {', '.join(pending)}" if pending else "") + ".")
        if (folder / "README.md").is_file():
            lines.append("")
            lines.append(f"Model card: `{ARTIFACT_DIR}/README.md` in this version's files.")
        return "\n".join(lines)

    def version(self, name: str, a: ArtifactReport, run, folder: Path, existing):
        desc = self.version_description(a, folder)
        if existing is not None:
            mv = existing
            if (mv.description or "") != desc:
                self.client.update_model_version(name, mv.version, description=desc)
        else:
            mv = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id, description=desc, tags={"content_sha256": a.content_sha256})
            self.counts["versions_created"] += 1
            self.log(f"register: {a.name}: created {name} version {mv.version}")
        have = mv.tags or {}
        tags = self.version_tags(a, run, folder)
        if str(mv.run_id) != run.info.run_id:
            # An older version with the same content: its files are at its own source; this
            # run's "same content as ..." note is not a reference to be copied onto it.
            tags.pop("artifact_ref", None)
        for k, v in tags.items():
            if have.get(k) != v:
                self.client.set_model_version_tag(name, mv.version, k, v)
        return mv

    def aliases(self, name: str, mv, a: ArtifactReport) -> list[str]:
        from mlflow.exceptions import MlflowException

        def current(alias: str) -> str | None:
            try:
                return str(self.client.get_model_version_by_alias(name, alias).version)
            except MlflowException:
                return None

        version = str(mv.version)  # int from a SQL store, str from a server
        if not promotion_enabled():
            self.log(f"register: {a.name}: QUANTFORGE_PROMOTE=false (e.g. a pull request build): no alias moved")
            return sorted(self.client.get_model_version(name, version).aliases or [])
        if current(CANDIDATE_ALIAS) != version:
            self.client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
        promo = self.registry_spec.get("promotion_alias") or "production"
        passed, _, pending = gate_summary(a.gates)
        where = current(promo)
        if promotable(a.gates):
            if where != version:
                self.client.set_registered_model_alias(name, promo, version)
                self.log(f"register: {a.name}: gates passed on every device; {promo!r} -> {name} v{version} (was {'v' + where if where else 'unset'})")
        else:
            why = f"pending on {', '.join(pending)}" if pending else ("failed" if passed is False else "not decided")
            self.log(f"register: {a.name}: gates {why}; {promo!r} stays on {'v' + where if where else 'nothing'}")
        return sorted(self.client.get_model_version(name, version).aliases or [])

    # -- the whole report
    def run(self) -> dict[str, dict]:
        self.check_reachable()
        exp_id = self.experiment_id()
        parent = self.parent_run(exp_id)
        results: dict[str, dict] = {}
        failures: list[str] = []
        plots = sorted(p for p in self.report_path.parent.glob("*.png") if p.is_file())
        self._log_plots(parent, plots)
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
                failures.append(f"{a.name}: {folder} has no {MANIFEST}")
                continue
            name = model_name_for(self.config, self.report.recipe, a)
            run = None
            try:
                run, _ = self.child_run(exp_id, parent, a, name)
                self._log_meta(run, a, plots)
                self.registered_model(name, a)
                existing = self.find_version(name, a.content_sha256)
                self.upload(run, a, folder, existing)
                run = self._refresh(run)
                mv = self.version(name, a, run, folder, existing)
                aliases = self.aliases(name, mv, a)
                if run.info.status != "FINISHED":  # new, or FAILED by an earlier mismatch
                    self.client.set_terminated(run.info.run_id, "FINISHED")
            except StageFailed as exc:
                failures.append(str(exc))
                if run is not None:
                    self.client.set_terminated(run.info.run_id, "FAILED")
                continue
            results[a.name] = {
                "name": name, "version": str(mv.version), "run_id": run.info.run_id, "aliases": aliases,
                "uri": f"models:/{name}/{mv.version}", "content_sha256": a.content_sha256,
            }
        self._log_report(exp_id, parent, results)
        if parent.info.status == "RUNNING":
            self.client.set_terminated(parent.info.run_id, "FAILED" if failures else "FINISHED")
        self.experiment = exp_id
        self.parent_id = parent.info.run_id
        self.failures = failures
        return results

    def _log_report(self, experiment_id: str, parent, results: dict[str, dict]) -> None:
        """Merge this report into the parent run's report.json; upload only when the merge changed it.

        The report uploaded says where each artifact was registered (artifact.registry), which
        is what ``pull_report`` follows. Read-merge-write is not atomic across machines: two jobs
        registering the same build in the same second can lose one part (re-registering repairs it).
        """
        mine = self.report.model_copy(deep=True)
        for a in mine.artifacts:
            for note in LOCAL_NOTES:
                (a.model_extra or {}).pop(note, None)
            res = results.get(a.name)
            if res and a.content_sha256 == res["content_sha256"]:
                a.registry = {k: v for k, v in res.items() if k != "content_sha256"}
        mine.registry = {"tracking_uri": self.uri, "experiment_id": experiment_id, "experiment_name": mine.recipe, "parent_run_id": parent.info.run_id}
        parent = self._refresh(parent)  # another job may have merged its part since this run was read
        remote = None
        if parent.data.tags.get(REPORT_TAG):
            remote = _download_report(self.client, parent.info.run_id, self.log)
        merged = merge_reports(remote, mine)
        digest = report_digest(merged)
        if parent.data.tags.get(REPORT_TAG) == digest:
            return
        merged.registry["registered"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with tempfile.TemporaryDirectory(prefix="qf-report-") as tmp:
            f = Path(tmp) / Path(REPORT_ARTIFACT).name
            f.write_text(json.dumps(merged.model_dump(mode="json"), indent=2, default=str))
            self.client.log_artifact(parent.info.run_id, str(f), str(Path(REPORT_ARTIFACT).parent))
        self._sync_tags(parent, {REPORT_TAG: digest})
        self.log(f"register: merged report.json on build run {parent.info.run_id}: {', '.join(a.name for a in merged.artifacts if a.registry) or 'no'} artifact(s) registered so far")

    def _log_plots(self, run, plots: list[Path]) -> None:
        if not plots:
            return
        digest = _tree_sha256(plots)
        if run.data.tags.get(f"{TAG_PREFIX}plots_sha256") == digest:
            return
        for p in plots:
            self.client.log_artifact(run.info.run_id, str(p), "plots")
        self._sync_tags(run, {f"{TAG_PREFIX}plots_sha256": digest})

    def _log_meta(self, run, a: ArtifactReport, plots: list[Path]) -> None:
        """The report excerpt and plots on the child run; re-uploaded only when they change."""
        r = self.report
        excerpt = {
            "recipe": r.recipe, "recipe_sha256": r.recipe_sha256,
            "source": r.source.model_dump(mode="json", exclude={"config"}) if r.source else None,
            "baseline": r.baseline, "devices": r.devices,
            "artifact": a.model_dump(mode="json", exclude={"registry"}),
        }
        text = json.dumps(excerpt, indent=2, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if run.data.tags.get(f"{TAG_PREFIX}excerpt_sha256") != digest:
            with tempfile.TemporaryDirectory(prefix="qf-excerpt-") as tmp:
                (Path(tmp) / "report_excerpt.json").write_text(text)
                self.client.log_artifact(run.info.run_id, str(Path(tmp) / "report_excerpt.json"), "quantforge")
            self._sync_tags(run, {f"{TAG_PREFIX}excerpt_sha256": digest})
        self._log_plots(run, plots)


def register_report(report_path: Path, tracking_uri: str | None = None, log: Callable[[str], Any] = print) -> Report:
    """Register report.json's built artifacts in MLflow and record where they went in the report.

    ``tracking_uri``: explicit server or store; else $MLFLOW_TRACKING_URI; else the local
    SQLite store under the artifacts dir (the folder above ``<recipe>/report.json``).
    Raises RegistryUnavailable if the tracking server cannot be reached (quickly), and
    StageFailed if an upload did not come back identical (that artifact gets no version;
    the others are registered and recorded).
    """
    report_path = Path(report_path).resolve()
    report = read_report(report_path)
    if report is None:
        raise InvalidInput(f"{report_path}: no report; build the recipe first")
    artifacts_dir = report_path.parent.parent
    uri = tracking_uri_for(artifacts_dir, tracking_uri)
    reg = _Registrar(report_path, report, uri, log)
    try:
        # MLflow prints run URLs to stdout and draws progress bars; our log says what happened.
        with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            results = reg.run()
    except RegistryUnavailable:
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            raise reg.unavailable(exc) from exc
        raise
    with updating(report_path, report.recipe) as rep:
        rep.registry = {
            "tracking_uri": uri, "experiment_id": reg.experiment, "experiment_name": report.recipe,
            "parent_run_id": reg.parent_id, "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for art in rep.artifacts:
            res = results.get(art.name)
            # Only if the artifact on disk is still the content that was registered.
            if res and art.content_sha256 == res["content_sha256"]:
                art.registry = {k: v for k, v in res.items() if k != "content_sha256"}
        final = rep
    c = reg.counts
    log(f"register: {len(results)} artifact(s) in {uri}: {c['runs_created']} run(s), {c['uploads']} upload(s), {c['versions_created']} version(s) created, {c['metrics_logged']} metric value(s) logged")
    if _is_http(uri):
        log(f"register: browse {uri.rstrip('/')}/#/experiments/{reg.experiment}/runs/{reg.parent_id} and {uri.rstrip('/')}/#/models")
    if reg.failures:
        raise StageFailed("registration incomplete:\n" + "\n".join(reg.failures))
    return final


# ------------------------------------------------------------------ pull
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


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


def _tree_problems(root: Path, manifest: dict, content_sha256: str | None) -> list[str]:
    """What differs between a downloaded folder and its manifest (and the report's content hash)."""
    problems = []
    rows = manifest.get("files") or []
    expected = {row["path"]: row for row in rows}
    got = {row["path"]: row for row in file_table(root)}
    for rel, row in expected.items():
        if rel not in got:
            problems.append(f"{rel} missing")
        elif got[rel]["sha256"] != row["sha256"] or got[rel]["bytes"] != row["bytes"]:
            problems.append(f"{rel} sha256 differs from the manifest")
    extra = sorted(set(got) - set(expected))
    if extra:
        problems.append(f"unexpected files {extra[:5]}")
    if content_hash(rows) != manifest.get("content_sha256"):
        problems.append("the manifest's file table does not hash to its content_sha256")
    if content_sha256 and manifest.get("content_sha256") != content_sha256:
        problems.append(f"manifest content_sha256 {str(manifest.get('content_sha256'))[:12]} is not the report's {content_sha256[:12]}")
    for field in ("kind", "key"):
        if not _SAFE_NAME.match(str(manifest.get(field) or "")):
            problems.append(f"manifest {field} {manifest.get(field)!r} is not a store name")
    return problems


class _Puller:
    def __init__(self, recipe: str, artifacts_dir: Path, tracking_uri: str, recipe_sha256: str | None, log: Callable[[str], Any]):
        from mlflow.tracking import MlflowClient

        self.recipe, self.dir, self.uri, self.sha, self.log = recipe, artifacts_dir, tracking_uri, recipe_sha256, log
        self.store = Store(artifacts_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.counts = {"downloaded": 0, "present": 0, "not_pulled": 0, "bytes": 0}
        self.failures: list[str] = []

    def unavailable(self, exc: BaseException) -> RegistryUnavailable:
        return RegistryUnavailable(f"MLflow at {self.uri} is unreachable ({_first_line(exc)}). Nothing was pulled; run `quantforge pull` again once it is up.")

    def parent_run(self):
        from mlflow.entities import LifecycleStage

        exp = self.client.get_experiment_by_name(self.recipe)
        if exp is None or exp.lifecycle_stage == LifecycleStage.DELETED:
            names = sorted(e.name for e in self.client.search_experiments(max_results=100) if e.name != "Default")
            raise InvalidInput(f"nothing registered for recipe {self.recipe!r} in {self.uri} (no experiment of that name; "
                               f"experiments there: {', '.join(names) or 'none'}). Register a build of it first: `quantforge register RECIPE`.")
        filt = f"tags.`{TAG_PREFIX}role` = 'build'"
        if self.sha:
            filt += f" and tags.`{TAG_PREFIX}recipe_sha256` = {_quote(self.sha)}"
        runs = self.client.search_runs([exp.experiment_id], filter_string=filt, max_results=100, order_by=["attributes.start_time DESC"])
        with_report = [r for r in runs if r.data.tags.get(REPORT_TAG)]
        if with_report:
            return with_report[0]
        if self.sha:
            others = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_PREFIX}role` = 'build'", max_results=10, order_by=["attributes.start_time DESC"])
            shas = [r.data.tags.get(f"{TAG_PREFIX}recipe_sha256", "?")[:12] for r in others]
            raise InvalidInput(f"no build of recipe {self.recipe!r} with recipe sha256 {self.sha[:12]} is registered in {self.uri} "
                               f"(registered builds: {', '.join(shas) or 'none'}): the recipe changed since, or its build job has not registered yet")
        raise InvalidInput(f"recipe {self.recipe!r} in {self.uri} has no build run with a {REPORT_ARTIFACT} (registered by an older quantforge?): run `quantforge register` for it again")

    def run(self) -> Path:
        from mlflow.exceptions import MlflowException

        try:
            _check_reachable(self.client)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot pull now"
            raise self.unavailable(exc) from None
        parent = self.parent_run()
        remote = _download_report(self.client, parent.info.run_id, self.log)
        if remote is None:
            raise StageFailed(f"build run {parent.info.run_id} of {self.recipe!r} in {self.uri}: {REPORT_ARTIFACT} could not be read")
        self.log(f"pull: {self.recipe}: build run {parent.info.run_id} (recipe sha256 {remote.recipe_sha256[:12]})")
        for a in remote.artifacts:
            if a.status != "built":
                continue
            if not a.registry.get("name") or not a.registry.get("version"):
                self.not_pulled(a, "built but not registered (its registration failed or has not run)")
                continue
            try:
                self.pull_one(a)
            except StageFailed as exc:
                self.failures.append(str(exc))
                self.not_pulled(a, str(exc), quiet=True)
            except MlflowException as exc:  # e.g. the version was deleted since
                if _is_connection_error(exc):
                    raise
                self.failures.append(f"{a.name}: models:/{a.registry['name']}/{a.registry['version']}: {_first_line(exc)}")
                self.not_pulled(a, self.failures[-1], quiet=True)
        rpath = report_path_for(self.dir, self.recipe)
        with updating(rpath, self.recipe) as rep:
            merged = merge_reports(rep, remote)
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
        # No local folder: path None makes eval and register pass it by (the merge keeps the
        # build machine's path in the registry's report).
        a.path = None
        _note(a, False, reason, a.registry.get("uri"))
        self.counts["not_pulled"] += 1
        if not quiet:
            self.log(f"pull: {a.name}: NOT PULLED: {reason}")

    def pull_one(self, a: ArtifactReport) -> None:
        import mlflow.artifacts

        uri = f"models:/{a.registry['name']}/{a.registry['version']}"
        # Already here? The report's path ends in <kind>/<key[:24]> and stage_key is the key: no request needed.
        if a.path and a.stage_key:
            kind = Path(a.path).parent.name
            have = self.store.get(kind, a.stage_key) if _SAFE_NAME.match(kind) else None
            folder = self.store.path_for(kind, a.stage_key)
            if have and have.get("content_sha256") == a.content_sha256 and _sizes_match(folder, have):
                a.path = str(folder)
                _note(a, True, source=uri)
                self.counts["present"] += 1
                self.log(f"pull: {a.name}: already in the store at {folder}")
                return
        mv = self.client.get_model_version(a.registry["name"], str(a.registry["version"]))
        listing = mlflow.artifacts.list_artifacts(artifact_uri=mv.source, tracking_uri=self.uri)
        if any(Path(f.path).name == "ARTIFACT_REF.json" for f in listing):
            where = (mv.tags or {}).get("artifact_ref") or "see ARTIFACT_REF.json in the version's files"
            self.not_pulled(a, f"registered by reference only (above registry.upload_max_mb), its files were not uploaded: {where}")
            return
        tmp = self.store.new_tmp("pull", a.content_sha256 or a.name)
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=self.uri))
            try:
                manifest = json.loads((got / MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                raise StageFailed(f"{a.name}: {uri} has no readable {MANIFEST} ({_first_line(exc)}); nothing was pulled for it") from None
            problems = _tree_problems(got, manifest, a.content_sha256)
            if problems:
                raise StageFailed(f"{a.name}: the files of {uri} ({mv.source}) do not match their manifest: " + "; ".join(problems[:10]) + "; nothing was pulled for it")
            kind, key = manifest["kind"], manifest["key"]
            final = self.store.path_for(kind, key)
            with self.store.lock(key):
                have = self.store.get(kind, key)
                if have and have.get("content_sha256") == manifest["content_sha256"] and _sizes_match(final, have):
                    self.counts["present"] += 1  # another pull (or the build) put it there meanwhile
                else:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    if final.exists():
                        # A leftover, or another build of the same key: the registered bytes replace it.
                        self.log(f"pull: {a.name}: replacing {final} ({'content ' + str(have.get('content_sha256'))[:12] if have else 'no valid manifest'}) with the registered content")
                        os.rename(final, tmp / "replaced")
                    os.rename(got, final)
                    self.counts["downloaded"] += 1
                    self.counts["bytes"] += int(manifest.get("bytes") or 0)
                    self.log(f"pull: {a.name}: {uri} -> {final} ({len(manifest['files'])} files verified against the manifest)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        a.path = str(final)
        _note(a, True, source=uri)


def pull_report(recipe_name: str, artifacts_dir: Path, tracking_uri: str | None = None, recipe_sha256: str | None = None,
                log: Callable[[str], Any] = print) -> Path:
    """Bring a registered build to this machine: the merged report.json and the registered files.

    Finds experiment ``recipe_name`` and its newest build run (with ``recipe_sha256``, if
    given), downloads its report.json, then every built and registered artifact's version
    files into ``<artifacts_dir>/store/<kind>/<key[:24]>/`` (kind and key from the manifest;
    every file's sha256 checked; temp folder under ``store/.tmp`` renamed into place), and
    merges the report into ``<artifacts_dir>/<recipe>/report.json`` with local paths.
    Artifacts already in the store are not downloaded again. Artifacts registered by reference
    (above upload_max_mb) or not registered are left with ``pulled: false`` and a reason.

    Raises RegistryUnavailable (quickly) if the server is unreachable, InvalidInput for an
    unknown recipe or build, StageFailed if a download does not match its manifest (the
    others are pulled and recorded; nothing is left for that one). Returns the report's path.
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    uri = tracking_uri_for(artifacts_dir, tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise InvalidInput(f"no MLflow store at {uri}: pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the server the build jobs registered into")
    puller = _Puller(recipe_name, artifacts_dir, uri, recipe_sha256, log)
    try:
        with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            return puller.run()
    except (RegistryUnavailable, InvalidInput, StageFailed):
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            raise puller.unavailable(exc) from exc
        raise
