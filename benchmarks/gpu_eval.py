"""quantforge's evals on a CUDA GPU: a ~0.6B random-weight Llama and its compressed artifacts.

For a GPU machine with torch + transformers (+ llmcompressor to make artifacts);
no mlflow or llama.cpp needed. Prints one JSON object: the device fingerprint and
the report (baseline and per-artifact evals on CUDA, gates).

    python benchmarks/gpu_eval.py --make OUT_DIR                 # make model + FP8/GPTQ/AWQ, then evaluate
    python benchmarks/gpu_eval.py --source SRC --artifact fp8=fp8:DIR --artifact w4a16=gptq:DIR ...

``--artifact NAME=KIND:PATH`` takes folders written by llm-compressor (e.g. by
benchmarks/gpu_compressed.py); KIND is gptq, awq or fp8. Random weights give
near-uniform predictions, so the accuracy numbers test the plumbing (KL, top-1
against the source on the same device), not the quantizers' quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, vocab_size=4096)


def make_source(out: Path, shape: dict) -> Path:
    """A bf16 Llama with random weights and the demo's byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.corpus import corpus_paragraphs
    from pipeline.sources.tiny import EOS_TOKEN, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus_paragraphs("train"), shape["vocab_size"])
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_artifacts(source: Path, out: Path, kinds: list[str]) -> dict[str, tuple[str, Path]]:
    """FP8-dynamic, GPTQ W4A16 and AWQ W4A16 through llm-compressor's oneshot."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.corpus import corpus_paragraphs

    tok = AutoTokenizer.from_pretrained(source)
    texts = corpus_paragraphs("train")[:64]
    ds = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"][:256] for t in texts]})
    made = {}
    for kind in kinds:
        if (out / kind / "config.json").is_file():  # made by an earlier run in this work folder
            made[kind] = (kind, out / kind)
            continue
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map="cuda" if torch.cuda.is_available() else "cpu")
        if kind == "fp8":
            from llmcompressor.modifiers.quantization import QuantizationModifier

            recipe, data = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])], None
        elif kind == "gptq":
            from llmcompressor.modifiers.quantization import GPTQModifier

            recipe, data = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])], ds
        elif kind == "awq":
            from llmcompressor.modifiers.quantization import QuantizationModifier
            from llmcompressor.modifiers.transform.awq import AWQModifier

            recipe = [AWQModifier(), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]
            data = ds
        else:
            raise ValueError(kind)
        t0 = time.perf_counter()
        kw = {"dataset": data, "num_calibration_samples": len(texts), "max_seq_length": 256} if data is not None else {}
        oneshot(model=model, recipe=recipe, **kw)
        d = out / kind
        model.save_pretrained(d, save_compressed=True)
        tok.save_pretrained(d)
        print(f"[gpu_eval] made {kind} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        made[kind] = (kind, d)
        del model
    return made


def evaluate_on(device: str, work: Path, source: Path, artifacts: dict[str, tuple[str, Path]], args) -> dict:
    import yaml

    from evals.devices import fingerprint, fingerprint_hash
    from evals.run import evaluate
    from pipeline.validation import load_recipe
    from pipeline.core.report import ArtifactReport, Report, SourceReport, report_path, write_report
    from pipeline.sources import fingerprint_dir
    from pipeline.core.store import content_hash, file_table

    targets = []
    for name, (kind, _) in artifacts.items():
        t = {"name": name, "kind": kind}
        if kind == "fp8":
            t["scheme"] = "dynamic"
        targets.append(t)
    recipe = {
        "name": "gpu-eval",
        "source": {"model": str(source), "dtype": "bfloat16"},
        "calibration": {"dataset": "builtin"},
        "targets": targets,
        "evals": {"devices": [device], "context": args.context, "max_windows": args.windows,
                  "speed": {"prompt_lengths": [128, 1024], "decode_tokens": 64, "batch_sizes": [1, 8],
                            "warmup": 2, "min_iterations": 5, "min_seconds": 2.0}},
        "gates": {"max_perplexity_increase_pct": 5.0, "max_kl_divergence": 0.1, "min_top1_agreement_pct": 80.0},
    }
    rfile = work / "gpu-eval.yaml"
    rfile.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(rfile, check_source=False)
    arts_dir = work / "artifacts"
    report = Report(recipe="gpu-eval", source=SourceReport(model=str(source), fingerprint=fingerprint_dir(source), path=str(source)))
    for name, (kind, path) in artifacts.items():
        files = file_table(path)
        report.artifacts.append(ArtifactReport(name=name, target=name, kind=kind, status="built", path=str(path),
                                               bytes=sum(f["bytes"] for f in files), content_sha256=content_hash(files)))
    rpath = report_path(arts_dir, "gpu-eval")
    rpath.parent.mkdir(parents=True, exist_ok=True)
    write_report(rpath, report)
    t0 = time.perf_counter()
    final = evaluate(loaded, arts_dir, device=device, log=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - t0
    try:
        from rich.console import Console

        from evals.present import render

        render(final, Console(file=sys.stderr, width=200))
    except ImportError:
        pass
    fp = fingerprint(device)
    return {"device": device, "device_fingerprint": fp, "fingerprint_hash": fingerprint_hash(fp),
            "eval_seconds": round(seconds, 1), "report": final.model_dump(mode="json")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make", type=Path, help="work folder: make a random model and its artifacts there")
    ap.add_argument("--kinds", default="fp8,gptq,awq")
    ap.add_argument("--source", type=Path)
    ap.add_argument("--artifact", action="append", default=[], help="NAME=KIND:PATH")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="a tiny shape, to try the script on a CPU")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    shape = dict(SHAPE, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64) if a.small else SHAPE
    work = (a.make or Path("gpu-eval-work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, tuple[str, Path]] = {}
    for spec in a.artifact:
        name, _, rest = spec.partition("=")
        kind, _, path = rest.partition(":")
        artifacts[name] = (kind, Path(path).resolve())
    source = a.source.resolve() if a.source else None
    if a.make:
        if source is None:
            source = work / "source"
            if not (source / "config.json").is_file():
                make_source(source, shape)
        if not artifacts:
            artifacts = make_artifacts(source, work, [k for k in a.kinds.split(",") if k])
    if source is None:
        ap.error("give --source (and --artifact ...) or --make DIR")
    result = evaluate_on(a.device, work, source, artifacts, a)
    text = json.dumps(result, indent=1, default=str)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
