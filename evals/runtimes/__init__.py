"""Runtimes that load artifacts for evaluation, looked up lazily by name.

Like lm-evaluation-harness's registry: a name maps to ``"module:attr"`` and the
module is imported only when asked for, so the CLI starts without importing
torch, llama.cpp, vLLM or TensorRT-LLM. Unknown names get a "did you mean".
Which runtime evaluates which artifact format on which device is declared by the
target kinds (``ArtifactFormat.eval_runtimes``) and chosen in
:func:`evals.stages.choose_runtimes`. Adding a runtime: one module with a
:class:`~evals.runtimes.base.Runtime` subclass, one line here, and its name in
the declarations of the formats it loads.
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

#: One name per runtime on every surface (tables, HTML, cards, MLflow).
RUNTIME_NAMES = {"transformers": "transformers", "llama_cpp": "llama.cpp", "modelopt_dequant": "modelopt",
                 "tensorrt_llm": "TensorRT-LLM", "vllm": "vLLM", "sglang": "SGLang"}


def runtime_label(runtime: str | None, dequantized: bool | None = False) -> str:
    """'llama.cpp', 'transformers dq' (dq: low-bit weights expanded to floats to run)."""
    if not runtime:
        return "-"
    return RUNTIME_NAMES.get(runtime, runtime) + (" dq" if dequantized else "")


def get_runtime(name: str):
    """The runtime object registered as `name` (its module imported now)."""
    if name not in RUNTIMES:
        close = difflib.get_close_matches(name, list(RUNTIMES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInput(f"unknown runtime {name!r}{hint}; known: {', '.join(sorted(RUNTIMES))}")
    module, _, attr = RUNTIMES[name].partition(":")
    return getattr(importlib.import_module(module), attr)()
