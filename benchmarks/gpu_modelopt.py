"""ModelOpt checkpoints (NVFP4, FP8, INT4-AWQ) through quantforge's own code, on a CUDA GPU.

Needs torch + transformers + nvidia-modelopt (+ its wheels, see the report). Builds each
checkpoint with pipeline.targets.tensorrt.checkpoint.build_checkpoint (quantize, export, read back,
dequantize, compare), and prints one JSON document and a table.

    # on the GPU machine, a trained model (perplexity is measured):
    python benchmarks/gpu_modelopt.py --model /path/to/hf-llama --quants nvfp4,fp8,int4_awq
    # no model at hand: a random-weight ~0.45B Llama (weight errors only; perplexity of random
    # weights says nothing)
    python benchmarks/gpu_modelopt.py --random --quants nvfp4,fp8,int4_awq
    # CPU smoke test (NVFP4 needs CUDA):
    OMP_NUM_THREADS=1 python benchmarks/gpu_modelopt.py --model DIR --device cpu --quants fp8,int4_awq --samples 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ~0.45B parameters, Llama-shaped with GQA; widths multiples of 128 (INT4-AWQ groups) and 16 (NVFP4 blocks).
RANDOM_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def make_random_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.corpus import corpus_paragraphs
    from pipeline.sources.tiny import EOS_TOKEN, build_tokenizer

    tok = build_tokenizer(corpus_paragraphs("train"), RANDOM_SHAPE["vocab_size"])
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(**RANDOM_SHAPE, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def calibration(model_dir: Path, samples: int, seq_len: int):
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.data.corpus import corpus_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(corpus_text("train"), add_special_tokens=False)["input_ids"]
    need = samples * seq_len
    if len(ids) < need:
        raise SystemExit(f"calibration text has {len(ids)} tokens, need {need}")
    return np.asarray(ids[:need], dtype=np.int64).reshape(samples, seq_len)


def environment(device: str) -> dict:
    from importlib.metadata import version

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": version("transformers"), "nvidia-modelopt": version("nvidia-modelopt"), "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="HF Llama-shaped model folder with real weights (perplexity measured)")
    src.add_argument("--random", action="store_true", help="random-weight ~0.45B Llama (no perplexity)")
    ap.add_argument("--quants", default="nvfp4,fp8,int4_awq")
    ap.add_argument("--kv-cache-quant", choices=["fp8"], default=None)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--work-dir", type=Path, default=None, help="keep checkpoints here (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from pipeline.targets.tensorrt import checkpoint as mc
    from pipeline.data.corpus import corpus_text

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-modelopt-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = args.model or make_random_model(work / "random-llama")
    made_s = time.perf_counter() - t0
    calib = calibration(model_dir, args.samples, args.seq_len)
    heldout = None if args.random else corpus_text("heldout")
    src_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    report = {"environment": environment(device), "model": str(model_dir), "random_weights": bool(args.random),
              "source_bytes": src_bytes, "calibration_shape": list(calib.shape), "model_setup_seconds": round(made_s, 1),
              "kv_cache_quant": args.kv_cache_quant, "results": {}}
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        out = work / f"ckpt-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            facts = mc.build_checkpoint(model_dir, out, quant=quant, kv_cache_quant=args.kv_cache_quant, calib_ids=calib,
                                        dtype=args.dtype, device=device, heldout_text=heldout, seq_len=args.ppl_seq_len,
                                        log=lambda m: print(f"[{quant}] {m}", file=sys.stderr))
            facts["ok"] = True
        except Exception as exc:  # report every quant, even when one fails
            facts = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        facts["total_seconds"] = round(time.perf_counter() - t, 2)
        if device == "cuda":
            facts["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["results"][quant] = facts
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    rows = [("quant", "ok", "quantize s", "export s", "verify s", "MiB", "x source", "w err max", "ppl src", "ppl deq", "ppl +%")]
    for q, f in report["results"].items():
        v = f.get("verification", {})
        size = f.get("checkpoint_bytes")
        rows.append((q, "yes" if f["ok"] else "NO", f.get("quantize_seconds", ""), f.get("export_seconds", ""),
                     f.get("verify_seconds", ""), f"{size / 2**20:.1f}" if size else "",
                     f"{size / src_bytes:.2f}" if size else "", v.get("weight_rel_error_max", ""),
                     v.get("perplexity_source", "-"), v.get("perplexity_dequantized", "-"), v.get("perplexity_increase_pct", "-")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{report['environment']}", file=sys.stderr)
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)), file=sys.stderr)
    for q, f in report["results"].items():
        if not f["ok"]:
            print(f"{q}: {f['error']}", file=sys.stderr)
    return 0 if all(f["ok"] for f in report["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
