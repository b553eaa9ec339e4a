"""report.json: the typed result that build, eval, register and pull hand each other.

Written to ``<artifacts-dir>/<recipe name>/report.json``. The models below are
what the writers construct and what the readers (gates, tables, plots, the HTML
report, MLflow registration, CI summaries) read, so a field cannot be written
under one name and read under another. Unknown keys are kept (``Loose``): a
report written by a newer quantforge survives a read-modify-write by an older one.

Each job merges its part into what is there (:func:`updating`: read, modify,
write atomically under a file lock); :func:`merge_reports` is the one rule for
combining two views of the same build (a local report and the one registered in
MLflow), used by register and pull.

Format version 2 (quantforge 0.2): evals are typed entries with a flat
``metrics`` summary; gates carry a list of checks; recommendations per device.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_VERSION = 2


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    #: where the weights came from when not a plain HF checkpoint (a GGUF file: its sha256,
    #: tensor types, and that the source itself was quantized)
    lineage: dict[str, Any] = {}
    #: bits per weight of the source folder as evaluated (evals.bits)
    bpw_linear: float | None = None
    bpw_model: float | None = None
    bpw_detail: dict[str, Any] = {}


# ------------------------------------------------------------------ evals
class Metrics(Loose):
    """The flat per-device summary of one model's evaluation: what gates, tables, plots,
    recommendations and MLflow metrics read. Units are in the names."""

    size_bytes: int | None = None
    perplexity: float | None = None
    delta_ppl_pct: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_err: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p90: float | None = None
    kl_p95: float | None = None
    kl_p99: float | None = None
    kl_p999: float | None = None
    kl_max: float | None = None
    top1_agreement_pct: float | None = None
    rms_dp_pct: float | None = None
    #: standard errors, as llama-perplexity prints them (±): of delta_ppl_pct (in points of %) and of kl_mean
    delta_ppl_pct_err: float | None = None
    kl_mean_err: float | None = None
    #: bits per weight of the artifact's files (copied from its report entry, so MLflow logs them with the rest)
    bpw_linear: float | None = None
    bpw_model: float | None = None
    task_accuracy: float | None = None  # mean over the recipe's tasks
    task_recovery_pct: float | None = None  # task_accuracy / the source's, in %
    prefill_tps: float | None = None
    decode_tps: float | None = None
    ttft_s: float | None = None
    decode_speedup: float | None = None
    roofline_pct: float | None = None  # decode_tps as % of decode_bound_tps
    decode_bound_tps: float | None = None  # batch-1 decode ceiling: bandwidth / the format's stored bytes per token
    peak_rss_mib: float | None = None
    peak_vram_mib: float | None = None

    def values(self) -> dict[str, float]:
        """The measured ones (None dropped), for tables and MLflow."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TaskScore(Loose):
    """One lm-evaluation-harness task on one model and device."""

    task: str
    metric: str = "acc"
    value: float
    stderr: float | None = None
    samples: int | None = None
    delta: float | None = None  # value - the source's value (absolute)
    delta_stderr: float | None = None  # paired: over the same items as the source
    flipped: int | None = None  # items whose correctness differs from the source's
    recovery_pct: float | None = None  # 100 * value / the source's value


EvalStatus = Literal["done", "failed", "skipped", "pending"]


class EvalEntry(Loose):
    """One model (the source or an artifact) evaluated on one device."""

    status: EvalStatus = "pending"
    reason: str | None = None
    runtime: str | None = None  # the runtime accuracy was measured with
    speed_runtime: str | None = None  # the runtime speed was measured with (may differ: vLLM on GPUs)
    fingerprint: str | None = None  # the device fingerprint's hash
    threads: int | None = None
    dequantized: bool | None = None  # low-bit weights were expanded to floats to run (no low-bit kernels)
    metrics: Metrics = Metrics()
    tasks: dict[str, TaskScore] = {}
    accuracy: dict[str, Any] = {}  # the raw accuracy record (method, windows, ...)
    speed: dict[str, Any] = {}  # the raw speed record (runs, spreads, memory)
    roofline: dict[str, Any] = {}
    speed_reason: str | None = None
    #: what metrics.decode_speedup compares: "within transformers" (artifact and source in one runtime);
    #: when the runtimes differ, why there is no speed-up (a speed gate on it is unverified, not failed)
    speedup_basis: str | None = None
    tasks_reason: str | None = None
    stage_key: str | None = None  # the eval stage's cache key (lineage)


class DeviceInfo(Loose):
    status: Literal["done", "pending"] = "pending"
    reason: str | None = None
    fingerprint: dict[str, Any] = {}
    fingerprint_hash: str | None = None
    bandwidth: dict[str, Any] = {}
    suite: str | None = None
    suite_fingerprint: str | None = None


# ------------------------------------------------------------------ gates
class GateCheck(Loose):
    name: str
    device: str
    value: float | None = None
    threshold: float | None = None
    passed: bool
    reason: str | None = None
    #: the value's standard error, where the measure has one (Δppl, mean KL)
    err: float | None = None
    #: True: the threshold lies outside value ± GATE_Z standard errors (the verdict holds at about 95 %);
    #: False: inside (the verdict could flip on more text); None: no error known
    clear: bool | None = None
    #: False: the value cannot be compared with the threshold here (a speed-up across runtimes);
    #: the check then leaves the gate unverified rather than failed
    comparable: bool | None = None


GateStatus = Literal["passed", "failed", "pending", "unverified"]


class GateResult(Loose):
    """May an artifact be promoted? ``passed`` is True, False, or None (undecided: pending/unverified)."""

    status: GateStatus = "pending"
    passed: bool | None = None
    checks: list[GateCheck] = []
    pending_devices: list[str] = []
    required_devices: list[str] = []

    def per_device(self) -> dict[str, bool | None]:
        """device -> passed (False if any check failed there; None while pending or unverified)."""
        out: dict[str, bool | None] = {}
        for c in self.checks:
            if c.name == "evaluated" or c.comparable is False:
                out[c.device] = None if out.get(c.device) is not False else False
                continue
            if not c.passed:
                out[c.device] = False
            else:
                out.setdefault(c.device, True)
        for d in self.pending_devices:
            out.setdefault(d, None)
        return out

    @property
    def promotable(self) -> bool:
        """Promote only when the gates passed on every required device and none is pending."""
        return self.passed is True and not self.pending_devices


class Recommendation(Loose):
    """The artifact to ship on one device: the best that passes the gates, and the Pareto front."""

    device: str
    artifact: str | None = None  # None: nothing passes
    criterion: str = "smallest"
    reason: str = ""
    pareto: list[str] = []  # artifacts on the size/speed vs KL front
    #: which front `pareto` is: "size vs KL divergence" or "decode speed vs KL divergence"
    front: str | None = None
    #: artifacts on the linear-layer bits per weight vs KL front (compare formats at equal bits)
    pareto_bits: list[str] = []


# ---------------------------------------------------------------- registry
class RegistryEntry(Loose):
    """Where one artifact was registered."""

    name: str | None = None
    version: str | None = None
    uri: str | None = None  # models:/<name>/<version>
    run_id: str | None = None
    aliases: list[str] = []


# --------------------------------------------------------------- artifacts
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
    runtimes: list[str] = []  # serving runtimes that load it
    bits: int | None = None
    group_size: int | str | None = None
    build_seconds: float | None = None
    #: facts the build recorded about the file (tensor types, fallbacks, verification)
    build_facts: dict[str, Any] = {}
    #: bits per weight counted from the artifact's files (evals.bits): the decoder blocks' linear
    #: layers alone, and every stored tensor over every parameter; bpw_detail has the counts
    bpw_linear: float | None = None
    bpw_model: float | None = None
    bpw_detail: dict[str, Any] = {}
    evals: dict[str, EvalEntry] = {}
    gates: GateResult | None = None
    registry: RegistryEntry | None = None


class StageRecord(Loose):
    name: str
    kind: str
    key: str | None = None
    status: Literal["hit", "built", "failed", "skipped"]
    seconds: float = 0.0  # this run's (0 for a hit)
    built_seconds: float | None = None  # what building it took, from its manifest (also for a hit)
    reason: str | None = None
    target: str | None = None
    log: str | None = None
    # Where and when it ran: host, node (a Ray node id; the host name locally), process id,
    # UTC start and end (ISO 8601, ms): overlapping intervals are stages that ran at once.
    host: str | None = None
    node: str | None = None
    pid: int | None = None
    started: str | None = None
    ended: str | None = None


class RegistryInfo(Loose):
    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    parent_run_id: str | None = None
    registered: str | None = None


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
    #: device -> the source model's own evaluation on that device
    baseline: dict[str, EvalEntry] = {}
    devices: dict[str, DeviceInfo] = {}
    recommendations: dict[str, Recommendation] = {}
    artifacts: list[ArtifactReport] = []
    stages: list[StageRecord] = []
    registry: RegistryInfo = RegistryInfo()
    updated: str = Field(default_factory=_now)

    def artifact(self, name: str) -> ArtifactReport | None:
        return next((a for a in self.artifacts if a.name == name), None)

    def built(self) -> list[ArtifactReport]:
        return [a for a in self.artifacts if a.status == "built"]

    def upsert_artifact(self, entry: ArtifactReport) -> ArtifactReport:
        """Replace the build facts of an artifact, keeping evals/gates/registry of the same content."""
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
    if not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and int(data.get("report_version") or 1) < REPORT_VERSION:
        # A version-1 report (quantforge 0.1): its evals were untyped dicts. The builds it
        # records are still in the store; its evals are measured again by `quantforge eval`.
        for a in data.get("artifacts") or []:
            a["evals"], a["gates"], a["registry"] = {}, None, None
        data["baseline"], data["devices"], data["registry"] = {}, {}, {}
        data["report_version"] = REPORT_VERSION
    return Report.model_validate(localize_paths(data, Path(path)))


# Paths a report holds: stored relative to the artifacts dir (``<artifacts>/<recipe>/report.json``)
# when they are inside it, so the file names no machine's folders and a moved or downloaded
# artifacts dir still resolves; read back as absolute paths, so readers see what they always saw.
def _path_fields(data: dict) -> list[tuple[dict, str]]:
    out = []
    if isinstance(data.get("source"), dict):
        out.append((data["source"], "path"))
    out += [(a, "path") for a in data.get("artifacts") or [] if isinstance(a, dict)]
    out += [(s, "log") for s in data.get("stages") or [] if isinstance(s, dict)]
    return [(d, k) for d, k in out if isinstance(d.get(k), str) and d[k]]


def portable_paths(data: dict, report_file: Path) -> dict:
    """`data` (a dumped report) with the paths inside the artifacts dir made relative to it."""
    base = Path(report_file).resolve().parent.parent
    for d, k in _path_fields(data):
        p = Path(d[k])
        if p.is_absolute() and p.resolve().is_relative_to(base):
            d[k] = p.resolve().relative_to(base).as_posix()
    return data


def localize_paths(data: dict, report_file: Path) -> dict:
    """`data` (a report as stored) with relative paths resolved against its artifacts dir."""
    if isinstance(data, dict):
        base = Path(report_file).resolve().parent.parent
        for d, k in _path_fields(data):
            if not Path(d[k]).is_absolute():
                d[k] = str(base / d[k])
    return data


@contextlib.contextmanager
def updating(path: Path, recipe_name: str) -> Iterator[Report]:
    """Read-modify-write the report under a lock, so parallel jobs don't lose each other's parts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        # Temp files are written under this lock: any found now belong to a writer that died.
        for stale in path.parent.glob(".report-*.json"):
            stale.unlink(missing_ok=True)
        report = read_report(path) or Report(recipe=recipe_name)
        yield report
        report.updated = _now()
        write_report(path, report)


def write_report(path: Path, report: Report) -> None:
    """Atomically (temp file + rename), readable by everyone who can read the folder."""
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(portable_paths(report.model_dump(mode="json"), path), indent=2, sort_keys=False, default=str))
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a report is meant to be read by other jobs and people.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- merging
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
    never replaces a result) and empty fields keep the older value. ``baseline``,
    ``devices`` and ``recommendations`` merge per device the same way, ``tools`` and
    ``stages`` by name; other fields take the newer non-empty value. Reports of another
    recipe version (sha256) or source model (fingerprint) do not merge: the newer one is
    returned.
    """
    if old is None:
        return new.model_copy(deep=True)
    o, n = old.model_dump(mode="json"), new.model_dump(mode="json")
    o_fp, n_fp = (o.get("source") or {}).get("fingerprint"), (n.get("source") or {}).get("fingerprint")
    if o["recipe"] != n["recipe"] or (o["recipe_sha256"] and n["recipe_sha256"] and o["recipe_sha256"] != n["recipe_sha256"]) or (o_fp and n_fp and o_fp != n_fp):
        return new.model_copy(deep=True)
    merged_keys = ("artifacts", "stages", "baseline", "devices", "recommendations", "tools", "registry")
    out = {**o, **{k: v for k, v in n.items() if k not in merged_keys and not _empty(v)}}
    out["tools"] = {**o["tools"], **n["tools"]}
    out["registry"] = {**o["registry"], **{k: v for k, v in n["registry"].items() if not _empty(v)}}
    for key in ("baseline", "devices", "recommendations"):
        out[key] = _merge_per_device(o[key], n[key])
    stages = {s["name"]: s for s in o["stages"]}
    stages.update({s["name"]: s for s in n["stages"]})
    out["stages"] = list(stages.values())
    arts = {a["name"]: a for a in o["artifacts"]}
    for a in n["artifacts"]:
        arts[a["name"]] = _merge_artifact(arts[a["name"]], a) if a["name"] in arts else a
    out["artifacts"] = list(arts.values())
    return Report.model_validate(out)


def report_digest(report: Report) -> str:
    """sha256 of a report's content, less the times it was written and registered, and less
    whether this run built its stages or found them built: a warm rerun says nothing new."""
    data = report.model_dump(mode="json", exclude={"updated"})
    data.get("registry", {}).pop("registered", None)
    for stage in data.get("stages", []):
        stage.pop("seconds", None)
        if stage.get("status") == "hit":
            stage["status"] = "built"
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
