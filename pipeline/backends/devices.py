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
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

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
    # Without an NVIDIA driver there is nothing to find: skip importing torch (seconds) for it.
    if not (os.path.exists("/dev/nvidiactl") or nvidia_gpus()):
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

    if requested != "auto":
        try:
            Device.parse(requested)
        except ValueError as exc:
            raise InvalidInput(f"--device: {exc}") from None
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


def nvidia_smi(*args: str, timeout: float = 20) -> str | None:
    """nvidia-smi's output for these arguments, or None where there is no working one: the one
    place quantforge asks the NVIDIA driver (it needs no torch, which plan-time checks and
    llama.cpp's processes must not import)."""
    import shutil

    from pipeline.core.proc import ChildFailed, run_tool

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return run_tool([exe, *args], timeout=timeout, merge=False)
    except ChildFailed:  # a driver that does not answer is no driver here
        return None


@lru_cache(maxsize=1)
def nvidia_gpus() -> tuple[dict, ...]:
    """Each NVIDIA GPU the driver lists: name, memory (MiB), compute capability, driver version."""
    out = nvidia_smi("--query-gpu=name,memory.total,compute_cap,driver_version", "--format=csv,noheader,nounits")
    gpus = []
    for line in (out or "").strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 4:
            continue
        name, mem, cap, driver = parts
        gpus.append({"name": name, "memory_mib": int(mem) if mem.isdigit() else None, "capability": cap, "driver": driver})
    return tuple(gpus)


def _nvidia_driver() -> str | None:
    gpus = nvidia_gpus()
    return gpus[0]["driver"] if gpus else None


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


# ----------------------------------------------------------------------------------------------
# Device names as recipes and --device write them: parsing and validation, in one place.

#: NVIDIA GPU classes as :func:`gpu_class` names them (data center, workstation and consumer).
#: A GPU present on this machine is known too, whatever its class, so a new model needs no edit
#: here to be evaluated where it is; this table is what a validate job on another machine checks.
GPU_CLASSES = frozenset({
    "b100", "b200", "b300", "gb200", "gb300", "gh200", "h100", "h200", "h800", "h20",
    "a100", "a800", "a40", "a30", "a16", "a10", "a10g", "a2", "l40", "l40s", "l20", "l4", "t4",
    "v100", "p100", "p40", "p4", "k80", "rtxpro6000",
    "a6000", "a5000", "a4500", "a4000", "rtx6000", "rtx5000", "rtx4500", "rtx4000",
    "rtx5090", "rtx5080", "rtx5070", "rtx4090", "rtx4080", "rtx4070", "rtx4060",
    "rtx3090", "rtx3080", "rtx3070", "rtx3060", "rtx2080", "rtx2070",
})
#: Accelerators a user may reasonably name that quantforge does not evaluate on (yet): each
#: needs eval runtimes and a probe before it can be a device.
UNSUPPORTED_DEVICES = {
    "mps": "Apple GPUs (mps) are not supported yet: evaluate on cpu",
    "rocm": "AMD GPUs (rocm) are not supported yet",
    "hip": "AMD GPUs (rocm/hip) are not supported yet",
    "xpu": "Intel GPUs (xpu) are not supported yet",
    "tpu": "TPUs are not supported: quantforge evaluates on cpu, cuda and NVIDIA GPU classes",
    "gpu": "name the GPU kind: `cuda` (any NVIDIA GPU) or a GPU class such as h100",
}


@dataclass(frozen=True)
class Device:
    """A device name a recipe or ``--device`` may use: ``cpu``, ``cuda`` (any NVIDIA GPU) or a GPU
    class (``h100``: a CUDA GPU of that class). ``kind`` is the class eval runtimes are chosen by."""

    name: str
    kind: Literal["cpu", "cuda"]  # room for others (rocm, mps) once a runtime runs on them
    index: int | None = None  # one GPU of several (`cuda:1`): runtimes take it, recipes name classes

    @property
    def on_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def torch(self) -> str:
        """The torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
        if self.kind == "cpu":
            return "cpu"
        return f"cuda:{self.index}" if self.index is not None else "cuda"

    @classmethod
    def of(cls, name: "str | Device") -> "Device":
        """A device as the code that runs on it names it: anything :meth:`parse` takes, and one GPU
        by index (``cuda:1``). Runtimes and measurements ask this, not ``name == "cpu"``."""
        if isinstance(name, Device):
            return name
        n = name.strip().lower()
        m = re.fullmatch(r"cuda:(\d+)", n)
        if m:
            return cls(n, "cuda", int(m.group(1)))
        return _parsed(n)

    @classmethod
    def parse(cls, name: str) -> "Device":
        """The device `name` names; ValueError saying why not, with a did-you-mean, otherwise."""
        import difflib

        n = name.strip().lower() if isinstance(name, str) else name
        if n == "cpu":
            return cls("cpu", "cpu")
        if n == "cuda" or n in GPU_CLASSES:
            return cls(n, "cuda")
        if isinstance(n, str) and re.fullmatch(r"cuda:\d+", n):
            raise ValueError(f"device {name!r}: recipes name device classes, not GPU indices: use 'cuda' "
                             "(and CUDA_VISIBLE_DEVICES to pick the GPU)")
        if n in UNSUPPORTED_DEVICES:
            raise ValueError(f"device {name!r}: {UNSUPPORTED_DEVICES[n]}")
        if isinstance(n, str) and n in {gpu_class(g["name"]) for g in cuda_gpus()}:
            return cls(n, "cuda")  # a GPU of a class newer than the table, present here
        known = ["cpu", "cuda", *sorted(GPU_CLASSES)]
        close = difflib.get_close_matches(str(n), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown device {name!r}{hint}: use cpu, cuda, or an NVIDIA GPU class such as h100, a100, l4")


@lru_cache(maxsize=64)
def _parsed(name: str) -> Device:
    return Device.parse(name)
