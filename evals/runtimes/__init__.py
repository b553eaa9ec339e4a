"""Runtimes that load artifacts for evaluation, looked up lazily by name.

Like lm-evaluation-harness's registry: a name maps to ``"module:attr"`` and the
module is imported only when asked for, so the CLI starts without importing
torch, llama.cpp, vLLM or TensorRT-LLM. Unknown names get a "did you mean".
"""

from __future__ import annotations

import difflib
import importlib

from pipeline.errors import InvalidInput

RUNTIMES: dict[str, str] = {
    "transformers": "evals.runtimes.transformers_rt:TransformersRuntime",
    "llama_cpp": "evals.runtimes.llama_cpp_rt:LlamaCppRuntime",
    "vllm": "evals.runtimes.vllm_rt:VllmRuntime",
    "tensorrt_llm": "evals.runtimes.tensorrt_llm_rt:TensorRtLlmRuntime",
    "modelopt_dequant": "evals.runtimes.modelopt_dequant_rt:ModelOptDequantRuntime",
}

#: artifact kind -> runtime name; None: no runtime here may load it (reason alongside).
RUNTIME_FOR_KIND: dict[str, str | None] = {
    "source": "transformers",
    "gptq": "transformers",
    "awq": "transformers",
    "fp8": "transformers",
    "gguf": "llama_cpp",
    "tensorrt-engine": "tensorrt_llm",
    # Served by TensorRT-LLM, vLLM (quantization="modelopt") or SGLang; plain transformers would
    # load it silently wrong, so accuracy comes from dequantizing it by ModelOpt's layout.
    "tensorrt-checkpoint": "modelopt_dequant",
}
NO_RUNTIME_REASON: dict[str, str] = {}


def get_runtime(name: str):
    """The runtime object registered as `name` (its module imported now)."""
    if name not in RUNTIMES:
        close = difflib.get_close_matches(name, list(RUNTIMES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInput(f"unknown runtime {name!r}{hint}; known: {', '.join(sorted(RUNTIMES))}")
    module, _, attr = RUNTIMES[name].partition(":")
    return getattr(importlib.import_module(module), attr)()


def runtime_for(kind: str) -> tuple[str | None, str | None]:
    """(runtime name, None) for an artifact kind, or (None, why nothing here can load it)."""
    if kind not in RUNTIME_FOR_KIND:
        return None, f"no runtime is registered for artifact kind {kind!r}"
    name = RUNTIME_FOR_KIND[kind]
    return (name, None) if name else (None, NO_RUNTIME_REASON.get(kind, f"no runtime loads {kind!r} here"))
