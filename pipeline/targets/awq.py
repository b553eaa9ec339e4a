"""AWQ target: activation-aware smoothing (AWQModifier) then integer weight quantization.

The stage, the AWQ mapping check, the CPU ``pin_memory`` workaround and the
verification live in :mod:`pipeline.targets.compressed`.
"""

from __future__ import annotations

from pipeline.targets.compressed import plan_compressed_stage


def plan_stages(target, ctx):
    return plan_compressed_stage(target, ctx)
