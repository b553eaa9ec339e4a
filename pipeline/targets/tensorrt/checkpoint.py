"""NVIDIA ModelOpt checkpoints: quantize, export, read back, verify.

A ModelOpt "unified HF" checkpoint (``export_hf_checkpoint``) is what TensorRT-LLM's
PyTorch backend, vLLM (``quantization="modelopt"``) and SGLang load. transformers
cannot: it has no ``modelopt`` quant method, loads the FP8 export silently wrong
(fp8 weights cast, scales ignored) and refuses INT4/NVFP4. So the checks here read
the exported tensors back with :mod:`pipeline.backends.modelopt`, which dequantizes them
by ModelOpt's documented layout (described there):

torch, transformers and modelopt are imported inside the functions that need them.
"""

from __future__ import annotations

import math

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.backends.modelopt import NORM_FEEDS, _load_tensors, dequantized_state_dict, load_modelopt_dequantized, read_quant_config
from pipeline.errors import InvalidInput, StageFailed
from pipeline.core.perplexity import window_perplexity

# recipe quant -> ModelOpt config name (modelopt.torch.quantization.config)
MODELOPT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int4_awq": "INT4_AWQ_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
# recipe quant -> what hf_quant_config.json must say (process_layer_quant_config, quant_utils.py)
EXPECTED_QUANT = {
    "fp8": {"quant_algo": "FP8"},
    "int4_awq": {"quant_algo": "W4A16_AWQ", "group_size": 128},
    "nvfp4": {"quant_algo": "NVFP4", "group_size": 16},
}
EXPECTED_KV = {"fp8": "FP8"}

# Acceptance limits, per quant. Weight error: relative Frobenius error of each quantized
# Linear's dequantized (effective) weight vs the source weight, worst layer; it catches a
# wrong layout or scale (those give errors near or above 100 %). FP8 e4m3 keeps 3 mantissa
# bits: measured 2.7 % on every layer. NVFP4 (16-blocks of e2m1): 9.5-9.6 % measured on an
# H200. INT4 group-128: 12 % on random weights, but on trained weights AWQ deliberately
# moves error onto channels with small activations, so the plain weight error grows (20.8 %
# worst, a down_proj of tiny-llama-mini on the H200); perplexity is the check that matters.
# Perplexity: dequantized model vs source on the same held-out text (measured numbers in
# tests/test_target_tensorrt.py, the stage result and benchmarks/results/). The limits leave room for larger, less smooth models.
MAX_WEIGHT_REL_ERROR = {"fp8": 0.05, "int4_awq": 0.35, "nvfp4": 0.20}
# A bound against a broken export (a wrong layout or scale reads as perplexity in the
# thousands), not a quality judgement: how much a format may cost is the recipe's gates'
# call, made from the evals. Measured: FP8 +3.6 % on SmolLM2-135M, which a 2 % limit here
# used to throw away before anyone could see its eval.
MAX_PPL_RATIO = 4.0
# A breakage bound needs few tokens (a broken export is off by orders of magnitude); the
# evals measure quality on the full suite. 2,048 tokens keep this under a minute on a CPU.
BREAKAGE_CHECK_TOKENS = 2048

# Tokenizer files the export does not write (export_hf_checkpoint writes none).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

RUNTIMES = ("tensorrt-llm (PyTorch backend)", "vllm (quantization=modelopt)", "sglang")


def modelopt_quant_config(quant: str, kv_cache_quant: str | None) -> dict:
    """The ModelOpt config for a recipe's quant (+ FP8 KV cache, merged the documented
    way: ``mtq.update_quant_cfg_with_kv_cache_quant(cfg, FP8_KV_CFG["quant_cfg"])``,
    modelopt/torch/quantization/utils/core_utils.py)."""
    import copy

    import modelopt.torch.quantization as mtq

    if quant not in MODELOPT_CONFIGS:
        raise InvalidInput(f"quant {quant!r} has no ModelOpt config; known: {', '.join(MODELOPT_CONFIGS)}")
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[quant]))
    if kv_cache_quant == "fp8":
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, mtq.FP8_KV_CFG["quant_cfg"])
    elif kv_cache_quant is not None:
        raise InvalidInput(f"kv_cache_quant {kv_cache_quant!r} is not supported (fp8 only)")
    return cfg


def load_source_model(model_dir: Path, dtype: str = "bfloat16", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    # ModelOpt's export inspects config.architectures (is_multimodal_model); a model built
    # from a bare config has None there.
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model.to(device).eval()


def quantize_model(model, quant: str, kv_cache_quant: str | None, calib_ids, batch_size: int = 4,
                   log: Callable[[str], None] = print):
    """Calibrate and quantize ``model`` in place with ModelOpt; returns facts."""
    import torch
    import modelopt.torch.quantization as mtq

    cfg = modelopt_quant_config(quant, kv_cache_quant)
    ids = torch.as_tensor(calib_ids, dtype=torch.long)
    device = next(model.parameters()).device

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                m(input_ids=ids[i : i + batch_size].to(device))

    t0 = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop)
    secs = time.perf_counter() - t0
    log(f"modelopt {MODELOPT_CONFIGS[quant]}{' + FP8_KV_CFG' if kv_cache_quant else ''}: calibrated on {tuple(ids.shape)} in {secs:.1f}s on {device}")
    return {"modelopt_config": MODELOPT_CONFIGS[quant] + (" + FP8_KV_CFG" if kv_cache_quant else ""),
            "calibration_shape": list(ids.shape), "quantize_seconds": round(secs, 2), "device": str(device)}


def copy_tokenizer(source_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file() and not (Path(out_dir) / name).exists():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def write_model_card(out_dir: Path, *, quant: str, kv_cache_quant: str | None, source, facts: dict) -> None:
    """README.md: what was built from what, which runtimes load it and how, what the build verified.

    ``source``: the source model's folder (or the source stage's output); the card names the
    model and its exact revision from the source stage's lineage (pipeline.targets.cards),
    never a local path.
    """
    from pipeline.backends.model_card import card_data, hub_card
    from pipeline.targets.cards import MODELOPT_FLAGS, source_identity, usage_sections

    ident = source_identity(source)
    _, hf_quant = read_quant_config(out_dir)
    q = hf_quant.get("quantization", {})
    algo = q.get("quant_algo")
    vllm_flag = MODELOPT_FLAGS.get(algo) if algo else None  # vLLM's --quantization for this format, as the cards say
    served_by_vllm = vllm_flag is not None
    lines = [
        f"# {ident.name}: NVIDIA ModelOpt {algo} checkpoint",
        "",
        f"A Hugging Face-layout checkpoint of {ident.sentence()} quantized with NVIDIA ModelOpt "
        f"({facts.get('modelopt_config')}) by quantforge, calibrated on {facts.get('calibration_shape')} tokens (samples x length).",
        "",
        "## Source",
        *ident.lines(),
        "",
        "## Quantization",
        f"- quant_algo: {algo}, kv_cache_quant_algo: {q.get('kv_cache_quant_algo')}"
        + (f", group_size: {q.get('group_size')}" if q.get("group_size") else ""),
        f"- excluded: {', '.join(q.get('exclude_modules', [])) or 'nothing'}",
        "- `hf_quant_config.json` names the format; runtimes read it to load the weights pre-quantized",
        "",
        *usage_sections("tensorrt-checkpoint", model=ident.name, quant_algo=algo, notes=[
            "From Python: TensorRT-LLM `from tensorrt_llm import LLM; LLM(model=\"DIR\")` (PyTorch backend)"
            + (f"; vLLM `LLM(model=\"DIR\", quantization=\"{vllm_flag}\")`" if served_by_vllm else "")
            + ".",
            "",
            *([] if served_by_vllm else [f"vLLM and SGLang do not list ModelOpt {algo} among the formats they load: serve it with TensorRT-LLM.", ""]),
            "Not plain transformers: it has no `modelopt` quantization method; it would load FP8 weights without their "
            "scales (wrong outputs) and refuses INT4/NVFP4.",
            "",
            "Native kernels: FP8 needs compute capability >= 8.9, NVFP4 a Blackwell GPU (>= 10.0), INT4-AWQ (W4A16) runs on Ampere and newer."]),
        "",
        "## Verification (run by quantforge before this folder was published)",
        "```json",
        json.dumps(facts.get("verification", {}), indent=2),
        "```",
    ]
    data = card_data(ident, tags=["modelopt", "tensorrt-llm", str(algo or "").lower()])
    (Path(out_dir) / "README.md").write_text(hub_card(data, lines))


def export_checkpoint(model, out_dir: Path, source_dir: Path, log: Callable[[str], None] = print) -> dict:
    from modelopt.torch.export import export_hf_checkpoint

    t0 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=str(out_dir))
    copied = copy_tokenizer(source_dir, out_dir)
    secs = time.perf_counter() - t0
    log(f"export_hf_checkpoint -> {out_dir} in {secs:.1f}s; tokenizer files copied: {copied}")
    return {"export_seconds": round(secs, 2), "tokenizer_files": copied}


# ------------------------------------------------------------ verifying
def quant_config_problems(folder: Path, quant: str, kv_cache_quant: str | None) -> list[str]:
    """What config.json / hf_quant_config.json get wrong about the requested quantization."""
    config, hf_quant = read_quant_config(folder)
    problems = []
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "modelopt":
        problems.append(f"config.json quantization_config.quant_method is {qc.get('quant_method')!r}, expected 'modelopt'")
    q = hf_quant.get("quantization")
    if not q:
        return problems + ["hf_quant_config.json is missing or has no 'quantization' section"]
    for key, want in EXPECTED_QUANT[quant].items():
        if q.get(key) != want:
            problems.append(f"hf_quant_config.json quantization.{key} is {q.get(key)!r}, expected {want!r}")
    want_kv = EXPECTED_KV.get(kv_cache_quant) if kv_cache_quant else None
    if q.get("kv_cache_quant_algo") != want_kv:
        problems.append(f"hf_quant_config.json quantization.kv_cache_quant_algo is {q.get('kv_cache_quant_algo')!r}, expected {want_kv!r}")
    if qc.get("quant_algo") not in (None, q.get("quant_algo")):
        problems.append(f"config.json quant_algo {qc.get('quant_algo')!r} disagrees with hf_quant_config.json {q.get('quant_algo')!r}")
    return problems


def weight_errors(folder: Path, source_dir: Path) -> dict[str, float]:
    """Relative Frobenius error of every quantized Linear's effective weight vs the source.

    For AWQ Linears whose ``pre_quant_scale`` was folded into the preceding norm, the
    effective weight is ``W' * (norm_exported / norm_source)`` column-wise.
    """
    import torch
    from safetensors.torch import load_file

    state, quantized = dequantized_state_dict(folder)
    src: dict = {}
    for f in sorted(Path(source_dir).glob("*.safetensors")):
        src.update(load_file(str(f)))
    errors = {}
    for prefix in quantized:
        w_src = src[f"{prefix}.weight"].float()
        w = state[f"{prefix}.weight"]
        layer, _, leaf = prefix.rpartition(".")  # e.g. model.layers.0.self_attn, q_proj
        parent, _, block = layer.rpartition(".")
        norm = NORM_FEEDS.get(f"{block}.{leaf}")
        if norm is not None:
            key = f"{parent}.{norm}.weight"
            if key in src and key in state:
                n_src = src[key].float()
                ratio = torch.where(n_src.abs() > 0, state[key] / n_src, torch.ones_like(n_src))
                w = w * ratio.reshape(1, -1)
        errors[prefix] = float((w - w_src).norm() / w_src.norm().clamp_min(1e-12))
    return errors


def verify_checkpoint(folder: Path, source_dir: Path, quant: str, kv_cache_quant: str | None,
                      check_text: str | None, seq_len: int = 256, max_tokens: int = BREAKAGE_CHECK_TOKENS,
                      device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Read the export back and check it; raise StageFailed with every failed check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, source_dir = Path(folder), Path(source_dir)
    failures = quant_config_problems(folder, quant, kv_cache_quant)
    facts: dict[str, Any] = {}
    if not failures:
        errs = weight_errors(folder, source_dir)
        worst = max(errs, key=errs.get) if errs else None
        facts["quantized_linears"] = len(errs)
        facts["weight_rel_error_max"] = round(errs[worst], 5) if worst else None
        facts["weight_rel_error_mean"] = round(sum(errs.values()) / len(errs), 5) if errs else None
        facts["weight_rel_error_limit"] = MAX_WEIGHT_REL_ERROR[quant]
        if not errs:
            failures.append("no quantized Linear found in the export")
        elif errs[worst] > MAX_WEIGHT_REL_ERROR[quant]:
            failures.append(f"dequantized {worst}.weight differs from the source by {errs[worst]:.3%} (limit {MAX_WEIGHT_REL_ERROR[quant]:.0%})")
        if kv_cache_quant:
            names = _load_tensors(folder).keys()
            n_k = sum(n.endswith(".k_scale") for n in names)
            facts["kv_scales"] = n_k
            if n_k == 0:
                failures.append("FP8 KV cache requested but the export has no k_scale/v_scale tensors")
    if not failures and check_text:
        tok = AutoTokenizer.from_pretrained(folder)
        # float32 on either device, so the comparison measures the format, not matmul precision.
        src_model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).to(device).eval()
        ppl_src, n = window_perplexity(src_model, tok, check_text, seq_len, max_tokens)
        del src_model
        deq = load_modelopt_dequantized(folder).to(device)
        ppl_q, _ = window_perplexity(deq, tok, check_text, seq_len, max_tokens)
        del deq
        inc = 100.0 * (ppl_q / ppl_src - 1.0)
        facts.update({"perplexity_source": round(ppl_src, 4), "perplexity_dequantized": round(ppl_q, 4),
                      "perplexity_increase_pct": round(inc, 3), "perplexity_breakage_bound_ratio": MAX_PPL_RATIO,
                      "perplexity_tokens": n,
                      "perplexity_method": "weights dequantized by the ModelOpt layout"
                      + (", Linear inputs rounded through FP8 with input_scale" if quant == "fp8" else "")})
        log(f"perplexity: source {ppl_src:.3f}, dequantized {ppl_q:.3f} ({inc:+.2f} %; quality is for the evals and gates)")
        if not math.isfinite(ppl_q) or ppl_q > MAX_PPL_RATIO * ppl_src:
            failures.append(f"dequantized perplexity {ppl_q:.3f} vs the source's {ppl_src:.3f}: more than {MAX_PPL_RATIO:g}x, "
                            "the export is broken (wrong scales or layout), not merely lossy")
    if failures:
        raise StageFailed(f"ModelOpt checkpoint {folder} failed verification:\n- " + "\n- ".join(failures))
    return facts


def build_checkpoint(source_dir: Path, out_dir: Path, *, quant: str, kv_cache_quant: str | None, calib_ids,
                     dtype: str = "bfloat16", device: str = "cpu", check_text: str | None = None,
                     seq_len: int = 256, log: Callable[[str], None] = print) -> dict:
    """Quantize ``source_dir`` with ModelOpt, export to ``out_dir``, verify, write the card."""
    model = load_source_model(Path(source_dir), dtype, device)
    facts = quantize_model(model, quant, kv_cache_quant, calib_ids, log=log)
    facts.update(export_checkpoint(model, Path(out_dir), Path(source_dir), log=log))
    del model
    t0 = time.perf_counter()
    facts["verification"] = verify_checkpoint(Path(out_dir), Path(source_dir), quant, kv_cache_quant, check_text,
                                             seq_len=seq_len, device=device, log=log)
    facts["verify_seconds"] = round(time.perf_counter() - t0, 2)
    write_model_card(Path(out_dir), quant=quant, kv_cache_quant=kv_cache_quant, source=str(source_dir), facts=facts)
    facts["checkpoint_bytes"] = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    return facts
