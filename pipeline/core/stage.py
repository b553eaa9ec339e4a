"""The Stage contract and its cache key.

A stage is one unit of work with a content-addressed output folder. Its key
hashes what determines the output: the stage kind and version, its params, the
keys of its inputs (so keys chain), the versions of tools that shape the output,
and the device fingerprint when the output is device-specific. Same key, same
output: a stage whose key is in the store is not run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class ArtifactInfo:
    """What a stage's output is, for report.json and the registry (one entry per file set)."""

    name: str  # e.g. "gguf-Q4_K_M" or "w4a16-gptq"; unique within the recipe
    target: str  # the recipe target it belongs to
    kind: str  # gptq | awq | fp8 | gguf | tensorrt-checkpoint | tensorrt-engine
    variant: str | None = None  # e.g. the GGUF quant type
    format: str = ""  # e.g. "compressed-tensors pack-quantized", "gguf Q4_K_M"
    runtimes: tuple[str, ...] = ()  # runtimes that load it
    bits: int | None = None
    group_size: int | str | None = None
    #: a candidate another stage chooses from (the budget kind's): built, cached and verified
    #: like any artifact, but not listed in the report, evaluated or registered itself
    internal: bool = False


@dataclass
class StageOutput:
    """A finished stage's folder and manifest, as downstream stages see it."""

    name: str
    key: str
    path: Path
    manifest: dict

    @property
    def result(self) -> dict:
        return self.manifest.get("result", {})

    @property
    def model_dir(self) -> Path:
        """The model folder a stage produced; a source stage may point outside the store."""
        return Path(self.result["model_dir"]) if "model_dir" in self.result else self.path


@dataclass
class StageContext:
    """What a stage's run function gets: where to write, and its inputs' outputs."""

    stage: "Stage"
    out_dir: Path  # a fresh temporary folder; renamed into place on success
    inputs: dict[str, StageOutput]
    log: Callable[[str], None]
    artifacts_dir: Path
    key: str = ""  # this stage's cache key (an output may record it: it is known before the stage runs)

    def input(self, name: str) -> StageOutput:
        return self.inputs[name]


RunFn = Callable[[StageContext], "dict[str, Any] | None"]


@dataclass
class Stage:
    """One node of the plan.

    ``run`` writes into ``ctx.out_dir`` and returns facts for the manifest's
    ``result`` (verification results, metrics). Raise to fail: the output is
    discarded. ``skip_reason`` set at plan time means the stage cannot run here
    (a missing runtime, no GPU); it is reported, never faked.
    """

    name: str  # unique in the plan, e.g. "gguf/gguf-quant/Q4_K_M"
    kind: str  # implementation id, e.g. "gguf-quant"
    version: str  # bump when the output for the same inputs changes
    params: dict[str, Any]
    run: RunFn | None
    inputs: dict[str, str] = field(default_factory=dict)  # local name -> upstream stage name
    tools: dict[str, str] = field(default_factory=dict)
    device_fingerprint: str | None = None  # set only for device-specific outputs
    artifact: ArtifactInfo | None = None
    skip_reason: str | None = None
    target: str | None = None  # the recipe target it serves, for `build --target`
    external_key: str | None = None  # for stages keyed by something outside the store (a local model's file hashes)
    description: str = ""

    def key(self, input_keys: dict[str, str]) -> str:
        return content_key({
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "inputs": {k: input_keys[v] for k, v in sorted(self.inputs.items())},
            "tools": dict(sorted(self.tools.items())),
            "device": self.device_fingerprint,
            "external": self.external_key,
        })


def content_key(payload: dict[str, Any]) -> str:
    """The one cache-key function: sha256 of the canonical JSON of what determines an output."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tool_versions(*dists: str) -> dict[str, str]:
    """Installed versions of the given distributions ('missing' when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "missing"
    return out
