"""GPTQ target: weight-only integer quantization (W4A16 by default) with llm-compressor's GPTQModifier.

The stage, its checks and its verification live in :mod:`pipeline.targets.compressed`.
"""

from __future__ import annotations

from pipeline.targets.compressed import plan_compressed_stage


def plan_stages(target, ctx):
    return plan_compressed_stage(target, ctx)
