"""FP8 target: FP8 (e4m3) weights and activations with llm-compressor's QuantizationModifier.

``dynamic`` and ``block`` need no data (no calibration input); ``static`` and the
FP8 KV cache calibrate scales on the calibration stage's samples. The stage lives
in :mod:`pipeline.targets.compressed`.
"""

from __future__ import annotations

from pipeline.targets.compressed import plan_compressed_stage


def plan_stages(target, ctx):
    return plan_compressed_stage(target, ctx)
