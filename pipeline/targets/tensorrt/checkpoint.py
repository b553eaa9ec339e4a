"""NVIDIA ModelOpt checkpoints: quantize, export, read back, verify.

A ModelOpt "unified HF" checkpoint (``export_hf_checkpoint``) is what TensorRT-LLM's
PyTorch backend, vLLM (``quantization="modelopt"``) and SGLang load. transformers
cannot: it has no ``modelopt`` quant method, loads the FP8 export silently wrong
(fp8 weights cast, scales ignored) and refuses INT4/NVFP4. So the checks here read
the exported tensors back by ModelOpt's documented layout and dequantize them:

* FP8 (``quant_algo: FP8``): ``weight`` float8_e4m3fn [out, in], ``weight_scale``
  float32 scalar (per-tensor) or [out] (per-channel); ``W = weight * weight_scale``.
  ``input_scale`` is the static activation scale. Layout written by
  ``to_quantized_weight`` (modelopt/torch/export/quant_utils.py, QUANTIZATION_FP8 branch:
  ``weight / weights_scaling_factor`` cast to e4m3) and the scale registered in
  ``_export_quantized_weight`` (modelopt/torch/export/unified_export_hf.py: amax / 448).
* INT4-AWQ (``quant_algo: W4A16_AWQ``): ``weight`` uint8 [out/2, in], two signed 4-bit
  values per byte, output row 2i in the low nibble and row 2i+1 in the high nibble
  (``pack_int4_in_uint8``, quant_utils.py); ``weight_scale`` float32 [out, in/group]
  (amax / 7, ``get_scaling_factor``); ``W' = int4 * scale[:, col // group]``. AWQ's
  smoothing: the layer computes ``W' @ (x * pre_quant_scale)``. For layers that share a
  norm's output (q/k/v, gate/up) ModelOpt folds ``pre_quant_scale`` into that norm's
  weight (``fuse_prequant_layernorm``, quant_utils.py, called from
  ``requantize_resmooth_fused_llm_layers`` in unified_export_hf.py) and writes no
  ``pre_quant_scale``; the others (o_proj, down_proj) keep a ``pre_quant_scale`` [in].
* NVFP4 (``quant_algo: NVFP4``): ``weight`` uint8 [out, in/2], two e2m1 codes per byte,
  even column in the low nibble (``NVFP4QTensor.quantize``,
  modelopt/torch/quantization/qtensor/nvfp4_tensor.py); ``weight_scale`` float8_e4m3fn
  [out, in/16] per block, ``weight_scale_2`` float32 scalar;
  ``W = e2m1 * weight_scale * weight_scale_2``.
* KV cache FP8: ``k_proj.k_scale`` / ``v_proj.v_scale`` scalars (``_KV_CACHE_REPLACEMENTS``).

torch, transformers and modelopt are imported inside the functions that need them.
"""

from __future__ import annotations

import math

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

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

# Which norm feeds which Linear in Llama-style decoders (Llama, Mistral, Qwen2/3): AWQ's
# pre_quant_scale of these Linears is folded into the norm on export (see module docstring).
NORM_FEEDS = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}

RUNTIMES = ("tensorrt-llm (PyTorch backend)", "vllm (quantization=modelopt)", "sglang")


class ModelOptCheckpointRefused(InvalidInput):
    """A ModelOpt checkpoint was about to be loaded by plain transformers."""


# ------------------------------------------------------------------ reading
def read_quant_config(folder: Path) -> tuple[dict, dict]:
    """(config.json, hf_quant_config.json) of an export; missing files read as {}."""
    folder = Path(folder)
    cfg_path, hq_path = folder / "config.json", folder / "hf_quant_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    hf_quant = json.loads(hq_path.read_text()) if hq_path.is_file() else {}
    return config, hf_quant


def is_modelopt_checkpoint(folder: Path) -> bool:
    config, hf_quant = read_quant_config(folder)
    method = (config.get("quantization_config") or {}).get("quant_method")
    return method == "modelopt" or bool(hf_quant.get("quantization"))


def refuse_plain_transformers(folder: str | Path) -> None:
    """Raise if ``folder`` is a ModelOpt checkpoint; call before ``from_pretrained``.

    transformers 5.17 has no ``modelopt`` quantizer: FP8 exports load with their scales
    ignored (wrong outputs, no error) and INT4/NVFP4 ones fail. Evaluate them with
    :func:`load_modelopt_dequantized` on CPU, or in a runtime that implements the format.
    """
    folder = Path(folder)
    if not is_modelopt_checkpoint(folder):
        return
    _, hf_quant = read_quant_config(folder)
    q = hf_quant.get("quantization", {})
    algo = q.get("quant_algo")
    kv = q.get("kv_cache_quant_algo")
    raise ModelOptCheckpointRefused(
        f"{folder} is an NVIDIA ModelOpt checkpoint (quant_method 'modelopt', quant_algo {algo}"
        + (f", kv_cache_quant_algo {kv}" if kv else "")
        + "). Plain transformers cannot load it: it has no 'modelopt' quantization method, "
        "loads FP8 weights without their scales (silently wrong) and refuses INT4/NVFP4. "
        "Serve it with TensorRT-LLM's PyTorch backend (tensorrt_llm.LLM(model=folder)), "
        "vLLM (LLM(model=folder, quantization='modelopt')) or SGLang; for a CPU accuracy "
        "check use pipeline.targets.tensorrt.checkpoint.load_modelopt_dequantized(folder)."
    )


def _load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise StageFailed(f"{folder}: no .safetensors files in the export")
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _unpack_int4_rows(packed):
    """uint8 [out/2, in] -> int8 [out, in]; low nibble = even row (pack_int4_in_uint8)."""
    import torch

    p = packed.to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    out = torch.empty((p.shape[0] * 2, p.shape[1]), dtype=torch.float32)
    out[0::2], out[1::2] = low.float(), high.float()
    return out


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _unpack_e2m1_cols(packed):
    """uint8 [out, in/2] -> float32 [out, in]; low nibble = even column (NVFP4QTensor)."""
    import torch

    table = torch.tensor(_E2M1, dtype=torch.float32)
    codes = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.long)
    codes[:, 0::2] = (packed & 0x0F).long()
    codes[:, 1::2] = (packed >> 4).long()
    return table[codes]


def dequantize_weight(tensors: dict, prefix: str, quant_algo: str, group_size: int | None):
    """Effective float32 weight of Linear ``prefix`` as the runtime computes it
    (pre_quant_scale folded into the columns when the export kept one)."""
    import torch

    w = tensors[f"{prefix}.weight"]
    scale = tensors.get(f"{prefix}.weight_scale")
    if scale is None:
        return w.float()
    if quant_algo == "FP8":
        if w.dtype != torch.float8_e4m3fn:
            raise StageFailed(f"{prefix}.weight is {w.dtype}, expected float8_e4m3fn for FP8")
        s = scale.float()
        s = s.reshape(-1, 1) if s.numel() > 1 else s
        deq = w.float() * s
    elif quant_algo == "W4A16_AWQ":
        if w.dtype != torch.uint8:
            raise StageFailed(f"{prefix}.weight is {w.dtype}, expected packed uint8 for W4A16_AWQ")
        q = _unpack_int4_rows(w)
        cols = q.shape[1]
        deq = q * scale.float()[:, torch.arange(cols) // group_size]
    elif quant_algo == "NVFP4":
        q = _unpack_e2m1_cols(w)
        s2 = tensors[f"{prefix}.weight_scale_2"].float()
        block = scale.float() * s2
        deq = q * block[:, torch.arange(q.shape[1]) // (group_size or 16)]
    else:
        raise StageFailed(f"{prefix}: cannot dequantize quant_algo {quant_algo!r}")
    pqs = tensors.get(f"{prefix}.pre_quant_scale")
    if pqs is not None:
        deq = deq * pqs.float().reshape(1, -1)
    return deq


def dequantized_state_dict(folder: Path) -> tuple[dict, dict]:
    """Every tensor of the export as a plain float32 state dict (quantized Linears
    dequantized, scale tensors dropped), plus {linear prefix: quant_algo}."""
    _, hf_quant = read_quant_config(folder)
    q = hf_quant.get("quantization", {})
    algo, group = q.get("quant_algo"), q.get("group_size")
    if algo == "MIXED_PRECISION":
        raise StageFailed(f"{folder}: MIXED_PRECISION exports are not handled by this reader")
    tensors = _load_tensors(folder)
    out, quantized = {}, {}
    scale_suffixes = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale")
    for name, t in tensors.items():
        if name.endswith(scale_suffixes):
            continue
        if name.endswith(".weight") and f"{name[:-7]}.weight_scale" in tensors:
            prefix = name[: -len(".weight")]
            out[name] = dequantize_weight(tensors, prefix, algo, group)
            quantized[prefix] = algo
        else:
            out[name] = t.float()
    return out, quantized


def _fp8_fake_quant_hook(scale: float):
    """Forward pre-hook that rounds a Linear's input through FP8 e4m3 with the export's
    static ``input_scale``, as FP8 GEMMs do at run time."""
    import torch

    def hook(module, args):
        x = args[0]
        xq = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale
        return (xq.to(x.dtype),) + tuple(args[1:])

    return hook


def load_modelopt_dequantized(folder: str | Path, dtype=None, simulate_fp8_activations: bool = True):
    """A transformers model whose weights are the export's dequantized weights.

    Numerically this is what a weight-dequantizing runtime computes; with
    ``simulate_fp8_activations`` FP8 exports also round each Linear input through e4m3 with
    the exported ``input_scale`` (W8A8 like TensorRT-LLM's FP8 GEMMs). The FP8 KV cache
    (k_scale/v_scale) is not simulated. No low-bit kernels run: speed numbers from this
    model say nothing about the format.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    dtype = dtype or torch.float32
    state, quantized = dequantized_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    # A tied lm_head is legitimately absent from the export.
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise StageFailed(f"{folder}: dequantized tensors do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if simulate_fp8_activations:
        _, hf_quant = read_quant_config(folder)
        if hf_quant.get("quantization", {}).get("quant_algo") == "FP8":
            tensors = _load_tensors(folder)
            for prefix in quantized:
                s = tensors.get(f"{prefix}.input_scale")
                if s is not None:
                    model.get_submodule(prefix).register_forward_pre_hook(_fp8_fake_quant_hook(float(s)))
    model.eval()
    return model


# ------------------------------------------------------------ quantizing
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
    from pipeline.targets.cards import MODELOPT_FLAGS, card_data, hub_card, source_identity, usage_sections

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
