"""Report variants for the registry tests, derived from one real build + eval with the typed models.

Nothing here writes an eval or gate by hand: results come from the real eval job
(``tests/registry/conftest.py::real_report``), decisions from the eval job's own
functions (``evals.gates.evaluate_gates``, ``evals.recommend.recommend``), new bytes
from the store's own commit. Nothing here imports mlflow.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from pipeline.core.report import ArtifactReport, DeviceInfo, EvalEntry, Report, report_path, write_report
from pipeline.core.store import MANIFEST, Store
from pipeline.recipe import Recipe

FP8, GGUF = "fp8", "gguf-Q8_0"

RECIPE = """\
name: regmini
source: {model: builtin:tiny-llama-mini, dtype: bfloat16}
calibration: {dataset: builtin, samples: 16, seq_len: 128}
targets:
  - {name: fp8, kind: fp8, scheme: dynamic}
  - {name: gguf, kind: gguf, quants: [Q8_0], pre_tokenizer: gpt-2}
evals: {devices: [cpu], max_windows: 4, context: 128}
"""


def decide(report: Report) -> None:
    """Gates and recommendations as the eval job decides them, for the report's recipe and evals
    (recommendations only for the devices the report now has)."""
    from evals.gates import judge

    report.recommendations = {}
    judge(report, Recipe.model_validate(report.recipe_config))


def variant(base: Report, name: str, *, devices: list[str] | None = None, gates: dict | None = None, registry: dict | None = None,
            description: str | None = None) -> Report:
    """The real report as if built from an edited recipe: another name (experiment and model
    names), other devices (those without results are pending), other gates or registry settings."""
    r = base.model_copy(deep=True)
    cfg = dict(r.recipe_config)
    cfg["name"] = name
    if devices is not None:
        cfg["evals"] = {**cfg["evals"], "devices": devices}
    if gates is not None:
        cfg["gates"] = {**cfg["gates"], **gates}
    if registry is not None:
        cfg["registry"] = {**cfg["registry"], **registry}
    if description is not None:
        cfg["description"] = description
    recipe = Recipe.model_validate(cfg)
    r.recipe, r.recipe_config, r.recipe_sha256 = name, recipe.model_dump(mode="json"), recipe.sha256()
    r.recipe_path = f"recipes/{name}.yaml"
    for d in recipe.evals.devices:
        if d not in r.devices:
            r.devices[d] = DeviceInfo(status="pending", reason="no such device on this machine; evaluate it on one that has it")
            r.baseline[d] = EvalEntry(status="pending")
            for a in r.built():
                a.evals[d] = EvalEntry(status="pending")
    decide(r)
    return r


def with_device(report: Report, device: str, like: str = "cpu", **metrics) -> Report:
    """`device`'s eval job finished: its results are the real `like` results (each metric in
    `metrics` changed, e.g. delta_ppl_pct=9.0 to fail a gate there); gates re-decided."""
    r = report.model_copy(deep=True)
    r.devices[device] = r.devices[like].model_copy(deep=True)
    r.baseline[device] = r.baseline[like].model_copy(deep=True)
    for a in r.built():
        ev = a.evals[like].model_copy(deep=True)
        for k, v in metrics.items():
            setattr(ev.metrics, k, v)
        a.evals[device] = ev
    decide(r)
    return r


def only(report: Report, *names: str) -> Report:
    """A build job's report: the same recipe, only its own targets."""
    r = report.model_copy(deep=True)
    r.artifacts = [a for a in r.artifacts if a.name in names]
    decide(r)
    return r


_last_stamp = [0]


def stamp() -> str:
    """`updated` for a report written now, strictly later than the last one this session wrote
    (report times have 1 s resolution; tests write several results a second)."""
    t = max(int(time.time()), _last_stamp[0] + 1)
    _last_stamp[0] = t
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def write(report: Report, artifacts_dir: Path, plots_from: Path | None = None) -> Path:
    """report.json of a job that just finished (its `updated` is later than every earlier one)."""
    report.updated = stamp()
    path = report_path(artifacts_dir, report.recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(path, report)
    for p in sorted((plots_from or Path("/nonexistent")).glob("*.png")):
        shutil.copy(p, path.parent / p.name)
    return path


def own_copies(report: Report, artifacts_dir: Path) -> Report:
    """The artifact folders copied into this artifacts dir's store (so a test may alter them)."""
    r = report.model_copy(deep=True)
    for a in r.built():
        src = Path(a.path)
        dst = Path(artifacts_dir).resolve() / "store" / src.parent.name / src.name
        if not dst.exists():
            shutil.copytree(src, dst)
        a.path = str(dst)
    return r


def rebuilt(report: Report, artifacts_dir: Path, name: str, note: str, extra_bytes: int = 0) -> Report:
    """`name` built again with other bytes (its model card gains a line; `extra_bytes` of padding
    make it larger), committed through the store: new content hash, same evals."""
    r = report.model_copy(deep=True)
    a: ArtifactReport = r.artifact(name)
    store = Store(artifacts_dir)
    kind = Path(a.path).parent.name
    key = hashlib.sha256(f"{a.stage_key}:{note}:{extra_bytes}".encode()).hexdigest()

    def produce(tmp: Path) -> dict:
        for p in Path(a.path).iterdir():
            if p.name != MANIFEST:
                shutil.copy2(p, tmp / p.name)
        with open(tmp / "README.md", "a") as f:
            f.write(f"\n{note}\n")
        if extra_bytes:
            with open(tmp / "padding.bin", "wb") as f:
                block = bytes(range(256)) * 4096
                for _ in range(extra_bytes // len(block)):
                    f.write(block)
        return {"stage": f"rebuilt:{name}"}

    entry = store.run_once(kind, key, produce)
    a.path, a.stage_key = str(entry.path), key
    a.content_sha256, a.bytes = entry.manifest["content_sha256"], entry.manifest["bytes"]
    return r


def evaluated_on(report: Report, device: str, changes: dict[str, dict] | None = None) -> Report:
    """The report of the eval job of `device` alone: the real cpu results (with `changes`,
    artifact -> {metric: value}), every other device of the recipe pending; gates decided."""
    r = with_device(report, device) if device != "cpu" else report.model_copy(deep=True)
    for d in list(r.devices):
        if d != device:
            r.devices[d] = DeviceInfo(status="pending", reason="no such device on this machine; evaluate it on one that has it")
            r.baseline[d] = EvalEntry(status="pending")
            for a in r.built():
                a.evals[d] = EvalEntry(status="pending")
    for name, metrics in (changes or {}).items():
        for k, v in metrics.items():
            setattr(r.artifact(name).evals[device].metrics, k, v)
    r.recommendations = {}
    decide(r)
    return r
