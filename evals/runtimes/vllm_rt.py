"""vLLM: only where it imports (a CUDA machine with vllm installed); a skip with a reason otherwise.

The adapter gives speed through vLLM's offline ``LLM.generate`` and
log-probabilities of the top tokens through ``prompt_logprobs``; vLLM returns at
most ``max_logprobs`` per position, so full-vocabulary KL is not available from
it and accuracy is reported as perplexity only.
"""

from __future__ import annotations

import time
from pathlib import Path

from evals.runtimes.base import Runtime, Session, missing_module_reason
from pipeline.backends.devices import Device


class VllmSession(Session):
    def __init__(self, path: Path, threads: int):
        from vllm import LLM

        self.llm = LLM(model=str(path), enforce_eager=False, max_model_len=4096)
        self.vocab_size = self.llm.get_tokenizer().vocab_size
        self.max_batch = 256
        self.info = {"dequantized": False, "notes": "vLLM picks its own low-bit kernels for the checkpoint's quant method"}

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
        from vllm import SamplingParams, TokensPrompt

        sp1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        spn = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        t0 = time.perf_counter()
        self.llm.generate(batch, sp1, use_tqdm=False)
        t1 = time.perf_counter()
        self.llm.generate(batch, spn, use_tqdm=False)
        t2 = time.perf_counter()
        # Two calls: the first token's time, then the whole run (prefill included once more).
        return t1 - t0, (t2 - t1)


class VllmRuntime(Runtime):
    name = "vllm"
    measures = ("speed",)  # top-k prompt logprobs at most: no full-vocabulary KL
    dists = ("vllm", "torch")

    def unavailable(self, device: str) -> str | None:
        reason = missing_module_reason("vllm", "vllm")
        if reason:
            return reason
        if not Device.of(device).on_gpu:
            return "quantforge runs vLLM on CUDA devices only"
        return None

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        if logits:
            raise RuntimeError("vLLM returns only top-k prompt logprobs; full-vocabulary accuracy is not measured with it")
        return VllmSession(Path(path), threads)
