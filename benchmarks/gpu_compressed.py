"""GPTQ, AWQ and FP8 through quantforge's own stage code on a CUDA GPU (or a tiny CPU smoke test).

    python benchmarks/gpu_compressed.py                 # ~0.95B-param Llama-shaped model, bf16, on CUDA
    python benchmarks/gpu_compressed.py --tiny          # 2-layer model: a CPU smoke test
    python benchmarks/gpu_compressed.py --layers 24 --hidden 1536 --samples 128

Needs torch, transformers, llmcompressor (+ compressed-tensors, datasets), pydantic
and pyyaml; no quantforge install: it imports ``pipeline/`` from this repository and
calls the stage run function (``pipeline.targets.compressed.stages.run_compressed_stage``)
directly, without the store. The model has random weights (no download); the
tokenizer is trained on the bundled corpus, and calibration windows are cut from
that corpus. Weights being random says nothing about accuracy: this measures time,
memory and artifact size. The verification subprocess (reload with transformers on
CPU) is timed separately.

Prints one JSON object and a table: per target, quantize wall time, verification
time, peak CUDA memory (allocated, reset before each target), and artifact size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
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


def build_model(out: Path, hidden: int, inter: int, layers: int, heads: int, vocab: int, tokenizer_vocab: int) -> int:
    """A random-weight Llama-shaped bf16 model + a corpus-trained tokenizer; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.corpus import corpus_paragraphs
    from pipeline.sources.tiny import build_tokenizer

    tokenizer = build_tokenizer(corpus_paragraphs("train"), tokenizer_vocab)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def build_calibration(model_dir: Path, out: Path, samples: int, seq_len: int) -> None:
    """input_ids.npy + texts.jsonl, the calibration stage's documented layout."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.data.corpus import corpus_paragraphs

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream: list[int] = []
    for p in corpus_paragraphs("train"):
        stream += tok(p, add_special_tokens=False).input_ids
        if len(stream) >= samples * seq_len:
            break
    if len(stream) < samples * seq_len:
        raise SystemExit(f"corpus has {len(stream)} tokens, need {samples * seq_len}")
    ids = np.asarray(stream[: samples * seq_len], dtype=np.int64).reshape(samples, seq_len)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "input_ids.npy", ids)
    with open(out / "texts.jsonl", "w") as f:
        for row in ids:
            f.write(json.dumps({"text": tok.decode(row.tolist())}) + "\n")


def run_target(kind: str, model_dir: Path, calibration: Path, work: Path) -> dict:
    import torch

    from pipeline.targets.compressed import AwqTarget, Fp8Target, GptqTarget
    from pipeline.core.stage import StageContext, StageOutput
    from pipeline.targets.compressed.stages import plan_compressed_stage

    cls = {"gptq": GptqTarget, "awq": AwqTarget, "fp8": Fp8Target}[kind]
    target = cls.model_validate(TARGETS[kind])

    class Ctx:  # the two PlanContext fields the planner reads
        source_stage = "source"
        calibration_stage = "calibration"
        recipe = type("R", (), {"source": type("S", (), {"dtype": "bfloat16"})()})()

    [stage] = plan_compressed_stage(target, Ctx())
    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    inputs = {"source": StageOutput("source", "-", model_dir, {"result": {"model_dir": str(model_dir), "model": "random-llama"}})}
    if "calibration" in stage.inputs:
        inputs["calibration"] = StageOutput("calibration", "-", calibration, {"result": {}})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = stage.run(StageContext(stage=stage, out_dir=out, inputs=inputs, log=lambda m: print(m, file=sys.stderr), artifacts_dir=work))
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return {
        "target": kind,
        "format": result.get("format"),
        "device": result["placement"]["device"],
        "load_s": result["load_s"],
        "quantize_s": result["quantize_s"],
        "save_s": result["save_s"],
        "stage_s_without_verify": round(wall - result["verify_s"], 2),
        "verify_s": result["verify_s"],
        "verified": result["verification"]["ok"],
        "peak_cuda_gib": round(peak, 2) if peak is not None else None,
        "weights_mib": round(size / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-256 model (CPU smoke test)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS))
    p.add_argument("--work", help="work folder (kept); default: a temp folder, removed")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 256, 512, 2, 4, 4096
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 128)

    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-compressed-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, calibration = work / "model", work / "calibration"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        params = build_model(model_dir, args.hidden, args.intermediate, args.layers, args.heads, args.vocab, min(4096, args.vocab))
    else:
        params = None
    build_calibration(model_dir, calibration, args.samples, args.seq_len)
    setup_s = time.perf_counter() - t0

    rows = [run_target(kind, model_dir, calibration, work) for kind in args.targets]
    report = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": {"params": params, "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab, "dtype": "bfloat16",
                  "weights_mib": round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20, 1)},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "setup_s": round(setup_s, 2),
        "rows": rows,
    }
    print(json.dumps(report))
    print(f"\n{'target':<6} {'device':<6} {'load s':>7} {'quant s':>8} {'save s':>7} {'verify s':>9} {'peak CUDA GiB':>13} {'weights MiB':>11} ok")
    for r in rows:
        peak = f"{r['peak_cuda_gib']:.2f}" if r["peak_cuda_gib"] is not None else "-"
        print(f"{r['target']:<6} {r['device']:<6} {r['load_s']:>7.2f} {r['quantize_s']:>8.2f} {r['save_s']:>7.2f} {r['verify_s']:>9.2f} {peak:>13} {r['weights_mib']:>11} {r['verified']}")
    print(f"source weights: {report['model']['weights_mib']} MiB (bf16)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
