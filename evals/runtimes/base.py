"""The contract every runtime adapter meets.

A :class:`Runtime` says whether it can run on a device here (a skip reason
otherwise, never an exception) and opens an artifact as a :class:`Session`,
which gives log-probabilities for accuracy and timed greedy generation for
speed. Sessions report what they actually ran (``info``): compute dtype,
whether low-bit weights were dequantized, bytes of weights read per token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


class Session:
    #: facts for the result: dequantized, compute_dtype, weight_bytes_per_token, notes, ...
    info: dict[str, Any]
    vocab_size: int
    #: the largest batch `generate` accepts (1 for runtimes without batched decode here)
    max_batch: int = 1

    def tokenize(self, text: str) -> list[int] | None:
        """The runtime's own tokenization (no BOS), or None when it uses the source's tokenizer as-is."""
        return None

    def window_logprobs(self, ids: Sequence[int], first: int) -> np.ndarray:
        """Log-probabilities (float32, [len(ids)-1-first, vocab]) of the next token at positions
        first .. len(ids)-2 of one window evaluated from an empty cache."""
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
        """Greedy-generate n_new tokens after each prompt (fresh cache);
        return (seconds to the first new token, seconds in total)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Runtime:
    name: str = ""
    dists: tuple[str, ...] = ()
    #: what its sessions can measure: "accuracy" needs full-vocabulary log-probabilities
    measures: tuple[str, ...] = ("accuracy", "speed")

    def unavailable(self, device: str) -> str | None:
        """Why this runtime cannot run on `device` here, or None when it can."""
        return None

    def versions(self) -> dict[str, str]:
        from pipeline.core.stage import tool_versions

        return tool_versions(*self.dists)

    def open(self, path: Path, device: str, threads: int, *, logits: bool = False) -> Session:
        """Load the artifact at `path` on `device`; `logits=True` when window_logprobs will be called."""
        raise NotImplementedError


def missing_module_reason(module: str, pip_name: str) -> str | None:
    """A skip reason when `module` does not import, else None."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{pip_name} is not installed ({module} does not import)"
    return None
