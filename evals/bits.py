"""Bits per weight, counted from an artifact's own files: the linear layers alone and the whole model.

Formats are compared at equal bits, so every artifact states what it stores per weight:

* ``bpw_linear``: the stored bits of the decoder blocks' linear layers (weights plus
  everything stored to decode them: scales, zero points, group indices, packed
  shapes; their biases) over those layers' parameters. What a quantization scheme
  costs where it applies: W4A16 group 64 with 16-bit scales is 4.25.
* ``bpw_model``: every stored tensor's bits over every parameter of the model
  (embeddings, norms and an untied output layer included; a tied output counts once,
  as the file stores it once). A format that keeps the embedding in 16 bits pays for
  it here.

Per format, from the file alone:

* **GGUF**: the tensor infos of the header (:mod:`pipeline.backends.gguf_header`): each
  tensor's element count and its type's block size give its bytes; linear layers
  are the 2-D tensors of the ``blk.N.`` blocks.
* **safetensors folders** (plain Hugging Face checkpoints, compressed-tensors, ModelOpt
  exports): tensor byte ranges from each file's header; a module's tensors are grouped
  by name prefix. Parameters are counted from the logical weight shape: the tensor's
  own shape for unpacked dtypes, ``weight_shape`` for compressed-tensors'
  ``weight_packed``, and two 4-bit values per byte for ModelOpt's packed ``uint8``
  weights (INT4-AWQ, NVFP4; ``hf_quant_config.json`` says which). Linear layers are the
  modules inside a numbered block (``layers.N``, ``h.N``, ``blocks.N``) that store a
  2-D weight. Scales of non-linear modules (a KV-cache scale) count as bits, not
  parameters.

Why the safetensors header is read directly: the byte range of each tensor is what is
counted, and the header (8-byte length, then JSON with dtype, shape and data offsets;
the format's whole specification) holds exactly that; ``safetensors.safe_open`` gives
shapes and dtypes but no sizes, and would need a table of dtype widths that new
formats (F4, F8 variants) keep extending.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: a decoder block's number in a tensor name (HF: model.layers.3., transformer.h.3.; GGUF: blk.3.)
BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|blk)\.\d+\.")
#: tensors that hold parameters (the rest are scales, zero points, indices: bits only)
PARAM_SUFFIXES = ("weight", "bias", "weight_packed")
#: ModelOpt quantization algorithms that pack two 4-bit weights per uint8
MODELOPT_4BIT = ("INT4", "W4A", "NVFP4", "FP4")


@dataclass(frozen=True)
class BitCount:
    bpw_linear: float | None
    bpw_model: float | None
    linear_params: int
    model_params: int
    linear_bytes: int
    model_bytes: int
    counted_from: str  # what was read: "gguf header", "safetensors headers (compressed-tensors)", ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BitsError(ValueError):
    """The files do not say how many bits they store per weight (a format this module does not read)."""


def _ratio(bytes_: int, params: int) -> float | None:
    return round(8.0 * bytes_ / params, 4) if params else None


def _count(tensors: list[tuple[str, int, int, bool]], counted_from: str) -> BitCount:
    """From (module, params, bytes, is_linear) per tensor."""
    lin_p = sum(p for _, p, _, lin in tensors if lin)
    lin_b = sum(b for _, _, b, lin in tensors if lin)
    all_p = sum(p for _, p, _, _ in tensors)
    all_b = sum(b for _, _, b, _ in tensors)
    return BitCount(_ratio(lin_b, lin_p), _ratio(all_b, all_p), lin_p, all_p, lin_b, all_b, counted_from)


# ------------------------------------------------------------------ GGUF
def gguf_bits(path: Path) -> BitCount:
    from pipeline.backends.gguf_header import read_header

    rows = []
    for t in read_header(path).tensors:
        elements = math.prod(t.shape)
        rows.append((t.name, elements, t.n_bytes, len(t.shape) == 2 and bool(BLOCK.search(t.name))))
    return _count(rows, "gguf header")


# ------------------------------------------------------------------ safetensors
def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BitsError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_ints(path: Path, start: int, info: dict) -> list[int]:
    """A small integer tensor's values (compressed-tensors' weight_shape: 2 x int64 or int32)."""
    fmt = {"I64": "q", "I32": "i", "U64": "Q", "U32": "I"}.get(info["dtype"])
    if fmt is None:
        raise BitsError(f"{path}: weight_shape has dtype {info['dtype']}")
    a, b = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        data = f.read(b - a)
    return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


def safetensors_bits(folder: Path) -> BitCount:
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BitsError(f"{folder}: no .safetensors file")
    config: dict = {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        pass
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") or ""
    algo = ""
    if (folder / "hf_quant_config.json").is_file():
        method = method or "modelopt"
        hq = json.loads((folder / "hf_quant_config.json").read_text())
        algo = str((hq.get("quantization") or {}).get("quant_algo") or "")
    algo = algo or str(qc.get("quant_algo") or "")
    modelopt_packed = method == "modelopt" and any(k in algo.upper() for k in MODELOPT_4BIT)
    # name -> (file, data start, info)
    tensors: dict[str, tuple[Path, int, dict]] = {}
    for f in files:
        header, start = _safetensors_header(f)
        for name, info in header.items():
            tensors[name] = (f, start, info)
    # The modules that store a 2-D weight inside a numbered block are the linear layers.
    linear_modules = set()
    for name, (f, start, info) in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in ("weight", "weight_packed") and BLOCK.search(name) and len(info["shape"]) == 2:
            linear_modules.add(module)
    rows = []
    for name, (f, start, info) in tensors.items():
        module, _, suffix = name.rpartition(".")
        a, b = info["data_offsets"]
        stored = b - a
        params = 0
        if suffix == "weight_packed":
            shape_name = f"{module}.weight_shape"
            if shape_name not in tensors:
                raise BitsError(f"{folder}: {name} is packed and {shape_name} is missing")
            sf, sstart, sinfo = tensors[shape_name]
            params = math.prod(_read_ints(sf, sstart, sinfo))
        elif suffix in PARAM_SUFFIXES:
            params = math.prod(info["shape"])
            if suffix == "weight" and modelopt_packed and info["dtype"] == "U8" and module in linear_modules:
                params *= 2  # two 4-bit values per byte
        rows.append((module, params, stored, module in linear_modules))
    what = {"compressed-tensors": "compressed-tensors", "modelopt": f"ModelOpt {algo}".strip()}.get(method, method or "plain")
    return _count(rows, f"safetensors headers ({what})")


# ------------------------------------------------------------------ any artifact
def count_bits(path: Path) -> BitCount:
    """The bit count of an artifact folder (or file): a GGUF, else its safetensors."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_bits(path)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return gguf_bits(ggufs[0])
    if len(ggufs) > 1:
        raise BitsError(f"{path}: {len(ggufs)} GGUF files; one artifact is one file")
    if path.is_dir() and any(path.glob("*.safetensors")):
        return safetensors_bits(path)
    raise BitsError(f"{path}: neither a GGUF file nor a folder of safetensors")


def bits_fields(path: str | Path | None) -> dict[str, Any]:
    """``bpw_linear``, ``bpw_model`` and the counts behind them, for an artifact or source entry of
    report.json; empty when there is nothing this module can read (an engine, a missing folder)."""
    if not path or not Path(path).exists():
        return {}
    try:
        c = count_bits(Path(path))
    except (BitsError, OSError, ValueError) as exc:
        return {"bpw_detail": {"error": str(exc)}}
    return {"bpw_linear": c.bpw_linear, "bpw_model": c.bpw_model, "bpw_detail": c.as_dict()}
