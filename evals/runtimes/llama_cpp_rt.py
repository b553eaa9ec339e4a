"""GGUF files through the llama_cpp Python binding (llama-cpp-python), CPU or CUDA.

CUDA is used only when quantforge's llama.cpp build is a CUDA build (its VERSION
file says so); otherwise a CUDA device is a skip with that reason. llama.cpp runs
the quantized types natively (``dequantized: false``).

Accuracy opens the model with ``logits_all=True`` (a logits row for every
position); speed opens it without, and reads the last row through
``llama_get_logits_ith(-1)``, as llama.cpp's own tools do.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from evals.accuracy import log_softmax
from evals.runtimes.base import Runtime, Session
from pipeline.backends.devices import Device


def gguf_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path} must hold exactly one .gguf file (found {len(files)})")
    return files[0]


def gguf_weight_bytes(file: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes read per generated token: all but the token-embedding table,
    of which one row is read, unless it doubles as the output matrix)."""
    from pipeline.backends.gguf_header import read_header

    tensors = read_header(file).tensors
    total = sum(t.n_bytes for t in tensors)
    emb = next((t.n_bytes for t in tensors if t.name == "token_embd.weight"), 0)
    has_output = any(t.name == "output.weight" for t in tensors)
    return total, total - (emb if has_output else 0)


def _llama_cpp():
    from pipeline.backends.llamacpp import binding

    return binding()


class LlamaCppSession(Session):
    def __init__(self, path: Path, device: str, threads: int, logits: bool, n_ctx: int = 0):
        llama_cpp = _llama_cpp()

        self.file = gguf_file(path)
        self.llm = llama_cpp.Llama(
            model_path=str(self.file),
            n_ctx=n_ctx,  # 0: the model's training context
            n_batch=2048,  # = self.n_batch
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1 if Device.of(device).on_gpu else 0,
            logits_all=logits,
            # llama.cpp's own tools (llama-bench, llama-perplexity, llama-server) default to
            # flash attention "auto", which is on for CPU and CUDA; the binding's bool can only
            # say on or off, and off would measure a configuration users do not run.
            flash_attn=True,
            verbose=False,
        )
        self._llama_cpp = llama_cpp
        self.n_batch = 2048
        self._one = (llama_cpp.llama_token * 1)()
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)
        self._view, self._view_addr = None, None
        self.vocab_size = int(self.llm.n_vocab())
        self.max_batch = 1  # the binding's high-level API decodes one sequence
        total, per_token = gguf_weight_bytes(self.file)
        meta = self.llm.metadata
        self.info = {
            "dequantized": False,
            "compute_dtype": "native GGUF types",
            "file_type": meta.get("general.file_type"),
            "weight_bytes_in_memory": total,
            "weight_bytes_per_token": per_token,
            "gpu_offload": Device.of(device).on_gpu,
            # llama-perplexity puts BOS at each window start when the GGUF says so; quantforge
            # follows the source tokenizer instead, so the two differ when these disagree.
            "gguf_add_bos": bool(self.llm._model.add_bos_token()),
            "notes": "llama.cpp runs the GGUF quant types with its own kernels",
        }

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def window_logprobs(self, ids: Sequence[int], first: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return log_softmax(np.array(self.llm.scores[first : len(ids) - 1], dtype=np.float32), np.float32)

    def _decode(self, tokens: list[int]) -> None:
        # The C API directly (llama_batch_get_one + llama_decode), as llama-bench does: the
        # binding's Llama.eval adds ~100 us of Python per call (batch filling, bookkeeping),
        # which measured 27-38% below llama-bench on the tiny demo model.
        lc = self._llama_cpp
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            arr = (lc.llama_token * len(chunk))(*chunk)
            rc = lc.llama_decode(self.llm.ctx, lc.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    def _step(self, tok: int) -> None:
        """Decode one token, reusing one ctypes array (the per-token path is what decode tok/s times)."""
        self._one[0] = tok
        rc = self._llama_cpp.llama_decode(self.llm.ctx, self._one_batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _next(self) -> int:
        """Greedy pick from the last logits row; the numpy view is rebuilt only when the buffer moves."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if addr != self._view_addr:
            self._view = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))
            self._view_addr = addr
        return int(self._view.argmax())

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
        if len(prompts) != 1:
            raise ValueError("llama_cpp binding: batch size 1 only")
        lc = self._llama_cpp
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)  # a fresh cache each time
        t0 = time.perf_counter()
        self._decode(prompts[0])
        tok = self._next()
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            self._step(tok)
            tok = self._next()
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


class LlamaCppRuntime(Runtime):
    name = "llama_cpp"
    dists = ("llama-cpp-python", "gguf")

    def unavailable(self, device: str) -> str | None:
        from pipeline.backends import llamacpp

        reason = llamacpp.missing()
        if reason or not Device.of(device).on_gpu:
            return reason
        # From the build's VERSION file, not by loading the library into this process (see llamacpp.binding).
        if not llamacpp.backend().startswith("cuda"):
            return f"the llama.cpp build in {llamacpp.tools_dir()} is a {llamacpp.backend()} build, so it cannot run on {device!r}: run `make setup` on a machine with nvcc"
        return None

    def versions(self) -> dict[str, str]:
        from pipeline.backends import llamacpp

        return {**super().versions(), "llama.cpp": llamacpp.version(), "llama.cpp backend": llamacpp.backend()}

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        return LlamaCppSession(Path(path), device, threads, logits)
