"""Where quantization runs (GPU or CPU) and with how many CPU threads.

Both are decided here, once, so every llm-compressor stage behaves the same and a
user can override them without editing recipes:

* ``QUANTFORGE_THREADS=N`` sets torch's intra-op thread count for the stage.
* ``CUDA_VISIBLE_DEVICES=`` (empty) keeps quantization on CPU on a GPU machine:
  llm-compressor picks its execution device itself (``torch.accelerator``), and
  hiding devices before torch starts is the only switch it honours.

The model is always *loaded* on CPU: llm-compressor's sequential pipeline onloads
one decoder layer at a time to the execution device (``get_main_device()``, the
first GPU when present), so a model larger than GPU memory still quantizes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

THREADS_ENV = "QUANTFORGE_THREADS"


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda[:i]": where llm-compressor executes layers
    threads: int  # torch intra-op threads for the CPU work of the stage

    def as_dict(self) -> dict:
        return {"device": self.device, "threads": self.threads}


def default_threads(cpu_count: int | None = None, on_gpu: bool = False) -> int:
    """Thread count when the user sets none.

    Measured on the 2-core machine with anything else running,
    GPTQ with 2 threads was 5-16x slower than with 1 (threads fight for the cores).
    So small machines get 1 thread; bigger ones keep a core or two free for the
    other builds and the OS. With a GPU the CPU only shuffles data: 4 is plenty.
    """
    n = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if on_gpu:
        return max(1, min(4, n))
    if n <= 2:
        return 1
    return max(1, min(n - 2, 16))


def threads_from_env(default: int) -> int:
    """``QUANTFORGE_THREADS`` when set (a positive integer), else ``default``."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        from pipeline.errors import InvalidInput

        raise InvalidInput(f"{THREADS_ENV}={raw!r} is not an integer") from None
    if value < 1:
        from pipeline.errors import InvalidInput

        raise InvalidInput(f"{THREADS_ENV}={raw!r} must be >= 1")
    return value


def quantize_device() -> str:
    """The device llm-compressor will execute layers on (mirrors its ``get_main_device``)."""
    import torch

    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cpu"


def choose_placement() -> Placement:
    device = quantize_device()
    return Placement(device=device, threads=threads_from_env(default_threads(on_gpu=device != "cpu")))


@contextlib.contextmanager
def applied(placement: Placement) -> Iterator[Placement]:
    """Set torch's intra-op thread count for the duration; restore it after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(placement.threads)
    try:
        yield placement
    finally:
        torch.set_num_threads(before)
