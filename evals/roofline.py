"""Memory-bandwidth roofline for decode speed.

Decoding one token at batch 1 reads every weight once, so a device cannot
decode faster than ``bandwidth / bytes read per token``. The bytes are the artifact's
stored weights (:func:`stored_bytes_per_token`): the ceiling the *format* buys, whatever
the runtime did with it. A runtime that dequantized the weights (transformers on
compressed-tensors, say) reads more than that, and its low %-of-ceiling says so. This module measures
the bandwidth (a large array copy: bytes read + bytes written over the time, best
of N; the eval's bandwidth stage runs it once per device fingerprint, cached in the
store); :func:`roofline` turns a decode rate into a percentage of that bound.

Caveats, recorded with each number: on CPU the copy runs on one thread (numpy's
copy is single-threaded), the right bound for the 1-thread decode runs used on
small machines but an underestimate of what many threads can pull; and a model
smaller than the last-level cache is served from cache, so its decode rate can
exceed 100% of the DRAM bound.
"""

from __future__ import annotations

import time
from pathlib import Path
from pipeline.backends.devices import Device

CPU_BYTES = 256 << 20  # well above any last-level cache of the CPUs here
CUDA_BYTES = 1 << 30
REPEATS = 5


def measure_bandwidth(device: str) -> dict:
    """Copy bandwidth in GB/s (1e9 bytes/s, read + written), best of REPEATS."""
    if not Device.of(device).on_gpu:
        import numpy as np

        src = np.ones(CPU_BYTES // 8, dtype=np.float64)
        dst = np.empty_like(src)
        best = float("inf")
        for _ in range(REPEATS + 1):  # +1: the first copy also faults the pages in
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t0)
        nbytes = 2 * src.nbytes
        method = f"numpy copy of {src.nbytes >> 20} MiB, 1 thread, best of {REPEATS}"
    else:
        import torch

        src = torch.ones(CUDA_BYTES // 2, dtype=torch.float16, device="cuda")
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(REPEATS + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
        nbytes = 2 * src.numel() * src.element_size()
        method = f"torch device-to-device copy of {CUDA_BYTES >> 20} MiB, best of {REPEATS}"
        del src, dst
        torch.cuda.empty_cache()
    return {"bandwidth_gbs": round(nbytes / best / 1e9, 2), "method": method}


def roofline(decode_tps: float | None, bytes_per_token: int | None, bandwidth_gbs: float | None) -> dict:
    """The batch-1 decode ceiling (bandwidth / bytes per token) and, when a decode rate was
    measured, that rate as a percentage of it."""
    if not bytes_per_token or not bandwidth_gbs:
        return {}
    bound = bandwidth_gbs * 1e9 / bytes_per_token
    out = {"bandwidth_gbs": bandwidth_gbs, "bytes_per_token": int(bytes_per_token), "bound_tps": round(bound, 1)}
    if decode_tps:
        out["pct"] = round(100.0 * decode_tps / bound, 1)
    return out


EMBEDDING_NAMES = ("embed_tokens.weight", "token_embd.weight", "wte.weight", "tok_embeddings.weight", "word_embeddings.weight")
OUTPUT_NAMES = ("lm_head.weight", "output.weight")


def stored_bytes_per_token(path: Path) -> int | None:
    """Bytes of stored weights one decoded token reads: every tensor of the artifact (scales and
    zero points included) but the token-embedding table, of which one row is read, unless the
    model has no separate output matrix and uses the table as one. A GGUF file, or a folder of
    safetensors (Hugging Face, compressed-tensors, ModelOpt exports); None for anything else."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        files = ggufs if len(ggufs) == 1 else sorted(path.glob("*.safetensors"))
    else:
        files = [path]
    sizes: dict[str, int] = {}
    for f in files:
        if f.suffix == ".gguf":
            from pipeline.backends.gguf_header import read_header

            sizes.update({t.name: t.n_bytes for t in read_header(f).tensors})
        elif f.suffix == ".safetensors":
            sizes.update(safetensors_sizes(f))
    if not sizes:
        return None
    total = sum(sizes.values())
    embedding = sum(n for name, n in sizes.items() if name.endswith(EMBEDDING_NAMES))
    has_output = any(name.endswith(OUTPUT_NAMES) for name in sizes)
    return total - (embedding if has_output else 0)


def safetensors_sizes(file: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from a safetensors header (8-byte length, then JSON with each
    tensor's data offsets). Read directly: the header is all that is needed, and reading it
    through the safetensors library would map the whole file."""
    import json
    import struct

    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
