"""TensorRT-LLM engines: only where ``tensorrt_llm`` imports and a CUDA GPU is present.

TensorRT and TensorRT-LLM are not installable on these machines (their PyPI
packages are stubs that download from NVIDIA's index), so here this adapter
always skips with the reason; on a machine that has them it times generation
through the ``tensorrt_llm.LLM`` API on the engine folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from evals.runtimes.base import Runtime, Session, missing_module_reason
from pipeline.backends.devices import Device


class TensorRtLlmSession(Session):
    def __init__(self, path: Path):
        from tensorrt_llm import LLM

        self.llm = LLM(model=str(path))
        self.vocab_size = 0
        self.max_batch = 256
        self.info = {"dequantized": False, "notes": "TensorRT-LLM engine kernels as built"}

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
        from tensorrt_llm import SamplingParams

        t0 = time.perf_counter()
        self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        t1 = time.perf_counter()
        self.llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True))
        return t1 - t0, time.perf_counter() - t1


class TensorRtLlmRuntime(Runtime):
    name = "tensorrt_llm"
    measures = ("speed",)  # top-k prompt logprobs at most: no full-vocabulary KL
    dists = ("tensorrt-llm", "tensorrt")

    def unavailable(self, device: str) -> str | None:
        reason = missing_module_reason("tensorrt_llm", "tensorrt-llm")
        if reason:
            return reason + "; TensorRT-LLM engines need it and a CUDA GPU"
        if not Device.of(device).on_gpu:
            return "TensorRT-LLM engines run on CUDA GPUs only"
        return None

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        if logits:
            raise RuntimeError("full-vocabulary log-probabilities are not read from TensorRT-LLM engines here")
        return TensorRtLlmSession(Path(path))
