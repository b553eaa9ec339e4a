"""GGUF sources of each tokenizer family quantforge rebuilds, made here end to end.

For each family: a tokenizer is trained on the bundled corpus with that family's splitting, a small
random Llama is written beside it, llama.cpp's converter turns the folder into a GGUF (through the
GGUF target's own conversion, which checks that llama.cpp tokenizes like the trained tokenizer), and
that GGUF then goes through the GGUF source stage: its tokenizer is rebuilt from the file's metadata
alone and checked against llama.cpp on the original file (the round trip), then compared with the
tokenizer the model was made with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.backends import llamacpp
from pipeline.errors import InvalidInput

MISSING = llamacpp.missing()
needs_llama_cpp = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

TEXT = ("Hello world's 12345 numbers, x=3.14; don't STOP!! \u6771\u4eac\u3067\u3059 caf\u00e9 \U0001f600\n\n"
        "    def f(a):\n\treturn a + 1  # it's 2024\r\n  spaces   here  ")


def _corpus(chars: int = 200_000) -> list[str]:
    from pipeline.data.corpus import corpus_text

    text = corpus_text("train")[:chars]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)] + [TEXT, "0123456789 " * 20]


def _random_llama(folder: Path, vocab: int, bos: int, eos: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=512, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))


def bpe_model(folder: Path, pre: str) -> Path:
    """A byte-level BPE trained with the splitting quantforge maps `pre` to, and a random Llama using it."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.sources.gguf import IGNORE_MERGES, PRE_TOKENIZERS

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(ignore_merges=pre in IGNORE_MERGES))
    data = json.loads(tk.to_str())
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    tk = Tokenizer.from_str(json.dumps(data))
    tk.decoder = decoders.ByteLevel()
    from tokenizers.pre_tokenizers import ByteLevel

    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    folder.mkdir(parents=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[0]).save_pretrained(str(folder))
    _random_llama(folder, tk.get_vocab_size(), 0, 0)
    return folder


def sentencepiece_model(folder: Path) -> Path:
    """A SentencePiece BPE vocabulary (byte fallback, as Llama 2 / Mistral / Gemma have) and a random Llama."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    (folder / "tokenizer.vocab").unlink()
    # A Llama-2-style folder: tokenizer.model and its class (transformers converts it when loading).
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    _random_llama(folder, 600, 1, 2)
    return folder


def to_gguf(model: Path, pre: str | None) -> Path:
    """The folder through the GGUF target's conversion (llama.cpp's converter; `pre` names the pre-tokenizer)."""
    from pipeline.targets.gguf.convert import convert

    out = model.parent / f"{model.name}.gguf"
    conv = convert(model, out, "f32", lambda m: None, pre_tokenizer=pre, verify_text=TEXT + _corpus(4000)[0])
    assert conv.tokenization["equal"], conv.tokenization
    return out


def source_folder(gguf_file: Path, artifacts: Path):
    from pipeline.core.runner import execute
    from pipeline.sources.gguf import gguf_stage

    result = execute([gguf_stage(gguf_file, "float32", label=gguf_file.name)], artifacts, log=lambda m: None)["source"]
    assert result.output is not None, result.reason
    return result.output


def same_as_original(original: Path, rebuilt: Path) -> None:
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(str(original)), AutoTokenizer.from_pretrained(str(rebuilt))
    for text in (TEXT, _corpus(3000)[0]):
        assert b.encode(text, add_special_tokens=False) == a.encode(text, add_special_tokens=False)


# One name per distinct splitting (llama.cpp maps several names to each).
FAMILIES = ["llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "deepseek-v3", "gpt-4o", "tekken", "starcoder", "gpt-2"]
FAST = {"llama-bpe", "qwen2"}


@needs_llama_cpp
@pytest.mark.parametrize("pre", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in FAMILIES])
def test_bpe_family_gguf_source_round_trips(tmp_path, pre):
    model = bpe_model(tmp_path / pre, pre)
    gguf_file = to_gguf(model, pre)
    from pipeline.backends.gguf_header import read_header

    assert read_header(gguf_file).metadata["tokenizer.ggml.pre"] == pre
    out = source_folder(gguf_file, tmp_path / "artifacts")
    check = out.result["tokenizer_check"]
    assert check["ok"] and check["texts"] >= 7
    assert out.result["special_tokens"]["pre"] == pre
    same_as_original(model, out.model_dir)


@needs_llama_cpp
def test_sentencepiece_gguf_source_round_trips(tmp_path):
    model = sentencepiece_model(tmp_path / "spm")
    gguf_file = to_gguf(model, None)
    from pipeline.backends.gguf_header import read_header

    assert read_header(gguf_file).metadata["tokenizer.ggml.model"] == "llama"
    out = source_folder(gguf_file, tmp_path / "artifacts")
    assert out.result["tokenizer_check"]["ok"] and out.result["special_tokens"]["pre"] == "sentencepiece"
    same_as_original(model, out.model_dir)


def _header_only_gguf(path: Path, model: str, pre: str | None) -> Path:
    """A GGUF whose header names a tokenizer, written by the gguf library (a header decides; no tensor is read)."""
    import gguf as gguf_lib
    import numpy as np

    w = gguf_lib.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("model, pre, message", [
    ("gpt2", "falcon", "pre-tokenizer 'falcon' (tokenizer.ggml.pre) is not one quantforge can rebuild"),
    ("t5", None, "tokenizer type 't5' (tokenizer.ggml.model) cannot be rebuilt"),
    ("llama", None, "SentencePiece vocabulary has no scores"),
])
def test_unsupported_tokenizers_are_refused_by_validate_from_the_header(tmp_path, model, pre, message):
    from typer.testing import CliRunner

    from pipeline.cli.main import app
    from pipeline.sources.gguf import read_info

    bad = _header_only_gguf(tmp_path / "m.gguf", model, pre)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        read_info(bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tok\nsource: {{model: {bad}}}\ntargets:\n  - {{name: fp8, kind: fp8}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_source_that_fails_while_building_runs_once(tmp_path):
    """A GGUF whose header passes every check but whose tensors cannot be dequantized fails in the build;
    `quantforge run` then stops instead of running the source again for the evaluation."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    bad = _header_only_gguf(tmp_path / "m.gguf", "gpt2", "gpt-2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: once\nsource: {{model: {bad}}}\ntargets:\n  - {{name: fp8, kind: fp8}}\nevals: {{devices: [cpu]}}\n")
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-register", "-q", "--artifacts-dir", str(tmp_path / "a")])
    assert result.exit_code == 1, result.output
    assert result.output.count("[source] FAILED") == 1, result.output  # a failure shows even with -q
    log = (tmp_path / "a" / "once" / "logs" / "source.log").read_text()
    assert "Traceback" in log and "[source] FAILED" not in log  # the whole error is in the stage's log
    assert "the source failed to build" in result.output and "nothing to evaluate or register" in result.output
