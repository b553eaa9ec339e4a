"""Which devices are here, and a fingerprint of each.

Device names (as ``evals.devices`` and ``--device`` use them):

* ``cpu`` — always present;
* ``cuda`` — any CUDA GPU;
* a GPU class (``h100``, ``h200``, ``a100``, ``l4``, ...) — a CUDA GPU whose
  name contains that class.

The fingerprint is what a result depends on besides its inputs: CPU model and
the instruction-set flags kernels dispatch on, core count, GPU name, driver and
CUDA versions, and the versions of the runtimes. Results cached under one
fingerprint are never reused under another.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from functools import lru_cache

# Flags that change which kernels torch/oneDNN and ggml pick; the full flag list also
# holds things (e.g. vulnerabilities mitigations) that vary between identical hosts.
KERNEL_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "sve", "neon",
)
RUNTIME_DISTS = ("torch", "transformers", "compressed-tensors", "llama-cpp-python", "vllm", "tensorrt-llm")


def _cpuinfo() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(f for f in KERNEL_FLAGS if f in flags)}


def cpu_threads_default() -> int:
    """Threads for evals when the recipe sets none: 1 on a 2-core machine (other jobs share it,
    and measured here 2 threads ran slower than 1 under load), else half the cores."""
    n = os.cpu_count() or 1
    return 1 if n <= 2 else max(1, n // 2)


@lru_cache(maxsize=1)
def cuda_gpus() -> tuple[dict, ...]:
    """Name, memory and compute capability of each CUDA GPU torch sees (empty without torch/CUDA)."""
    import shutil

    # Without an NVIDIA driver there is nothing to find: skip importing torch (seconds) for it.
    if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        return ()
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"})
    return tuple(out)


def gpu_class(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    n = name.lower().replace("nvidia", "").replace("geforce", "").strip()
    m = re.search(r"\b(rtx\s*\d{4}|[a-z]{1,2}\d{1,4}[a-z]?)\b", n)
    return m.group(1).replace(" ", "") if m else re.sub(r"[^a-z0-9]+", "-", n).strip("-")


def present_devices() -> list[str]:
    """Names of devices present here: 'cpu', and 'cuda' plus the GPU's class when a GPU is."""
    out = ["cpu"]
    gpus = cuda_gpus()
    if gpus:
        out.append("cuda")
        out.extend(sorted({gpu_class(g["name"]) for g in gpus}))
    return out


def resolve_devices(requested: str, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(devices to evaluate now, devices of the recipe that are not here).

    ``auto``: every device of the recipe that is present; ``cpu``/``cuda``/<class>:
    that device only, which must be present (else :class:`InvalidInput`).
    """
    from pipeline.errors import InvalidInput

    here = present_devices()
    if requested == "auto":
        now = [d for d in wanted if d in here]
        return now, [d for d in wanted if d not in here]
    if requested not in here:
        raise InvalidInput(f"device {requested!r} is not present on this machine (present: {', '.join(here)})")
    if requested not in wanted and requested != "cpu":
        # `--device cuda` on an H100 for a recipe that names `h100`: record it under the recipe's name.
        same = [d for d in wanted if d in here and d != "cpu"]
        requested = same[0] if same else requested
    return [requested], [d for d in wanted if d != requested and d not in here]


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


@lru_cache(maxsize=None)
def fingerprint(device: str) -> dict:
    """What results on `device` depend on, as a JSON-able dict."""
    from pipeline.core.stage import tool_versions

    cpu = _cpuinfo()
    fp: dict = {
        "device": device,
        "machine": platform.machine(),
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": tool_versions(*RUNTIME_DISTS),
    }
    if device != "cpu":
        gpus = cuda_gpus()
        matching = [g for g in gpus if device == "cuda" or gpu_class(g["name"]) == device]
        g = matching[0] if matching else {}
        import torch

        fp.update({
            "gpu": g.get("name"),
            "gpu_count": len(matching),
            "gpu_memory_gib": g.get("memory_gib"),
            "gpu_capability": g.get("capability"),
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        })
    return fp


def fingerprint_hash(fp: dict) -> str:
    """A short stable hash of a fingerprint (16 hex digits)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
