"""The ``tensorrt`` kind: NVIDIA ModelOpt checkpoints and TensorRT-LLM 1.x engines.

A ModelOpt checkpoint (FP8, INT4-AWQ, NVFP4; Hugging Face layout with
``quant_method: modelopt``) is what TensorRT-LLM's PyTorch backend, vLLM
(``--quantization modelopt``) and SGLang load; an engine is built with
``trtllm-build`` for one GPU model and TensorRT version. Settings and declaration
only; stages live in :mod:`pipeline.targets.tensorrt.stages`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.targets.base import ArtifactFormat, CheckContext, Found, KindDeclaration, TargetBase


class TensorRtTarget(TargetBase):
    """A ModelOpt-quantized checkpoint and, with tensorrt-llm 1.x on a GPU, an engine.

    Example::

        - {name: trt-fp8, kind: tensorrt, quant: fp8, output: both}
    """

    kind: Literal["tensorrt"]
    quant: Literal["fp8", "int4_awq", "nvfp4", "none"] = "fp8"
    kv_cache_quant: Literal["fp8"] | None = None
    output: Literal["checkpoint", "engine", "both"] = "both"
    max_batch_size: int = Field(8, ge=1, le=65_536)
    max_input_len: int = Field(1024, ge=1, le=10_000_000)
    max_seq_len: int = Field(2048, ge=1, le=10_000_000)
    max_num_tokens: int = Field(8192, ge=1, le=10_000_000)
    tp_size: int = Field(1, ge=1, le=1024)
    pp_size: int = Field(1, ge=1, le=1024)

    def needs_calibration(self) -> bool:
        return self.quant != "none"

    def problems(self, ctx: CheckContext) -> list[Found]:
        from pipeline.targets.tensorrt.settings import settings_problems

        found: list[Found] = []
        if self.quant == "none" and self.output == "checkpoint":
            found.append((("targets", ctx.index, "output"), "quant none has no ModelOpt checkpoint to write: use output engine, or a quant"))
        for msg in settings_problems(self, ctx.source_config, ctx.recipe.source.dtype):
            found.append((("targets", ctx.index), msg))
        return found


TENSORRT = KindDeclaration(
    kind="tensorrt",
    settings=TensorRtTarget,
    planner="pipeline.targets.tensorrt.stages:plan_stages",
    summary="NVIDIA ModelOpt checkpoint (FP8, INT4-AWQ, NVFP4) and TensorRT-LLM 1.x engine",
    formats=(
        # transformers would load a modelopt checkpoint silently wrong; accuracy comes from
        # reading it back by ModelOpt's documented layout (the modelopt_dequant runtime).
        ArtifactFormat(kind="tensorrt-checkpoint", serves_with=("tensorrt-llm", "vllm", "sglang"),
                       eval_runtimes={"cpu": ("modelopt_dequant",), "cuda": ("modelopt_dequant",)}),
        ArtifactFormat(kind="tensorrt-engine", serves_with=("tensorrt-llm",),
                       eval_runtimes={"cuda": ("tensorrt_llm",)}),
    ),
    ci_runner="gpu",
    libraries=("nvidia-modelopt", "tensorrt-llm"),
    requires=("nvidia-modelopt",),  # tensorrt-llm only for engines, whose stage is skipped without it
    extra="tensorrt",
)
