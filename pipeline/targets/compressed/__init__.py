"""The llm-compressor kinds: ``gptq``, ``awq`` (W4A16 and friends) and ``fp8`` (W8A8).

Each writes one compressed-tensors checkpoint (``pack-quantized`` int4/int8 or
``float-quantized`` FP8), the format vLLM and SGLang load natively and transformers
loads by decompressing. Settings and declarations only: the stage lives in
:mod:`pipeline.targets.compressed.stages` and imports llm-compressor when it runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.spec import Strict
from pipeline.targets.base import ArtifactFormat, CheckContext, Found, GroupSize, KindDeclaration, TargetBase


def linear_in_features(config: dict) -> dict[str, int]:
    """Input width of each quantized Linear family of a decoder-only transformer."""
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size")
    out = {}
    if hidden:
        out["q_proj/k_proj/v_proj/gate_proj/up_proj"] = hidden
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if heads else None)
        if heads and head_dim:
            out["o_proj"] = heads * head_dim
    if inter:
        out["down_proj"] = inter
    return out


def group_size_problem(group_size, config: dict | None) -> str | None:
    """Why `group_size` cannot quantize this model's Linear layers (None when it can, or when unknown)."""
    if not isinstance(group_size, int) or not config:
        return None
    bad = {layer: width for layer, width in linear_in_features(config).items() if width % group_size}
    if not bad:
        return None
    model = (config.get("architectures") or ["the model"])[0]
    layers = ", ".join(f"{layer} (input width {width})" for layer, width in bad.items())
    import math

    common = 0
    for w in linear_in_features(config).values():
        common = math.gcd(common, w)
    divisors = [d for d in (32, 64, 128, 256) if common % d == 0]
    hint = f"e.g. {' or '.join(map(str, divisors))}" if divisors else "a common divisor"
    return f"group size {group_size} does not divide {layers} of {model}; use {hint}, or 'channel'"


def pattern_problems(patterns: list[str], loc: tuple) -> list[Found]:
    """llm-compressor module patterns: a name, or 're:' and a regular expression that must compile."""
    import re

    found = []
    for j, p in enumerate(patterns):
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                found.append(((*loc, j), f"{p!r} is not a valid regular expression: {exc}"))
    return found


class _IntWeightTarget(TargetBase):
    bits: Literal[4, 8] = 4
    group_size: GroupSize = 128
    ignore: list[str] = ["lm_head"]

    def problems(self, ctx: CheckContext) -> list[Found]:
        found = pattern_problems(self.ignore, ("targets", ctx.index, "ignore"))
        msg = group_size_problem(self.group_size, ctx.source_config)
        if msg:
            found.append((("targets", ctx.index, "group_size"), msg))
        for k, m in enumerate(getattr(self, "mappings", None) or []):
            found += pattern_problems([m.smooth_layer], ("targets", ctx.index, "mappings", k, "smooth_layer"))
            found += pattern_problems(m.balance_layers, ("targets", ctx.index, "mappings", k, "balance_layers"))
        return found


class GptqTarget(_IntWeightTarget):
    """GPTQ weight-only quantization (W4A16 by default) through llm-compressor.

    Example::

        - {name: w4a16-gptq, kind: gptq, bits: 4, group_size: 64}
    """

    kind: Literal["gptq"]
    symmetric: bool = True
    act_order: bool = False
    dampening_frac: float = Field(0.01, gt=0, lt=1)


class AwqMapping(Strict):
    """One AWQ smoothing step: scale ``smooth_layer``'s output, balance these inputs."""

    smooth_layer: str
    balance_layers: list[str] = Field(min_length=1)


class AwqTarget(_IntWeightTarget):
    """AWQ (activation-aware) weight-only quantization through llm-compressor.

    Example::

        - {name: w4a16-awq, kind: awq, bits: 4, group_size: 64, n_grid: 10}
    """

    kind: Literal["awq"]
    symmetric: bool = False
    mappings: list[AwqMapping] | None = None
    #: Points in AWQ's per-layer scale search (llm-compressor's default 20); fewer is faster, coarser.
    n_grid: int = Field(20, ge=2, le=100)


class Fp8Target(TargetBase):
    """FP8 weights and activations (W8A8) through llm-compressor.

    ``dynamic``: per-token activation scales at run time, no data needed;
    ``static``: per-tensor activation scales calibrated on data;
    ``block``: 128x128 block weight scales (DeepSeek-style), dynamic activations.

    Example::

        - {name: fp8, kind: fp8, scheme: dynamic}
    """

    kind: Literal["fp8"]
    scheme: Literal["dynamic", "static", "block"] = "dynamic"
    kv_cache: bool = False
    ignore: list[str] = ["lm_head"]

    def needs_calibration(self) -> bool:
        return self.scheme == "static" or self.kv_cache

    def problems(self, ctx: CheckContext) -> list[Found]:
        found = pattern_problems(self.ignore, ("targets", ctx.index, "ignore"))
        config = ctx.source_config
        if self.scheme != "block" or not config:
            return found
        # FP8_BLOCK quantizes 128x128 weight tiles: both dimensions must be multiples of 128.
        widths = {**linear_in_features(config), "intermediate_size (out)": config.get("intermediate_size") or 0}
        bad = {k: w for k, w in widths.items() if w and w % 128}
        if bad:
            found.append((("targets", ctx.index, "scheme"),
                          "scheme 'block' uses 128x128 weight blocks, but " + ", ".join(f"{k} is {w}" for k, w in bad.items())
                          + ": use 'dynamic' or 'static'"))
        return found


def _format(kind: str) -> ArtifactFormat:
    return ArtifactFormat(
        kind=kind,
        serves_with=("vllm", "sglang", "transformers"),
        # vLLM runs the int4/FP8 kernels where it is installed (speed); transformers
        # decompresses, so its accuracy is the artifact's and its speed is dense.
        eval_runtimes={"cpu": ("transformers",), "cuda": ("vllm", "transformers")},
    )


_LIBS = ("llmcompressor", "compressed-tensors", "transformers", "torch")
_PLANNER = "pipeline.targets.compressed.stages:plan_compressed_stage"

GPTQ = KindDeclaration(kind="gptq", settings=GptqTarget, planner=_PLANNER, summary="GPTQ W4A16/W8A16 (compressed-tensors)",
                       formats=(_format("gptq"),), ci_runner="gpu", libraries=_LIBS, requires=_LIBS[:2], extra="llmc")
AWQ = KindDeclaration(kind="awq", settings=AwqTarget, planner=_PLANNER, summary="AWQ W4A16 (compressed-tensors)",
                      formats=(_format("awq"),), ci_runner="gpu", libraries=_LIBS, requires=_LIBS[:2], extra="llmc")
FP8 = KindDeclaration(kind="fp8", settings=Fp8Target, planner=_PLANNER, summary="FP8 W8A8 (compressed-tensors)",
                      formats=(_format("fp8"),), ci_runner="gpu", libraries=_LIBS, requires=_LIBS[:2], extra="llmc")
