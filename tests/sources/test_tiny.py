"""The built-in demo model: shipped corpus and its split, and a real (mini) training run."""

from __future__ import annotations

import math

import pytest

from pipeline.data.corpus import corpus_paragraphs, corpus_path, corpus_sha256, corpus_text
from pipeline.sources.tiny import VARIANTS


def test_corpus_is_shipped_and_hashed():
    data = corpus_path().read_bytes()
    assert 400_000 <= len(data) <= 1_500_000
    data.decode("utf-8")
    assert len(corpus_sha256()) == 64
    assert corpus_sha256() == corpus_sha256()


def test_corpus_split_is_deterministic_and_disjoint():
    train, heldout = corpus_paragraphs("train"), corpus_paragraphs("heldout")
    assert corpus_paragraphs("heldout") == heldout
    assert corpus_text("train") == "\n\n".join(train)
    assert not set(train) & set(heldout)
    all_paras = [p for p in corpus_path().read_text(encoding="utf-8").split("\n\n")]
    assert len(train) + len(heldout) == len(all_paras)
    assert len(corpus_text("heldout").encode("utf-8")) >= 40_000
    with pytest.raises(ValueError):
        corpus_text("test")


def test_variants_have_quantizer_friendly_shapes():
    assert {"tiny-llama", "tiny-llama-mini"} <= set(VARIANTS)
    for v in VARIANTS.values():
        assert v.vocab_size % 256 == v.hidden_size % 256 == v.intermediate_size % 256 == 0
        assert v.num_heads == v.num_kv_heads
    big = VARIANTS["tiny-llama"]
    assert (big.hidden_size, big.intermediate_size, big.num_layers, big.vocab_size) == (
        256, 768, 4, 4096)


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    from pipeline.sources.tiny import train_demo_model

    out = tmp_path_factory.mktemp("tiny-llama-mini")
    facts = train_demo_model("tiny-llama-mini", out, seed=0, log=lambda _: None)
    return out, facts


def test_mini_model_folder_is_complete(mini_model):
    out, facts = mini_model
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert facts["steps"] == VARIANTS["tiny-llama-mini"].train_steps
    assert facts["heldout_perplexity"] < 400


def test_mini_model_loads_and_learned(mini_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = mini_model
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not model.config.tie_word_embeddings

    # Byte-level BPE round-trips exactly, spaces and newlines included.
    para = corpus_text("heldout").split("\n\n")[0]
    for s in (para, "  two  spaces,\n\nnewlines\tand tabs; caf\u00e9 \u2014 \u00e6 ", corpus_text("heldout")[:2000]):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    assert tok(para)["input_ids"] == tok(para, add_special_tokens=False)["input_ids"]  # no BOS added
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|assistant|>\n")

    ids = torch.tensor([tok(para, add_special_tokens=False)["input_ids"][:256]])
    with torch.no_grad():
        loss = model.float()(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(4096) - 1.0, loss  # uniform is log(4096) = 8.32
