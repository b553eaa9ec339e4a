"""quantforge's gptq/awq/fp8 stages vs calling llm-compressor's ``oneshot`` directly.

    .venv/bin/python benchmarks/bench_compressed.py            # demo model (tiny-llama)
    .venv/bin/python benchmarks/bench_compressed.py --mini     # tiny-llama-mini (fast)
    .venv/bin/python benchmarks/bench_compressed.py --model-dir PATH --samples 64 --seq-len 256

Same model folder, same calibration samples (the calibration stage's input_ids.npy),
same llm-compressor modifiers, same save (``save_compressed=True`` + tokenizer). Each
run is its own process (so peak RSS is per run and imports are paid by both sides),
direct and quantforge alternate per target. quantforge's time is the runner's
(plan, store lookups, load, checks, oneshot, save, card, manifest hashing); its
verification subprocess is extra work and is reported in its own columns, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {
    "gptq": {"name": "w4-gptq", "kind": "gptq", "bits": 4, "group_size": 128},
    "awq": {"name": "w4-awq", "kind": "awq", "bits": 4, "group_size": 128},
    "fp8": {"name": "fp8", "kind": "fp8", "scheme": "dynamic"},
}


def recipe_text(model_dir: Path, samples: int, seq_len: int, kinds: list[str]) -> str:
    targets = "\n".join(f"  - {json.dumps(TARGETS[k])}" for k in kinds)  # JSON is YAML
    return (
        f"name: bench-compressed\nsource: {{model: {model_dir}, dtype: bfloat16}}\n"
        f"calibration: {{dataset: builtin, samples: {samples}, seq_len: {seq_len}}}\ntargets:\n{targets}\n"
    )


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------- child runs
def child_quantforge(recipe: Path, artifacts: Path, kind: str) -> dict:
    """Build one target through the runner, from a store that already holds source + calibration."""
    from pipeline.core.runner import execute, stage_keys
    from pipeline.core.plan import make_plan
    from pipeline.validation import load_recipe
    from pipeline.core.store import Store

    t0 = time.perf_counter()
    plan = make_plan(load_recipe(recipe), artifacts)
    target = TARGETS[kind]["name"]
    stages = plan.select([target])
    keys = stage_keys(plan.stages)
    for s in stages:  # force a real build of the target stage
        if s.target == target:
            shutil.rmtree(Store(artifacts).path_for(s.kind, keys[s.name]), ignore_errors=True)
    results = execute(stages, artifacts, log=lambda m: None, keys=keys)
    wall = time.perf_counter() - t0
    r = results[f"{target}/quantize"]
    if r.output is None:
        raise SystemExit(f"quantforge {kind} failed: {r.reason}")
    verify_s = r.output.result["verify_s"]
    return {"wall_s": wall, "verify_s": verify_s, "rss_mb": peak_rss_mb(), "verify_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


def child_direct(model_dir: Path, calibration: Path, kind: str, out: Path) -> dict:
    """The same work written straight against llm-compressor, as its README examples do."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.placement import choose_placement
    from pipeline.targets.compressed import AwqTarget, Fp8Target, GptqTarget
    from pipeline.targets.compressed.stages import awq_cpu_pin_memory_guard, build_modifiers

    torch.set_num_threads(choose_placement().threads)  # same threads as quantforge
    cls = {"gptq": GptqTarget, "awq": AwqTarget, "fp8": Fp8Target}[kind]
    target = cls.model_validate(TARGETS[kind])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    kwargs = {}
    if target.needs_calibration():
        ids = np.load(calibration / "input_ids.npy")
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
        kwargs = {"dataset": ds, "num_calibration_samples": len(ds), "max_seq_length": ids.shape[1], "shuffle_calibration_samples": False}
    with awq_cpu_pin_memory_guard():  # direct AWQ on CPU needs the same workaround
        oneshot(model=model, recipe=build_modifiers(target), **kwargs)
    model.save_pretrained(str(out), save_compressed=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return {"wall_s": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}


def spawn(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    outer = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "process_s": outer}


# ------------------------------------------------------------------- main
def prepare(args) -> tuple[Path, Path, Path, Path]:
    """Model folder, recipe, and an artifacts store holding the source + calibration stages."""
    from pipeline.core.runner import execute
    from pipeline.core.plan import make_plan
    from pipeline.validation import load_recipe

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-compressed-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir).resolve() if args.model_dir else work / ("tiny-llama-mini" if args.mini else "tiny-llama")
    if not args.model_dir and not (model_dir / "config.json").is_file():
        from pipeline.sources.tiny import train_demo_model

        model_dir.mkdir(parents=True, exist_ok=True)
        train_demo_model(model_dir.name, model_dir, log=lambda m: None)
    recipe = work / "recipe.yaml"
    recipe.write_text(recipe_text(model_dir, args.samples, args.seq_len, args.targets))
    artifacts = work / "artifacts"
    plan = make_plan(load_recipe(recipe), artifacts)
    base = [s for s in plan.stages if s.name in ("source", "calibration")]
    results = execute(base, artifacts, log=lambda m: None)
    calibration = results["calibration"].output.path
    return model_dir, recipe, artifacts, calibration


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mini", action="store_true", help="use tiny-llama-mini instead of the demo model")
    p.add_argument("--model-dir", help="an existing HF model folder instead of the demo model")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS))
    p.add_argument("--work", help="work folder (kept); default: a temp folder")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        mode, kind, *rest = args.child
        if mode == "quantforge":
            out = child_quantforge(Path(rest[0]), Path(rest[1]), kind)
        else:
            out = child_direct(Path(rest[0]), Path(rest[1]), kind, Path(rest[2]))
        print(json.dumps(out))
        return 0

    model_dir, recipe, artifacts, calibration = prepare(args)
    rows = []
    for kind in args.targets:
        direct_out = Path(tempfile.mkdtemp(prefix=f"direct-{kind}-"))
        direct = spawn(["--child", "direct", kind, str(model_dir), str(calibration), str(direct_out)])
        shutil.rmtree(direct_out, ignore_errors=True)
        qf = spawn(["--child", "quantforge", kind, str(recipe), str(artifacts)])
        qf_work = qf["wall_s"] - qf["verify_s"]
        rows.append({
            "target": kind,
            "direct_s": round(direct["wall_s"], 2),
            "quantforge_s": round(qf_work, 2),
            "ratio": round(qf_work / direct["wall_s"], 3),
            "verify_s": round(qf["verify_s"], 2),
            "direct_rss_mb": round(direct["rss_mb"]),
            "quantforge_rss_mb": round(qf["rss_mb"]),
            "verify_rss_mb": round(qf["verify_rss_mb"]),
        })
    header = f"{'target':<6} {'direct s':>9} {'qf s':>8} {'qf/direct':>9} {'verify s':>9} {'direct RSS MB':>13} {'qf RSS MB':>10} {'verify RSS MB':>13}"
    print(f"model {model_dir} | calibration {args.samples} x {args.seq_len} | threads {os.environ.get('QUANTFORGE_THREADS', 'default')}")
    print(header)
    for r in rows:
        print(f"{r['target']:<6} {r['direct_s']:>9.2f} {r['quantforge_s']:>8.2f} {r['ratio']:>9.3f} {r['verify_s']:>9.2f} {r['direct_rss_mb']:>13} {r['quantforge_rss_mb']:>10} {r['verify_rss_mb']:>13}")
    print("qf s excludes the verification subprocess (verify s), which is extra work quantforge does and direct does not.")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "samples": args.samples, "seq_len": args.seq_len, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
