"""Eval results as stages: planned, keyed, cached and run like build stages.

Per device there are, for a recipe whose report lists its built artifacts:

    eval/<device>/bandwidth        the device's copy bandwidth (for the roofline), once per fingerprint
    eval/<device>/source           the source model: its speed, its accuracy on the suite, and the
                                   reference distributions (reference.npz) and token ids (ids.npy)
                                   that every artifact is compared against
    eval/<device>/<artifact>       one artifact: accuracy against that reference, and speed

Each model's stage also scores the recipe's lm-evaluation-harness tasks (``evals.tasks``), in
the same process as its accuracy, with the model already loaded.

An artifact's eval stage is keyed by the artifact's *content* hash (not its build
stage's key), so results follow the bytes: an eval runner that pulled the
artifacts from MLflow, with other tool versions than the build runner, finds
and reuses results for the same files. Keys also hold the suite's fingerprint,
the eval parameters, the device fingerprint and the runtimes' versions, so a
result is never reused across any of those. Failures are not stored.

The runtime for each (artifact format, device) comes from the target kinds'
declarations (:func:`choose_runtimes`); each measurement runs in a child process
(:mod:`evals.worker`), so a runtime that crashes fails one stage, and peak memory
is the model's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.core.stage import Stage, StageContext

EVAL_VERSION = "4"  # 3: a GGUF worker's tasks in a child of their own, lm-eval's native results; 4: KL standard errors
WORKER_TIMEOUT_S = 3 * 3600
SOURCE_RUNTIMES = {"cpu": ("transformers",), "cuda": ("transformers",)}
REFERENCE_FILE = "reference.npz"
IDS_FILE = "ids.npy"


def device_class(device: str) -> str:
    """The key of a kind's runtimes-per-device map: ``cpu``, or ``cuda`` for any GPU class."""
    from pipeline.backends.devices import Device

    return Device.of(device).kind


@dataclass(frozen=True)
class RuntimeChoice:
    accuracy: str | None
    speed: str | None
    reasons: tuple[str, ...]  # why a preferred runtime was passed over, or why none could run

    @property
    def skip_reason(self) -> str | None:
        if self.accuracy is None and self.speed is None:
            return "; ".join(self.reasons) or "no runtime can evaluate it here"
        return None


def choose_runtimes(artifact_kind: str, device: str) -> RuntimeChoice:
    """The runtimes that evaluate one artifact format on one device, from the kinds' declarations:
    for accuracy and for speed, the first in the declared order that is available here and can
    measure it (vLLM gives speed with native kernels but no full-vocabulary log-probabilities)."""
    from evals.runtimes import get_runtime
    from pipeline.targets import artifact_format

    if artifact_kind == "source":
        preferred = SOURCE_RUNTIMES.get(device_class(device), ())
    else:
        fmt = artifact_format(artifact_kind)
        if fmt is None:
            return RuntimeChoice(None, None, (f"no target kind declares artifact kind {artifact_kind!r}",))
        preferred = fmt.eval_runtimes.get(device_class(device), ())
        if not preferred:
            where = ", ".join(sorted(fmt.eval_runtimes)) or "no device"
            return RuntimeChoice(None, None, (f"{artifact_kind} artifacts are evaluated on {where} only (served by {', '.join(fmt.serves_with)})",))
    picked: dict[str, str | None] = {"accuracy": None, "speed": None}
    reasons = []
    for name in preferred:
        rt = get_runtime(name)
        why = rt.unavailable(device)
        if why:
            reasons.append(f"{name}: {why}")
            continue
        for what in ("accuracy", "speed"):
            if picked[what] is None and what in rt.measures:
                picked[what] = name
    return RuntimeChoice(picked["accuracy"], picked["speed"], tuple(reasons))


@dataclass
class EvalContext:
    """What the eval stages of one device share."""

    loaded: Any  # LoadedRecipe
    device: str
    fingerprint: dict
    fingerprint_hash: str
    suite: Any  # pipeline.data.suites.Suite
    threads: int
    #: lm-eval tasks: where their files are on this machine (never in a key) and what keys them
    #: (names, limit, a fingerprint of their content); worked out once, shared by every stage
    task_include: list[str]
    task_params: dict | None

    @property
    def spec(self):
        return self.loaded.recipe.evals


def eval_context(loaded, device: str) -> EvalContext:
    from pipeline.backends.devices import cpu_threads_default, fingerprint, fingerprint_hash
    from pipeline.data.suites import load_suite

    recipe = loaded.recipe
    fp = fingerprint(device)
    suite = load_suite(recipe.evals.suite, base_dir=loaded.path.parent, column=recipe.evals.column)
    include, task_params = [], None
    if recipe.evals.tasks:
        from evals import tasks

        include, names = tasks.resolve(recipe.evals.tasks, loaded.path.parent)
        task_params = {"names": names, "limit": recipe.evals.task_limit,
                       "fingerprint": tasks.fingerprint(recipe.evals.tasks, loaded.path.parent)}
    return EvalContext(loaded=loaded, device=device, fingerprint=fp, fingerprint_hash=fingerprint_hash(fp),
                       suite=suite, threads=recipe.evals.speed.threads or cpu_threads_default(),
                       task_include=include, task_params=task_params)


def runtime_tools(*names: str | None) -> dict[str, str]:
    from evals.runtimes import get_runtime

    tools: dict[str, str] = {}
    for n in filter(None, dict.fromkeys(names)):
        tools.update({f"{n}:{k}": v for k, v in get_runtime(n).versions().items()})
    return tools


def _common_params(ec: EvalContext, choice: RuntimeChoice) -> dict:
    s = ec.spec
    params = {
        "suite": ec.suite.fingerprint,
        "context": s.context,
        "max_windows": s.max_windows,
        "speed": s.speed.model_dump(mode="json"),
        "threads": ec.threads,
        "accuracy_runtime": choice.accuracy,
        "speed_runtime": choice.speed,
    }
    if ec.task_params is not None and choice.accuracy:
        params["tasks"] = dict(ec.task_params)
    return params


def source_stage_name(device: str) -> str:
    return f"eval/{device}/source"


def eval_stages(ec: EvalContext, report) -> list[Stage]:
    """Every eval stage of one device for the built artifacts in `report`."""
    stages = [bandwidth_stage(ec)]
    src_choice = choose_runtimes("source", ec.device)
    source_path = Path(report.source.path)
    src = Stage(
        name=source_stage_name(ec.device),
        kind="eval-source",
        version=EVAL_VERSION,
        params=_common_params(ec, src_choice),
        run=partial(run_model_eval, path=source_path, choice=src_choice, is_source=True, suite_text=ec.suite.text,
                    task_include=ec.task_include),
        tools=runtime_tools(src_choice.accuracy, src_choice.speed),
        device_fingerprint=ec.fingerprint_hash,
        external_key=report.source.fingerprint or str(source_path),
        skip_reason=src_choice.skip_reason if src_choice.accuracy is None else None,
        description=f"the source on {ec.device}: reference distributions, perplexity, speed",
    )
    stages.append(src)
    for a in report.built():
        if not a.path:
            continue
        choice = choose_runtimes(a.kind, ec.device)
        skip = choice.skip_reason
        stages.append(Stage(
            name=f"eval/{ec.device}/{a.name}",
            kind="eval-artifact",
            version=EVAL_VERSION,
            params={**_common_params(ec, choice), "artifact_kind": a.kind},
            inputs={} if choice.accuracy is None else {"reference": src.name},
            run=partial(run_model_eval, path=Path(a.path), choice=choice, is_source=False, suite_text=ec.suite.text,
                        task_include=ec.task_include),
            tools=runtime_tools(choice.accuracy, choice.speed),
            device_fingerprint=ec.fingerprint_hash,
            external_key=a.content_sha256 or a.stage_key or a.path,
            skip_reason=skip,
            target=a.name,
            description=f"{a.name} on {ec.device}: " + ", ".join(
                f"{what} with {rt}" for what, rt in (("accuracy", choice.accuracy), ("speed", choice.speed)) if rt),
        ))
    return stages


def bandwidth_stage(ec: EvalContext) -> Stage:
    return Stage(
        name=f"eval/{ec.device}/bandwidth",
        kind="eval-bandwidth",
        version=EVAL_VERSION,
        params={},
        run=partial(run_bandwidth, device=ec.device),
        device_fingerprint=ec.fingerprint_hash,
        description=f"{ec.device} memory bandwidth (roofline), once per device fingerprint",
    )


# ---------------------------------------------------------------- running
def run_bandwidth(ctx: StageContext, *, device: str) -> dict:
    from evals.roofline import measure_bandwidth

    result = measure_bandwidth(device)
    (ctx.out_dir / "bandwidth.json").write_text(json.dumps(result, indent=2))
    return result


def _worker(ctx: StageContext, job: dict) -> dict:
    """One child process (evals.worker) for one job; its result, or ChildFailed (a StageFailed) whose
    two lines (how it ended and its telling line; where in Python) make the runner name the log."""
    from pipeline.core.proc import call

    return call("evals.worker", job, what=f"the {job['runtime']} worker", timeout=WORKER_TIMEOUT_S, threads=job["threads"],
                tag=f"{job['runtime']}-job", workdir=ctx.out_dir)


def run_model_eval(ctx: StageContext, *, path: Path, choice: RuntimeChoice, is_source: bool, suite_text: str | None = None,
                   task_include: list[str] | None = None, device: str | None = None) -> dict:
    """Accuracy (against the reference) and speed of one model on one device.

    The stage's params say what is measured: ``max_windows`` (and ``skip_windows``, windows of the
    text left to another measurement) for accuracy, ``speed`` and ``tasks`` when present."""
    from pipeline.errors import StageFailed

    p = ctx.stage.params
    device = device or ctx.stage.name.split("/")[1]
    if "threads" in p:
        threads = p["threads"]
    else:  # accuracy alone does not depend on threads: a stage keyed without them uses this machine's
        from pipeline.backends.devices import cpu_threads_default

        threads = cpu_threads_default()
    out: dict[str, Any] = {"accuracy_runtime": choice.accuracy, "speed_runtime": choice.speed,
                           "runtime_notes": list(choice.reasons)}
    jobs: dict[str, dict] = {}
    if choice.speed and p.get("speed"):
        s = p["speed"]
        jobs.setdefault(choice.speed, {"runtime": choice.speed, "path": str(path), "device": device, "threads": threads})["speed"] = {
            "prompt_lengths": s["prompt_lengths"], "decode_tokens": s["decode_tokens"], "batch_sizes": s["batch_sizes"],
            "warmup": s["warmup"], "min_iterations": s["min_iterations"], "min_seconds": s["min_seconds"]}
    if choice.accuracy:
        # The text travels to every worker: a runtime with its own tokenizer (llama.cpp) must
        # tokenize it exactly as the source did, or the comparison is refused.
        text_file = ctx.out_dir / ".suite.txt"
        text_file.write_text(suite_text or "", encoding="utf-8")
        acc: dict[str, Any] = {"context": p["context"], "max_windows": p["max_windows"], "text": str(text_file),
                               "skip_windows": p.get("skip_windows", 0)}
        if is_source:
            acc.update(ids=None, bos=None, reference=None, write_reference=str(ctx.out_dir / REFERENCE_FILE))
        else:
            ref = ctx.input("reference")
            acc.update(ids=str(ref.path / IDS_FILE), bos=ref.result["accuracy"].get("bos_id"),
                       reference=str(ref.path / REFERENCE_FILE))
        job = jobs.setdefault(choice.accuracy, {"runtime": choice.accuracy, "path": str(path), "device": device, "threads": threads})
        job["accuracy"] = acc
        if p.get("tasks"):
            job["tasks"] = {"names": p["tasks"]["names"], "limit": p["tasks"]["limit"], "include": task_include or []}
    for runtime, job in jobs.items():
        res = _worker(ctx, job)
        for part in ("speed", "accuracy", "tasks"):
            if part in job:
                r = res.get(part) or {"status": "failed", "reason": "no result"}
                if r.get("status") != "done":
                    ctx.log(str(r.get("trace", "")))
                    raise StageFailed(f"{part} with {runtime}: {r.get('reason')}")
                r.pop("trace", None)
                out[part] = r
    (ctx.out_dir / ".suite.txt").unlink(missing_ok=True)
    (ctx.out_dir / "result.json").write_text(json.dumps(out, indent=2, default=str))
    return out
