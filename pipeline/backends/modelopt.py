"""Reading NVIDIA ModelOpt checkpoints back, by their documented layout, without ModelOpt.

A ModelOpt "unified HF" checkpoint (``export_hf_checkpoint``) is what TensorRT-LLM's
PyTorch backend, vLLM (``quantization="modelopt"``) and SGLang load. transformers
cannot: it has no ``modelopt`` quant method, loads the FP8 export silently wrong
(fp8 weights cast, scales ignored) and refuses INT4/NVFP4. So quantforge reads
the exported tensors back by ModelOpt's documented layout and dequantizes them; the
ModelOpt target's checks and the ``modelopt_dequant`` eval runtime both use this reader.
Why not ModelOpt itself: it has no loader that dequantizes an export to a plain model.

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

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InvalidInput, StageFailed

# Which norm feeds which Linear in Llama-style decoders (Llama, Mistral, Qwen2/3): AWQ's
# pre_quant_scale of these Linears is folded into the norm on export (see module docstring).
NORM_FEEDS = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


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
