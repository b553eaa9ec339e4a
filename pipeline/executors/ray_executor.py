"""Run a plan's stages as Ray tasks: Ray schedules and retries, the store keeps its guarantees.

The driver (the `quantforge` process) submits each stage once its inputs are done, with the
resources its kind declares (:func:`pipeline.executors.task_resources`), so independent
stages (the targets of a recipe, the models of a device's eval) run at once on whatever
workers and nodes Ray picks. Each task runs :func:`pipeline.core.runner.run_stage`, the
code the local executor runs: the store's lock, temp folder, manifest and atomic rename
(on the filesystem every node shares) make a stage run once and leave nothing
half-written, wherever it runs. A stage that fails returns a failed result (Ray does not
retry it: it would fail again); a worker that dies mid-stage is retried by Ray
(``max_retries``) and, beyond that, fails the stage. Either way only its dependents are
skipped.

Stages whose output is already in the store are answered here, without a task: a cached
re-run on a cluster costs what it costs locally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from pipeline.executors.resources import ExecutorChoice, task_resources
from pipeline.core import runner
from pipeline.core.runner import StageResult, resolve_inputs, run_stage
from pipeline.core.stage import Stage, StageOutput
from pipeline.core.store import Store, verify_folder
from pipeline.errors import InvalidInput

Log = Callable[[str], None]
# Small: tasks pass manifests and paths, never model weights (those stay on the shared filesystem).
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
POLL_S = 0.2

_session: dict = {}  # this process's connection: {"local": bool, "dashboard": str | None}


def connect(choice: ExecutorChoice, log: Log) -> dict:
    """Join the cluster at `choice.address`, or start a local one (once per process)."""
    import ray

    if ray.is_initialized():
        # Ours from an earlier command of this process, or the caller's own ray.init(): use it as is.
        if not _session:
            _session.update(local=False, dashboard=None)
        return _session
    quiet = {"log_to_driver": False, "logging_level": "WARNING"}  # stage logs come back through the Events actor
    if choice.address:
        context = ray.init(address=choice.address, **quiet)
    else:
        context = ray.init(address="local", num_cpus=choice.workers or os.cpu_count() or 1,
                           object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    url = getattr(context, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = "http://" + url
    _session.update(local=not choice.address, dashboard=url)
    where = f"joined the Ray cluster at {choice.address}" if choice.address else "started a local Ray cluster"
    log(f"[ray] {where}: {nodes} node(s), {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s)"
        + (f"; dashboard {url}" if url else "; no dashboard (install ray[default] for one)"))
    return _session


def shutdown() -> None:
    """Leave the cluster (a local one stops); the next execute connects again."""
    import ray

    _session.clear()
    ray.shutdown()


def execute_on_ray(choice: ExecutorChoice, stages: list[Stage], artifacts_dir: Path, log: Log, keys: dict[str, str],
                   logs_dir: Path | None, progress: Callable[[StageResult], None] | None,
                   outside: dict[str, StageOutput]) -> dict[str, StageResult]:
    import ray

    session = connect(choice, log)
    store = Store(artifacts_dir)
    if session["local"]:
        # Temp folders are judged by their writer's pid, which means something on this host only:
        # with a local cluster every worker is here; on a shared cluster this host could remove
        # another node's work in progress, so there it is left to each node's next local run.
        store.clean_stale_tmp()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    remote = ray.remote(_on_worker)
    events = ray.remote(Events).options(num_cpus=0).remote()
    threads_env = os.environ.get("QUANTFORGE_THREADS")
    in_this_list = {s.name for s in stages}
    results: dict[str, StageResult] = {}
    waiting = list(stages)
    running: dict = {}  # ObjectRef -> Stage
    starts: dict[str, int] = {}

    def finish(stage: Stage, result: StageResult) -> None:
        results[stage.name] = result
        if progress:
            progress(result)

    def drain() -> None:
        for what, name, payload in ray.get(events.take.remote()):
            if what == "log":
                if payload is not None:  # None: a stage's end-of-log marker
                    log(payload)
                continue
            starts[name] = starts.get(name, 0) + 1
            again = " again (its worker was lost: Ray retried it)" if starts[name] > 1 else ""
            log(f"[{name}] started{again} on {payload['host']} (node {payload['node'][:12]}, pid {payload['pid']})")

    try:
        while waiting or running:
            for stage in list(waiting):
                if any(u in in_this_list and u not in results for u in stage.inputs.values()):
                    continue  # an input is still running (or waiting)
                waiting.remove(stage)
                key = keys[stage.name]
                ready = resolve_inputs(stage, key, results, outside)
                if isinstance(ready, StageResult):
                    finish(stage, ready)
                    continue
                hit = _stored(store, stage, key)
                if hit is not None:
                    finish(stage, hit)
                    continue
                options = task_resources(stage, choice, gpus)
                threads = threads_env or str(max(1, int(options["num_cpus"])))
                ref = remote.options(name=stage.name, max_retries=choice.max_retries, retry_exceptions=False, **options).remote(
                    stage, keys, ready, str(artifacts_dir), str(logs_dir) if logs_dir else None, events, threads,
                    runner.VERBOSITY)
                running[ref] = stage
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            drain()
            for ref in done:
                stage = running.pop(ref)
                finish(stage, _collect(ray, ref, stage, keys[stage.name], choice, log))
        drain()
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        ray.kill(events)
    if session["local"]:
        store.clean_stale_tmp()  # what a killed worker was writing (its retry wrote the entry)
    return {s.name: results[s.name] for s in stages}


def _stored(store: Store, stage: Stage, key: str) -> StageResult | None:
    """A stored, intact output answered without a task (what run_once's first lookup does)."""
    manifest = store.get(stage.kind, key)
    if manifest is None:
        return None
    path = store.path_for(stage.kind, key)
    if stage.artifact is not None and verify_folder(path, manifest):
        return None  # altered since its build: a task builds it again (and says so)
    now = time.time()
    import socket

    return StageResult(stage, key, "hit", output=StageOutput(stage.name, key, path, manifest),
                       host=socket.gethostname(), node="driver", pid=os.getpid(), started=now, ended=now)


def _collect(ray, ref, stage: Stage, key: str, choice: ExecutorChoice, log: Log) -> StageResult:
    """The task's StageResult; a task that Ray could not finish (its worker died more than
    `max_retries` times, the node was lost) fails this stage only."""
    try:
        fields = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, InvalidInput):
            raise cause from None
        reason = f"{type(cause or exc).__name__}: {cause or exc}".splitlines()[0]
        log(f"[{stage.name}] FAILED on the cluster: {reason}")
        return StageResult(stage, key, "failed", reason=reason)
    except ray.exceptions.RayError as exc:
        reason = (f"its Ray worker died {choice.max_retries + 1} time(s) (Ray retried it {choice.max_retries}): "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        log(f"[{stage.name}] FAILED on the cluster: {reason}")
        return StageResult(stage, key, "failed", reason=reason)
    return StageResult(stage=stage, **fields)


class Events:
    """Stage events (starts, log lines) from the workers to the driver, which takes them as it polls.

    A plain actor, called without waiting: a task blocked in ``ray.get`` lends its CPU to
    another task, which would then run beside it on a core it does not have (a
    ``ray.util.queue.Queue`` put does that). Calls from one worker run in the order made.
    """

    def __init__(self) -> None:
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def _on_worker(stage: Stage, keys: dict[str, str], inputs: dict[str, StageOutput], artifacts_dir: str,
               logs_dir: str | None, events, threads: str, verbosity: int = 0) -> dict:
    """Inside a Ray task: run one stage through the store, stream its log lines to the driver."""
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id()
    # Torch threads follow the CPUs Ray gave this task, so concurrent stages on a node do not
    # fight for cores (placement.py reads QUANTFORGE_THREADS). Workers are reused: set every time.
    os.environ["QUANTFORGE_THREADS"] = threads
    runner.set_verbosity(verbosity)  # the driver's -v/-q: what of a stage's output reaches its terminal
    events.put.remote(("start", stage.name, {"host": socket.gethostname(), "node": node, "pid": os.getpid()}))

    def log(msg: str) -> None:
        events.put.remote(("log", stage.name, msg))

    log.captures_safe = True  # sends to the driver, not to stdout: callable while the stage's output is captured

    result = run_stage(stage, keys, inputs, Store(Path(artifacts_dir)), Path(artifacts_dir), log,
                       Path(logs_dir) if logs_dir else None, node=node)
    # The stage is done: waiting here costs no one a core, and its last lines reach the driver first.
    ray.get(events.put.remote(("log", stage.name, None)))
    return {k: v for k, v in vars(result).items() if k != "stage"}
