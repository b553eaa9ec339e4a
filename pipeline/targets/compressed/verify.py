"""Verify a compressed-tensors checkpoint in a fresh process: a child of
:func:`pipeline.core.proc.call`, whose request names the folder, the source folder, the
ignored modules, the calibration folder, the expected bits and type, and the threads
(:func:`pipeline.targets.compressed.stages.verify_request`).

A fresh process so nothing from the quantizing process (patched modules, cached
state, the live model) can make a broken folder look fine. Checks:

1. config.json says ``quant_method: compressed-tensors`` (and the expected bits/type).
2. transformers reloads the folder (decompressing) and a forward pass over a few
   calibration tokens gives finite logits.
3. Quantization is real, read from the safetensors files themselves: every Linear
   that is not ignored is stored quantized (int: packed int32 that unpacks, with
   compressed-tensors' own ``unpack_from_int32``, into the signed range of its bit
   width; FP8: ``float8_e4m3fn`` with a scale), and the dense weight transformers
   runs has at most 2**bits distinct values in each quantization group.
4. Ignored modules (e.g. lm_head) are stored untouched: same dtype and values as
   the source.

The result is the report: ``ok``, and ``failures`` naming each check that failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FORWARD_TOKENS = 64


# ------------------------------------------------------------------ readers
def read_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of every *.safetensors file in folder, by name (lazily, via safe_open)."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        handle = safe_open(str(path), framework="pt")
        for key in handle.keys():
            tensors[key] = (handle, key)
    return tensors


def get(tensors: dict, key: str):
    handle, name = tensors[key]
    return handle.get_tensor(name)


def weight_args(quant_config: dict) -> dict:
    """The weights' QuantizationArgs of the (single) config group."""
    groups = quant_config.get("config_groups") or {}
    for group in groups.values():
        if group.get("weights"):
            return group["weights"]
    return {}


# ------------------------------------------------------------------- checks
def check_config(config: dict, expect_bits: int | None, expect_type: str | None, failures: list[str]) -> dict:
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        failures.append(f"config.json quantization_config.quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'")
    args = weight_args(qc)
    if expect_bits is not None and args.get("num_bits") != expect_bits:
        failures.append(f"config.json says weights are {args.get('num_bits')}-bit, expected {expect_bits}")
    if expect_type is not None and args.get("type") != expect_type:
        failures.append(f"config.json says weight type {args.get('type')!r}, expected {expect_type!r}")
    return qc


def forward_ids(folder: Path, calibration: Path | None):
    """A few real tokens: the first calibration sample, else a tokenized sentence."""
    import torch

    if calibration is not None and (calibration / "input_ids.npy").is_file():
        import numpy as np

        ids = np.load(calibration / "input_ids.npy")[0][:FORWARD_TOKENS]
        return torch.tensor(ids, dtype=torch.long).unsqueeze(0), "calibration sample 0"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = "The quick brown fox jumps over the lazy dog. " * 8
    return tok(text, return_tensors="pt").input_ids[:, :FORWARD_TOKENS], "fixed sentence"


def load_model(folder: Path):
    """Reload with transformers, decompressing to dense weights (no CPU int4/FP8 kernels)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # On a GPU the forward check takes seconds even for an 8B model; on a CPU it runs there.
    device = "cuda" if torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=CompressedTensorsConfig(dequantize=True), device_map=device)


def check_forward(model, ids, failures: list[str]) -> dict:
    import torch

    with torch.no_grad():
        logits = model(ids.to(model.device)).logits
    finite = bool(torch.isfinite(logits).all())
    if not finite:
        failures.append("the reloaded model's logits are not finite")
    return {"tokens": int(ids.shape[1]), "logits_finite": finite, "logits_dtype": str(logits.dtype).removeprefix("torch.")}


def max_distinct_per_group(weight, group_size: int | None) -> int:
    """Largest number of distinct values in any quantization group of a dense [out, in] weight."""
    import torch

    w = weight.detach().float()
    groups = w.reshape(-1, group_size) if group_size else w  # channel strategy: one group per row
    s = torch.sort(groups, dim=1).values
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
    return int(distinct.max())


def check_int_module(name: str, tensors: dict, args: dict, dense_weight, failures: list[str]) -> dict:
    """Packed int weights unpack into range, and the dense weight has <= 2**bits levels per group."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = int(args["num_bits"])
    packed = get(tensors, f"{name}.weight_packed")
    shape = torch.Size(get(tensors, f"{name}.weight_shape").tolist())
    values = unpack_from_int32(packed, bits, shape)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < lo or vmax > hi:
        failures.append(f"{name}: unpacked {bits}-bit values span [{vmin}, {vmax}], outside [{lo}, {hi}]")
    if f"{name}.weight_scale" not in tensors:
        failures.append(f"{name}: no weight_scale stored")
    group = args.get("group_size") if args.get("strategy") == "group" else None
    levels = max_distinct_per_group(dense_weight, group)
    if levels > 2**bits:
        failures.append(f"{name}: the reloaded weight has {levels} distinct values in one group (> {2 ** bits} for {bits}-bit)")
    return {"stored": "int32-packed", "bits": bits, "shape": list(shape), "max_levels_per_group": levels}


def check_int8_module(name: str, tensors: dict, args: dict, dense_weight, failures: list[str]) -> dict:
    """int-quantized layout (int8 weights stored as int8)."""
    import torch

    w = get(tensors, f"{name}.weight")
    if w.dtype != torch.int8:
        failures.append(f"{name}: weight stored as {w.dtype}, expected torch.int8")
    group = args.get("group_size") if args.get("strategy") == "group" else None
    levels = max_distinct_per_group(dense_weight, group)
    if levels > 2 ** int(args["num_bits"]):
        failures.append(f"{name}: the reloaded weight has {levels} distinct values in one group")
    return {"stored": str(w.dtype).removeprefix("torch."), "bits": int(args["num_bits"]), "max_levels_per_group": levels}


def check_fp8_module(name: str, tensors: dict, failures: list[str]) -> dict:
    import torch

    w = get(tensors, f"{name}.weight")
    if w.dtype != torch.float8_e4m3fn:
        failures.append(f"{name}: weight stored as {w.dtype}, expected torch.float8_e4m3fn")
    if f"{name}.weight_scale" not in tensors:
        failures.append(f"{name}: no weight_scale stored")
    return {"stored": str(w.dtype).removeprefix("torch."), "bits": 8}


def check_quantized(model, tensors: dict, qc: dict, ignore: list[str], failures: list[str]) -> dict:
    """Every Linear not ignored is stored quantized, in the form config.json declares."""
    import torch
    from compressed_tensors.utils import is_match

    args = weight_args(qc)
    per_module: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or is_match(name, module, ignore):
            continue
        if f"{name}.weight_packed" in tensors:
            per_module[name] = check_int_module(name, tensors, args, module.weight, failures)
        elif f"{name}.weight" in tensors and args.get("type") == "float":
            per_module[name] = check_fp8_module(name, tensors, failures)
        elif f"{name}.weight" in tensors and args.get("type") == "int":
            per_module[name] = check_int8_module(name, tensors, args, module.weight, failures)
        else:
            failures.append(f"{name}: a Linear that is not ignored has no quantized weight in the checkpoint")
    if not per_module:
        failures.append("no quantized Linear layer found")
    levels = [m["max_levels_per_group"] for m in per_module.values() if "max_levels_per_group" in m]
    stored = sorted({m["stored"] for m in per_module.values()})
    return {"quantized_linears": len(per_module), "stored_as": stored, "max_levels_per_group": max(levels) if levels else None}


def ignored_keys(tensors: dict, ignore: list[str]) -> list[str]:
    """Tensor names that belong to ignored modules."""
    from compressed_tensors.utils import match_name

    out = []
    for key in tensors:
        module = key.rsplit(".", 1)[0]
        if any(match_name(module, pattern) for pattern in ignore):
            out.append(key)
    return sorted(out)


def check_ignored(source_tensors: dict, tensors: dict, ignore: list[str], config: dict, failures: list[str]) -> dict:
    """Ignored modules are byte-for-byte the source's (dtype and values)."""
    import torch

    compared, tied = [], []
    for key in ignored_keys(source_tensors, ignore):
        if key not in tensors:
            failures.append(f"{key}: in the source but missing from the checkpoint")
            continue
        a, b = get(source_tensors, key), get(tensors, key)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            failures.append(f"{key}: ignored but changed ({a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)})")
        compared.append(key)
    # A tied lm_head has no tensor of its own: it is the embedding, which is never quantized.
    for pattern in ignore:
        if not any(k.startswith(pattern + ".") for k in compared) and config.get("tie_word_embeddings"):
            tied.append(pattern)
    if not compared and not tied and ignore:
        failures.append(f"no tensor of the ignored modules {ignore} found in the source to compare")
    return {"compared": compared, "tied_to_embeddings": tied}


def verify(folder: Path, source: Path, ignore: list[str], calibration: Path | None, expect_bits, expect_type) -> dict:
    failures: list[str] = []
    config = json.loads((folder / "config.json").read_text())
    qc = check_config(config, expect_bits, expect_type, failures)
    tensors = read_tensors(folder)
    model = load_model(folder)
    ids, ids_from = forward_ids(folder, calibration)
    report: dict[str, Any] = {"format": qc.get("format"), "weights": weight_args(qc)}
    report["forward"] = {**check_forward(model, ids, failures), "input": ids_from}
    report["quantized"] = check_quantized(model, tensors, qc, ignore, failures)
    report["ignored"] = check_ignored(read_tensors(source), tensors, ignore, config, failures)
    files = sorted(p.name for p in folder.iterdir())
    for needed in ("config.json", "recipe.yaml", "tokenizer.json", "README.md", "generation_config.json"):
        if needed not in files:
            failures.append(f"{needed} is missing from the checkpoint folder")
    report["files"] = files
    report["failures"] = failures
    report["ok"] = not failures
    return report


def handle(request: dict) -> dict:
    import torch

    torch.set_num_threads(max(1, request["threads"]))
    try:
        return verify(Path(request["folder"]), Path(request["source"]), request["ignore"],
                      Path(request["calibration"]) if request.get("calibration") else None,
                      request.get("expect_bits"), request.get("expect_type"))
    except Exception as exc:  # a folder that cannot even be checked failed verification: the report says why
        return {"ok": False, "failures": [f"verification raised {type(exc).__name__}: {exc}"]}


if __name__ == "__main__":
    from pipeline.core.proc import serve

    sys.exit(serve(handle))
