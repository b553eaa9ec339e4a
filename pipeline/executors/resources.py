"""What one executor choice holds, and what each stage asks a cluster for (CPUs, GPUs, memory).

Shared by the choice (:mod:`pipeline.executors`) and the Ray executor
(:mod:`pipeline.executors.ray_executor`), which imports it rather than the package above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import InvalidInput


@dataclass(frozen=True)
class ExecutorChoice:
    executor: str = "local"  # local | ray
    address: str | None = None  # a Ray cluster to join (or "auto"); None: RAY_ADDRESS, else start a local one
    target_kinds: dict[str, str] = field(default_factory=dict)  # recipe target name -> kind
    #: group (target name, source, calibration, eval) -> {num_gpus, num_cpus, memory_gb}, from the recipe
    resources: dict[str, dict[str, float]] = field(default_factory=dict)
    workers: int | None = None  # CPUs of a local cluster (None: this machine's)
    max_retries: int = 3  # Ray re-runs a stage whose worker died this many times


def resource_group(stage) -> str:
    """Which `execution.resources` entry applies to a stage: its recipe target, else source,
    calibration or eval (eval stages carry the artifact's name as `target`)."""
    if stage.kind.startswith("eval"):
        return "eval"
    if stage.target:
        return stage.target
    return stage.name.split("/", 1)[0]


def eval_device(stage) -> str | None:
    """The device an eval stage measures on (its name is ``eval/<device>/<model>``)."""
    if not stage.kind.startswith("eval"):
        return None
    parts = stage.name.split("/")
    return parts[1] if len(parts) > 2 else None


def wants_gpu(stage, target_kinds: dict[str, str]) -> bool:
    """What the stage's kind declares: builds of a GPU kind (its declaration's runner class) and
    evals on any device but the CPU want a GPU; GGUF, the source and calibration do not."""
    device = eval_device(stage)
    if device is not None:
        from pipeline.backends.devices import Device

        return Device.of(device).on_gpu
    kind = target_kinds.get(stage.target or "")
    if kind is None:
        return False
    from pipeline.targets import declaration

    return declaration(kind).ci_runner == "gpu"


def task_resources(stage, choice: ExecutorChoice, cluster_gpus: float) -> dict:
    """Ray task options for one stage: `num_cpus`, `num_gpus`, `memory` (bytes).

    One CPU by default. A GPU stage asks for one GPU when the cluster has any; on a cluster
    without GPUs it runs on CPU, as it does locally on such a machine. The recipe's
    ``execution.resources`` entry for the stage's group overrides: a fractional `num_gpus`
    lets stages share a GPU, more than 1 gives a stage several, `memory_gb` keeps a large
    model off nodes that cannot hold it.
    """
    over = choice.resources.get(resource_group(stage), {})
    gpus = over.get("num_gpus")
    if gpus is None:
        gpus = 1.0 if wants_gpu(stage, choice.target_kinds) and cluster_gpus > 0 else 0.0
    elif gpus > cluster_gpus:
        raise InvalidInput(f"execution.resources.{resource_group(stage)} asks for {gpus:g} GPU(s); the cluster has {cluster_gpus:g}")
    out = {"num_cpus": float(over.get("num_cpus", 1.0)), "num_gpus": float(gpus)}
    if over.get("memory_gb"):
        out["memory"] = int(over["memory_gb"] * 2**30)
    return out
