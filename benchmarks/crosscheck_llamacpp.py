"""Cross-check quantforge's evals against llama.cpp's own tools on the same files and text.

Checks (exit 1 when one fails, 2 when the tools are missing):

1. quantforge's GGUF perplexity (llama_cpp binding, evals.accuracy) equals
   ``llama-perplexity`` on the same text, context and chunk count, within 0.5%,
   for the F32 GGUF and a quantized one;
2. the source in transformers (float32) equals its F32 GGUF in llama.cpp within 0.1%;
3. quantforge's GGUF prefill and decode tok/s (evals.speed) are within 10% of
   ``llama-bench`` with the same threads and prompt/generation lengths
   (pp: ``-p P -n 0``; tg: ``-p 0 -n G -d P``, i.e. decoding after P tokens of
   context, which is what evals.speed times); best of ``--rounds`` alternating
   rounds each, since other load on a shared machine only slows runs down.

    .venv/bin/python benchmarks/crosscheck_llamacpp.py [--source HF_DIR] [--quant Q4_K_M]
        [--threads 1] [--context 256] [--chunks 16] [--prompt 64] [--gen 32]

Without --source it trains the demo model tiny-llama-mini into a temporary folder.
Speed is sensitive to other load on the machine: run it on an idle one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def llama_perplexity(gguf: Path, text_file: Path, context: int, chunks: int, threads: int) -> float:
    from pipeline.targets.gguf import llamacpp

    out = llamacpp.run_tool("llama-perplexity", ["-m", gguf, "-f", text_file, "-c", context, "-b", context,
                                                 "--chunks", chunks, "-t", threads, "-tb", threads], log=lambda m: None)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no 'Final estimate' in llama-perplexity output:\n{llamacpp.tail(out)}")
    return float(m.group(1))


def llama_bench(gguf: Path, threads: int, prompt: int, gen: int, reps: int) -> dict:
    from pipeline.targets.gguf import llamacpp

    def run(args) -> list[dict]:
        out = llamacpp.run_tool("llama-bench", ["-m", gguf, "-t", threads, "-r", reps, "-o", "json", *args], log=lambda m: None)
        return json.loads(out[out.index("["):])

    pp = run(["-p", prompt, "-n", 0])
    tg = run(["-p", 0, "-n", gen, "-d", prompt])
    return {"prefill_tps": float(pp[0]["avg_ts"]), "decode_tps": float(tg[0]["avg_ts"])}


def quantforge_ppl(runtime: str, path: Path, ids_file: Path, text_file: Path, context: int, chunks: int,
                   threads: int, work: Path) -> dict:
    out = work / f"acc-{runtime}-{path.name}.json"
    cmd = [sys.executable, "-m", "evals.accuracy", "--runtime", runtime, "--path", str(path), "--threads", str(threads),
           "--ids", str(ids_file), "--text", str(text_file), "--context", str(context), "--max-windows", str(chunks),
           "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def quantforge_speed(path: Path, threads: int, prompt: int, gen: int, work: Path) -> dict:
    from evals.speed import headline, thread_env

    out = work / f"speed-{path.name}.json"
    cmd = [sys.executable, "-m", "evals.speed", "--runtime", "llama_cpp", "--path", str(path), "--threads", str(threads),
           "--prompt-lengths", str(prompt), "--decode-tokens", str(gen), "--warmup", "2", "--min-iterations", "10",
           "--min-seconds", "3", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, env=thread_env(threads))
    return headline(json.loads(out.read_text()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternating speed rounds per tool; the best of each is compared")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (GGUF files, results)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--pre-tokenizer", default="gpt-2",
                    help="llama.cpp pre-tokenizer for the converter (the demo's byte-level BPE is gpt-2); '' to let it detect")
    a = ap.parse_args(argv)

    import numpy as np

    from evals.accuracy import bos_for_windows, tokenize_source
    from pipeline.targets.gguf import llamacpp
    from pipeline.data.corpus import corpus_text

    why = llamacpp.missing(["llama-perplexity", "llama-bench", "llama-quantize"])
    if why:
        print(why, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qf-crosscheck-"))
    source = a.source
    if source is None:
        from pipeline.sources.tiny import train_demo_model

        source = work / "mini"
        source.mkdir()
        train_demo_model("tiny-llama-mini", source, log=lambda m: None)
    if bos_for_windows(source) is not None:
        print("note: the tokenizer adds BOS; both sides replace each window's first token with it")

    from pipeline.targets.gguf.convert import convert

    f32_dir, q_dir = work / "f32", work / a.quant.lower()
    f32_dir.mkdir()
    q_dir.mkdir()
    f32 = f32_dir / "model-F32.gguf"
    convert(source, f32, "f32", log=lambda m: None, pre_tokenizer=a.pre_tokenizer or None)
    qfile = q_dir / f"model-{a.quant}.gguf"
    llamacpp.run_tool("llama-quantize", [f32, qfile, a.quant, a.threads], log=lambda m: None)

    text = corpus_text("heldout")
    text_file, ids_file = work / "heldout.txt", work / "ids.npy"
    text_file.write_text(text, encoding="utf-8")
    np.save(ids_file, np.asarray(tokenize_source(source, text), dtype=np.int64))

    rows, ok = [], True

    def check(name: str, ours: float, theirs: float, tol_pct: float):
        nonlocal ok
        diff = 100.0 * (ours / theirs - 1.0)
        passed = abs(diff) <= tol_pct
        ok &= passed
        rows.append((name, ours, theirs, diff, tol_pct, passed))

    hf = quantforge_ppl("transformers", source, ids_file, text_file, a.context, a.chunks, a.threads, work)
    for label, d, f in (("F32", f32_dir, f32), (a.quant, q_dir, qfile)):
        ours = quantforge_ppl("llama_cpp", d, ids_file, text_file, a.context, a.chunks, a.threads, work)
        if ours.get("status") != "done":
            print(f"{label}: quantforge accuracy {ours.get('status')}: {ours.get('reason')}")
            return 1
        check(f"ppl {label}: quantforge vs llama-perplexity", ours["perplexity"],
              llama_perplexity(f, text_file, a.context, a.chunks, a.threads), 0.5)
        if label == "F32":
            check("ppl source: transformers fp32 vs F32 GGUF (quantforge)", hf["perplexity"], ours["perplexity"], 0.1)
    if not a.skip_speed:
        # Alternate the two tools for a few rounds and compare the best of each: on a shared
        # machine, load from other jobs only ever slows a run down, so the fastest round of each
        # is the fairest estimate (one back-to-back pair measured llama-bench at 4006 and 4762 tok/s).
        for label, d, f in (("F32", f32_dir, f32), (a.quant, q_dir, qfile)):
            ours_r, bench_r = [], []
            for _ in range(a.rounds):
                ours_r.append(quantforge_speed(d, a.threads, a.prompt, a.gen, work))
                bench_r.append(llama_bench(f, a.threads, a.prompt, a.gen, a.reps))
            for metric, what in (("prefill_tps", f"prefill tok/s {label} (p={a.prompt})"),
                                 ("decode_tps", f"decode tok/s {label} (g={a.gen} after {a.prompt})")):
                check(f"{what}: quantforge vs llama-bench", max(r[metric] for r in ours_r),
                      max(r[metric] for r in bench_r), 10.0)

    print(f"\nllama.cpp {llamacpp.version()}; threads {a.threads}; context {a.context}; chunks {a.chunks}; "
          f"{hf['tokens_scored']} tokens scored ({hf['scored']})")
    print(f"{'check':<62} {'quantforge':>12} {'reference':>12} {'diff %':>8} {'tol %':>6}  result")
    for name, ours, theirs, diff, tol, passed in rows:
        print(f"{name:<62} {ours:>12.4f} {theirs:>12.4f} {diff:>+8.3f} {tol:>6.1f}  {'ok' if passed else 'FAIL'}")
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
