"""Cross-check quantforge's GGUF evals against llama.cpp's own tools, on the same files.

    .venv/bin/python benchmarks/crosscheck_llamacpp.py [--recipe recipes/demo.yaml] [--quants F16,Q8_0]
        [--device auto|cpu|cuda] [--threads 1] [--context 256] [--chunks 16] [--gen 128] [--rounds 3]
        [--work DIR] [--gguf FILE ...] [--skip-speed] [--skip-ppl] [--json OUT.json]

The GGUFs: the recipe's source model (built by its source stage; the demo's is
SmolLM2-135M-Instruct) converted to F16 by quantforge's converter wrapper, then
``llama-quantize`` to each other type. ``--gguf FILE`` checks existing files instead.

1. Perplexity (within 0.5 %): quantforge's accuracy code
   (``evals.accuracy.run_accuracy``, runtime ``llama_cpp``, run by the eval worker
   ``python -m evals.worker`` as ``quantforge eval`` runs it) vs ``llama-perplexity -c C -b C --chunks N``, on the
   recipe's eval suite text. Windows are lined up as llama-perplexity cuts them:
   non-overlapping windows of C tokens from the text's first token, the second half of
   each scored; the ids are the source tokenizer's, which quantforge checks equal
   llama.cpp's own tokenization (a GGUF that adds BOS gets BOS at every window start on
   both sides; see ``aligned_accuracy``).
2. Decode speed (within 10 %): the eval's speed measurement
   (``evals.speed`` in the eval worker, runtime ``llama_cpp``: a 1-token prompt, then G timed
   decode steps) vs ``llama-bench -p 0 -n G -t T`` (G decode steps from an empty
   context), with ``-ngl 99`` and quantforge's device ``cuda`` when the llama.cpp
   build is a CUDA one (``llamacpp.backend()``) and the device is cuda. The tools
   alternate for ``--rounds`` rounds and the best round of each is compared: on a
   shared machine other load only ever slows a run down.

Prints one line per check (both numbers, the relative difference, PASS/FAIL); exit 1
when a check fails, 2 when llama.cpp's tools are missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, host_info  # noqa: E402

sys.path.insert(0, str(REPO))
PPL_TOL_PCT = 0.5
SPEED_TOL_PCT = 10.0


# ------------------------------------------------------------------ the tools
def llama_perplexity(gguf: Path, text_file: Path, context: int, chunks: int, threads: int, ngl: list[str]) -> dict:
    from pipeline.backends import llamacpp
    from pipeline.core.proc import tail

    out = llamacpp.run_tool("llama-perplexity", ["-m", gguf, "-f", text_file, "-c", context, "-b", context, "--chunks", chunks,
                                                 "-t", threads, "-tb", threads, *ngl], log=lambda m: None)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no 'Final estimate' in llama-perplexity's output:\n{tail(out)}")
    chunks_done = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {"perplexity": float(m.group(1)), "chunks": int(chunks_done.group(1)) if chunks_done else None}


def llama_bench(gguf: Path, threads: int, gen: int, reps: int, ngl: list[str]) -> dict:
    from pipeline.backends import llamacpp

    out = llamacpp.run_tool("llama-bench", ["-m", gguf, "-p", 0, "-n", gen, "-t", threads, "-r", reps, "-o", "json", *ngl],
                            log=lambda m: None)
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    tg = next(r for r in rows if r.get("n_gen") == gen)
    return {"decode_tps": float(tg["avg_ts"]), "stddev_tps": float(tg.get("stddev_ts") or 0.0),
            "flash_attn": tg.get("flash_attn"), "n_gpu_layers": tg.get("n_gpu_layers"), "backends": tg.get("backends")}


# ------------------------------------------------------------------ quantforge's side
def eval_worker(job: dict, name: str) -> dict:
    """One job of the eval worker (`python -m evals.worker`), as `quantforge eval` runs it: a process
    made for llama.cpp, which loads it first and nothing beside it that a CUDA build cannot share."""
    from pipeline.core.proc import call

    return call("evals.worker", job, what=f"the eval worker ({name})", threads=job["threads"])


def quantforge_accuracy(path: Path, ids_file: Path, text_file: Path, context: int, chunks: int, threads: int, device: str,
                        bos: int | None) -> dict:
    """The eval's accuracy measurement (run_accuracy) in its worker."""
    job = {"runtime": "llama_cpp", "path": str(path), "device": device, "threads": threads,
           "accuracy": {"ids": str(ids_file), "text": str(text_file), "context": context, "max_windows": chunks, "bos": bos}}
    return eval_worker(job, f"acc-{path.stem}")["accuracy"]


def aligned_accuracy(path: Path, ids: list[int], context: int, chunks: int, threads: int, device: str, bos: int) -> dict:
    """For a GGUF that adds BOS: llama-perplexity tokenizes the text *with* BOS, so its windows start
    one token earlier than ids without it. The eval's own window and scoring code on [BOS] + ids gives
    exactly its windows (run_accuracy would refuse ids that differ from llama.cpp's BOS-less tokenization)."""
    from evals.accuracy import evaluate_windows, make_windows
    from evals.runtimes import get_runtime

    session = get_runtime("llama_cpp").open(path, device, threads, logits=True)
    try:
        metrics, _ = evaluate_windows(session.window_logprobs, make_windows([bos, *ids], context, chunks, bos))
    finally:
        session.close()
    return {**metrics, "status": "done", "note": "BOS-prefixed ids (the GGUF adds BOS)"}


def quantforge_speed(path: Path, threads: int, gen: int, device: str) -> dict:
    """The eval's speed measurement in its worker."""
    job = {"runtime": "llama_cpp", "path": str(path), "device": device, "threads": threads,
           "speed": {"prompt_lengths": [1], "decode_tokens": gen + 1, "batch_sizes": [1], "warmup": 1,
                     "min_iterations": 5, "min_seconds": 2}}
    data = eval_worker(job, f"speed-{path.stem}")["speed"]
    if data.get("status") != "done":
        raise RuntimeError(f"speed of {path.name}: {data.get('reason')}")
    run = next(r for r in data["runs"] if r.get("status") == "done")
    return {"decode_tps": run["decode_tps"]["median"], "decode_tps_max": run["decode_tps"]["max"], "n": run["decode_tps"]["n"],
            "gpu_offload": data.get("gpu_offload")}


# ------------------------------------------------------------------ inputs
def make_ggufs(a, work: Path) -> tuple[list[tuple[str, Path]], Path | None, str]:
    """(label, file) per type, the source model folder (None with --gguf), and the eval suite's text."""
    from pipeline.plan import make_plan
    from pipeline.core.runner import execute
    from pipeline.data.suites import load_suite
    from pipeline.backends import llamacpp
    from pipeline.validation import load_recipe

    loaded = load_recipe(a.recipe)
    spec = loaded.recipe.evals
    text = load_suite(spec.suite, base_dir=loaded.path.parent, column=spec.column).text
    if a.gguf:
        return [(p.stem, p.resolve()) for p in a.gguf], None, text
    plan = make_plan(loaded, work / "artifacts")
    source = next(s for s in plan.stages if s.name == "source")
    print(f"== source model ({source.description})", file=sys.stderr, flush=True)
    res = execute([source], work / "artifacts", log=lambda m: print(m, file=sys.stderr, flush=True))["source"]
    if res.output is None:
        raise SystemExit(f"source: {res.reason}")
    model_dir = res.output.model_dir
    pre = next((t.pre_tokenizer for t in loaded.recipe.targets if t.kind == "gguf" and getattr(t, "pre_tokenizer", None)), None)
    from pipeline.targets.gguf.convert import convert

    files = []
    f16 = work / "F16" / "model-F16.gguf"
    if not f16.is_file():
        f16.parent.mkdir(parents=True, exist_ok=True)
        print(f"== converting to F16 (pre-tokenizer {pre or 'detected'})", file=sys.stderr, flush=True)
        convert(model_dir, f16, "f16", log=lambda m: None, pre_tokenizer=pre)
    for quant in a.quants:
        if quant == "F16":
            files.append(("F16", f16))
            continue
        q = work / quant / f"model-{quant}.gguf"
        if not q.is_file():
            q.parent.mkdir(parents=True, exist_ok=True)
            llamacpp.run_tool("llama-quantize", [f16, q, quant, a.threads], log=lambda m: None)
        files.append((quant, q))
    return files, model_dir, text


def resolve_device(device: str) -> str:
    from pipeline.backends import llamacpp

    cuda_build = llamacpp.backend().startswith("cuda")
    if device == "auto":
        return "cuda" if cuda_build and llamacpp._nvidia_gpu_present() else "cpu"
    if device == "cuda" and not cuda_build:
        raise SystemExit(f"--device cuda: the llama.cpp build in {llamacpp.tools_dir()} is {llamacpp.backend()!r}, not a CUDA build")
    return device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml", help="its source model and eval suite text")
    ap.add_argument("--quants", type=lambda s: [x for x in s.split(",") if x], default=["F16", "Q8_0"])
    ap.add_argument("--gguf", type=Path, action="append", help="check these files instead (ids from llama.cpp's tokenizer)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--gen", type=int, default=128, help="decode steps timed (llama-bench -n)")
    ap.add_argument("--reps", type=int, default=5, help="llama-bench -r")
    ap.add_argument("--rounds", type=int, default=3, help="alternating speed rounds per tool; the best of each is compared")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--work", type=Path, help="work folder (kept; the source model and GGUFs are reused); default: a temp folder")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import numpy as np

    from pipeline.backends import llamacpp
    from pipeline.targets.gguf.stages import read_gguf

    why = llamacpp.missing(["llama-perplexity", "llama-bench", "llama-quantize"])
    if why:
        print(why, file=sys.stderr)
        return 2
    device = resolve_device(a.device)
    ngl = ["-ngl", "99"] if device == "cuda" else []
    work = (a.work or Path(tempfile.mkdtemp(prefix="qf-crosscheck-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    files, model_dir, text = make_ggufs(a, work)
    text_file, ids_file = work / "suite.txt", work / "ids.npy"
    text_file.write_text(text, encoding="utf-8")
    if model_dir is not None:
        from evals.accuracy import tokenize_source

        ids = tokenize_source(model_dir, text)
    else:
        ids = llamacpp.tokenize(files[0][1], text)
    np.save(ids_file, np.asarray(ids, dtype=np.int64))
    chunks = min(a.chunks, len(ids) // a.context)

    rows, ok, details = [], True, {}

    def check(name: str, ours: float, theirs: float, tol: float) -> None:
        nonlocal ok
        diff = 100.0 * (ours / theirs - 1.0)
        passed = abs(diff) <= tol
        ok &= passed
        rows.append({"check": name, "quantforge": ours, "llama.cpp": theirs, "diff_pct": round(diff, 4), "tol_pct": tol,
                     "result": "PASS" if passed else "FAIL"})

    if not a.skip_ppl:
        for label, f in files:
            meta = read_gguf(f)["metadata"]
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token"))
            bos = meta.get("tokenizer.ggml.bos_token_id") if add_bos else None
            print(f"== perplexity {label}", file=sys.stderr, flush=True)
            if add_bos:
                ours = aligned_accuracy(f, ids, a.context, chunks, a.threads, device, int(bos))
            else:
                ours = quantforge_accuracy(f, ids_file, text_file, a.context, chunks, a.threads, device, None)
            if ours.get("status") != "done":
                print(f"{label}: quantforge's accuracy {ours.get('status')}: {ours.get('reason')}")
                return 1
            theirs = llama_perplexity(f, text_file, a.context, chunks, a.threads, ngl)
            details[f"ppl {label}"] = {"quantforge": ours, "llama-perplexity": theirs, "add_bos": add_bos}
            check(f"perplexity {label} ({ours['windows']} x {a.context}, {ours['tokens_scored']} scored)",
                  ours["perplexity"], theirs["perplexity"], PPL_TOL_PCT)
    if not a.skip_speed:
        for label, f in files:
            ours_r, bench_r = [], []
            for r in range(a.rounds):
                print(f"== decode speed {label}, round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
                ours_r.append(quantforge_speed(f, a.threads, a.gen, device))
                bench_r.append(llama_bench(f, a.threads, a.gen, a.reps, ngl))
            details[f"decode {label}"] = {"quantforge": ours_r, "llama-bench": bench_r}
            check(f"decode tok/s {label} (tg{a.gen}, {device}, -t {a.threads}{' -ngl 99' if ngl else ''}; best of {a.rounds})",
                  max(r["decode_tps"] for r in ours_r), max(r["decode_tps"] for r in bench_r), SPEED_TOL_PCT)

    print(f"\nllama.cpp {llamacpp.version()} ({llamacpp.backend()}); device {device}; threads {a.threads}; "
          f"context {a.context}; text {len(ids)} tokens ({a.recipe.name}'s eval suite)")
    print(f"{'check':<72} {'quantforge':>12} {'llama.cpp':>12} {'diff %':>8} {'tol %':>6}  result")
    for r in rows:
        print(f"{r['check']:<72} {r['quantforge']:>12.4f} {r['llama.cpp']:>12.4f} {r['diff_pct']:>+8.3f} {r['tol_pct']:>6.1f}  {r['result']}")
    print("perplexity: quantforge = evals.accuracy (llama_cpp runtime), llama.cpp = llama-perplexity; "
          "decode: quantforge = evals.speed median, llama.cpp = llama-bench avg_ts.")
    if a.json:
        a.json.write_text(json.dumps({"host": host_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "llama_cpp": llamacpp.version(), "backend": llamacpp.backend(), "device": device,
                                      "threads": a.threads, "context": a.context, "chunks": chunks, "files": [str(f) for _, f in files],
                                      "checks": rows, "details": details}, indent=2, default=str))
    if a.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
