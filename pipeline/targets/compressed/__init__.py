"""The llm-compressor kinds: ``gptq``, ``awq``, ``autoround`` (W4A16 and friends) and ``fp8`` (W8A8).

Each writes one compressed-tensors checkpoint (``pack-quantized`` int4/int8 or
``float-quantized`` FP8), the format vLLM and SGLang load natively and transformers
loads by decompressing. Settings and declarations only: the stage lives in
:mod:`pipeline.targets.compressed.stages` and imports llm-compressor when it runs.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator

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


#: llm-compressor's weight observers (its ``Observer`` registry names, llmcompressor/observers/):
#: how each group's scale and zero point are chosen. ``minmax``: the group's range;
#: ``mse``/``memoryless_mse``: a search over shrunken ranges for the least squared error;
#: ``imatrix_mse``: that search weighted by each input channel's mean squared activation
#: (llama.cpp's importance matrix idea), collected on the calibration data.
OBSERVERS = ("minmax", "memoryless_minmax", "mse", "memoryless_mse", "imatrix_mse")
#: GPTQ's column order (compressed-tensors ``ActivationOrdering``; ``static`` is its alias of
#: ``weight``): by activation size during calibration only, so the stored format is unchanged.
ACTORDERS = ("static", "weight", "none")
#: Removed from compressed-tensors 0.19 (they wrote a g_idx permutation): say what to use instead.
REMOVED_ACTORDERS = {"group": "weight", "dynamic": "weight", "true": "weight", "false": "none"}


def one_of(value: Any, allowed: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `allowed`; else an error naming the closest allowed value."""
    text = str(value)
    if text in allowed:
        return text
    close = difflib.get_close_matches(text, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {what} {value!r}{hint}; one of: {', '.join(allowed)}")


def _observer(value: Any) -> str:
    return one_of(value, OBSERVERS, "weight observer")


def _actorder(value: Any) -> str:
    text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if text in REMOVED_ACTORDERS and text not in ACTORDERS:
        raise ValueError(
            f"actorder {value!r} is not available: compressed-tensors 0.19 removed group (g_idx) ordering; "
            f"use {REMOVED_ACTORDERS[text]!r} (one of: {', '.join(ACTORDERS)})"
        )
    return one_of(text, ACTORDERS, "actorder")


class _IntWeightTarget(TargetBase):
    bits: Literal[4, 8] = 4
    group_size: GroupSize = 128
    ignore: list[str] = ["lm_head"]
    #: how each group's scale (and zero point) is chosen: one of OBSERVERS
    observer: str = "minmax"

    _check_observer = field_validator("observer", mode="before")(lambda cls, v: _observer(v))

    def problems(self, ctx: CheckContext) -> list[Found]:
        found = pattern_problems(self.ignore, ("targets", ctx.index, "ignore"))
        msg = group_size_problem(self.group_size, ctx.source_config)
        if msg:
            found.append((("targets", ctx.index, "group_size"), msg))
        for k, m in enumerate(getattr(self, "mappings", None) or []):
            found += pattern_problems([m.smooth_layer], ("targets", ctx.index, "mappings", k, "smooth_layer"))
            found += pattern_problems(m.balance_layers, ("targets", ctx.index, "mappings", k, "balance_layers"))
        return found


class GptqSettings(Strict):
    """GPTQ's own levers, with llm-compressor's ``GPTQModifier`` names and defaults."""

    #: column order: ``weight`` (alias ``static``) or ``none``. ``weight`` by default, as in
    #: llm-compressor: on the demo model it took GPTQ W4A16 group 64 from +24 % perplexity to
    #: +14-16 % at no cost in format or speed (README, "GPTQ, AWQ, FP8").
    actorder: str = "weight"
    #: columns GPTQ updates in one pass
    block_size: int = Field(128, ge=1, le=65536)
    #: Hessian dampening, as a fraction of its mean diagonal
    dampening_frac: float = Field(0.01, gt=0, lt=1)

    _check_actorder = field_validator("actorder", mode="before")(lambda cls, v: _actorder(v))


class GptqTarget(_IntWeightTarget, GptqSettings):
    """GPTQ weight-only quantization (W4A16 by default) through llm-compressor.

    Example::

        - {name: w4a16-gptq, kind: gptq, bits: 4, group_size: 64, actorder: weight, observer: mse}
    """

    kind: Literal["gptq"]
    symmetric: bool = True


class AwqMapping(Strict):
    """One AWQ smoothing step: scale ``smooth_layer``'s output, balance these inputs."""

    smooth_layer: str
    balance_layers: list[str] = Field(min_length=1)


class AwqTarget(_IntWeightTarget):
    """AWQ (activation-aware) weight-only quantization through llm-compressor.

    AWQ only rescales channels; the weights are then rounded to the grid
    (round-to-nearest), or by GPTQ when a ``gptq:`` section is given (AWQ+GPTQ).

    Example::

        - {name: w4a16-awq, kind: awq, bits: 4, group_size: 64, n_grid: 10}
        - {name: w4a16-awq-gptq, kind: awq, group_size: 64, duo_scaling: both, gptq: {actorder: weight}}
    """

    kind: Literal["awq"]
    symmetric: bool = False
    mappings: list[AwqMapping] | None = None
    #: Points in AWQ's per-layer scale search (llm-compressor's default 20); fewer is faster, coarser.
    n_grid: int = Field(20, ge=2, le=100)
    #: scales from activations and weights (true), activations only (false), or half the grid each ("both")
    duo_scaling: bool | Literal["both"] = True
    #: quantize the smoothed weights with GPTQ (these settings) instead of rounding to nearest
    gptq: GptqSettings | None = None


class AutoRoundTarget(_IntWeightTarget):
    """AutoRound (signed-gradient rounding and range tuning per decoder layer) through llm-compressor.

    Writes the same compressed-tensors ``pack-quantized`` W4A16 as ``gptq``.

    Example::

        - {name: w4a16-autoround, kind: autoround, group_size: 64, symmetric: false, iters: 200}
    """

    kind: Literal["autoround"]
    symmetric: bool = True
    #: tuning steps per decoder layer (llm-compressor's default 200)
    iters: int = Field(200, ge=0, le=100_000)
    #: step size (None: auto-round's default, 1/iters)
    lr: float | None = Field(None, gt=0, lt=1)
    #: calibration samples per tuning step
    batch_size: int = Field(8, ge=1, le=4096)

    def problems(self, ctx: CheckContext) -> list[Found]:
        found = super().problems(ctx)
        if self.observer != "minmax":
            # AutoRound tunes the ranges itself; llm-compressor's observer would be ignored.
            found.append((("targets", ctx.index, "observer"), "autoround tunes each group's range itself: leave `observer` out (minmax)"))
        cal = ctx.recipe.calibration
        if cal is not None and cal.samples < self.batch_size:
            found.append((("targets", ctx.index, "batch_size"),
                          f"batch_size {self.batch_size} is larger than calibration.samples ({cal.samples})"))
        return found


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
AUTOROUND = KindDeclaration(kind="autoround", settings=AutoRoundTarget, planner=_PLANNER, summary="AutoRound W4A16 (compressed-tensors)",
                            formats=(_format("autoround"),), ci_runner="gpu", libraries=(*_LIBS, "auto-round"),
                            requires=(*_LIBS[:2], "auto-round"), extra="llmc")
FP8 = KindDeclaration(kind="fp8", settings=Fp8Target, planner=_PLANNER, summary="FP8 W8A8 (compressed-tensors)",
                      formats=(_format("fp8"),), ci_runner="gpu", libraries=_LIBS, requires=_LIBS[:2], extra="llmc")
