"""Memory-bandwidth roofline for decode speed.

Decoding one token at batch 1 reads every weight once, so a device cannot
decode faster than ``bandwidth / bytes read per token``. This module measures
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

CPU_BYTES = 256 << 20  # well above any last-level cache of the CPUs here
CUDA_BYTES = 1 << 30
REPEATS = 5


def measure_bandwidth(device: str) -> dict:
    """Copy bandwidth in GB/s (1e9 bytes/s, read + written), best of REPEATS."""
    if device == "cpu":
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
    """Decode tokens/s as a percentage of bandwidth / bytes-per-token."""
    if not decode_tps or not bytes_per_token or not bandwidth_gbs:
        return {}
    bound = bandwidth_gbs * 1e9 / bytes_per_token
    return {"bandwidth_gbs": bandwidth_gbs, "bytes_per_token": int(bytes_per_token),
            "bound_tps": round(bound, 1), "pct": round(100.0 * decode_tps / bound, 1)}
