"""Speed of one artifact on one device, measured in a fresh process.

Following optimum-benchmark's inference scenario: the model is loaded in its
own process (so peak memory is this model's alone and nothing warm is shared
with other artifacts), each measurement is warmed up, then repeated until both
``min_iterations`` and ``min_seconds`` are reached; the median and the spread
(p25/p75 and min/max) are reported.

Measured, per prompt length L and batch size B (greedy decoding, fresh cache each
iteration, deterministic prompt token ids):

* ``ttft_s``: prompt in -> first new token out (prefill + one sampling step);
* ``prefill_tps``: B * L / ttft;
* ``decode_tps``: B * (N-1) / (time from the first to the N-th new token), i.e.
  decoding after a prompt of L tokens;
* ``load_seconds``, ``peak_rss_mib`` (this process's maximum resident set),
  ``cuda_max_allocated_mib`` on CUDA, ``artifact_bytes``.

Threads are set explicitly (``SpeedSpec.threads``, or 1 on a 2-core machine) and
recorded, through OMP/MKL environment variables before torch loads and the
runtime's own thread arguments.

    python -m evals.speed --runtime transformers --path MODEL --device cpu --threads 1 \
        --prompt-lengths 64,256 --decode-tokens 32 --batch-sizes 1 --min-iterations 3 --min-seconds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.backends.devices import Device

SPEED_VERSION = "1"


def stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(v)),
        "p25": float(np.quantile(v, 0.25)),
        "p75": float(np.quantile(v, 0.75)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def repeat(fn, warmup: int, min_iterations: int, min_seconds: float, max_iterations: int = 10_000) -> list:
    """Run fn() `warmup` times untimed, then until both minima are met; return fn's results."""
    for _ in range(warmup):
        fn()
    out, t0 = [], time.perf_counter()
    while len(out) < min_iterations or (time.perf_counter() - t0) < min_seconds:
        out.append(fn())
        if len(out) >= max_iterations:
            break
    return out


def prompt_ids(vocab: int, length: int, batch: int, seed: int = 0) -> list[list[int]]:
    """Deterministic prompt ids away from the special tokens at either end of small vocabularies."""
    rng = np.random.default_rng(seed)
    lo, hi = min(256, vocab // 4), max(min(vocab - 16, 30000), min(256, vocab // 4) + 1)
    return rng.integers(lo, hi, size=(batch, length)).tolist()


def peak_rss_mib() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def measure(runtime_name: str, path: Path, device: str, threads: int, prompt_lengths: list[int],
            decode_tokens: int, batch_sizes: list[int], warmup: int, min_iterations: int,
            min_seconds: float) -> dict:
    from evals.runtimes import get_runtime
    from pipeline.core.store import stored_bytes

    rt = get_runtime(runtime_name)
    t0 = time.perf_counter()
    session = rt.open(path, device, threads, logits=False)
    load_s = time.perf_counter() - t0
    n_new = max(2, decode_tokens)
    runs = []
    for b in batch_sizes:
        for length in prompt_lengths:
            row: dict = {"batch": b, "prompt_tokens": length, "decode_tokens": n_new}
            if b > session.max_batch:
                row["status"] = "skipped"
                row["reason"] = f"{runtime_name} decodes at most batch {session.max_batch} here"
                runs.append(row)
                continue
            prompts = prompt_ids(session.vocab_size, length, b)
            results = repeat(lambda: session.generate(prompts, n_new), warmup, min_iterations, min_seconds)
            ttft = [r[0] for r in results]
            decode = [b * (n_new - 1) / (r[1] - r[0]) for r in results]
            row.update({
                "status": "done",
                "ttft_s": stats(ttft),
                "prefill_tps": stats([b * length / t for t in ttft]),
                "decode_tps": stats(decode),
            })
            runs.append(row)
    out = {
        "status": "done",
        "runtime": runtime_name,
        "device": device,
        "threads": threads,
        "load_seconds": round(load_s, 4),
        "warmup": warmup,
        "min_iterations": min_iterations,
        "min_seconds": min_seconds,
        "runs": runs,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        # by stat: hashing every file (as the store's file table does) only to add sizes read each
        # artifact once more per eval
        "artifact_bytes": stored_bytes(Path(path)),
        **{k: v for k, v in session.info.items()},
    }
    if Device.of(device).on_gpu:
        if "torch" in sys.modules:  # a torch runtime: its allocator knows the peak
            import torch

            if torch.cuda.is_available():
                out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            # Never import torch beside llama.cpp: a CUDA build of it aborted when torch loaded
            # after it (seen on an H200). The driver's count for this process, model still loaded.
            used = gpu_process_memory_mib()
            if used is not None:
                out["cuda_max_allocated_mib"] = used
    session.close()
    return out


def gpu_process_memory_mib() -> float | None:
    """GPU memory this process holds, as nvidia-smi reports it (None where it cannot tell)."""
    from pipeline.backends.devices import nvidia_smi

    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    for row in (out or "").splitlines():
        pid, _, mib = row.partition(",")
        if pid.strip() == str(os.getpid()) and mib.strip().isdigit():
            return float(mib.strip())
    return None  # in a container the driver may list host process ids only


def headline(speed: dict) -> dict:
    """Batch-1 numbers at the first prompt length: what tables, gates and plots use."""
    for r in speed.get("runs", []):
        if r.get("status") == "done" and r["batch"] == 1:
            return {"prompt_tokens": r["prompt_tokens"], "prefill_tps": r["prefill_tps"]["median"],
                    "decode_tps": r["decode_tps"]["median"], "ttft_s": r["ttft_s"]["median"]}
    return {}


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--path", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-lengths", type=ints, default=[64, 256])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=ints, default=[1])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-iterations", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    a = ap.parse_args(argv)
    result = measure(a.runtime, a.path, a.device, a.threads, a.prompt_lengths, a.decode_tokens, a.batch_sizes,
                     a.warmup, a.min_iterations, a.min_seconds)
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
