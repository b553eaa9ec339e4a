"""A Hugging Face hub cache holding only config.json files, written by transformers, for tests
that check hub recipes without the network (``validate`` reads config.json alone)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The shipped hub recipes' models, in the shapes their published config.json files state
#: (Qwen2.5-7B-Instruct: 28 layers, hidden 3584, intermediate 18944, 28 heads / 4 KV heads).
SHIPPED_HUB_MODELS = {
    ("Qwen/Qwen2.5-7B-Instruct", "a09a35458c702b33eeacc393d103063234e8bc28"): dict(
        arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, vocab_size=152064, rope_theta=1000000.0,
        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], dtype="bfloat16",
    ),
}


def write_hub_config(cache: Path, repo: str, commit: str, arch: str = "llama", refs: tuple[str, ...] = ("main",), **shape) -> Path:
    """config.json of `repo` at `commit` in huggingface_hub's cache layout (models--org--name/
    snapshots/<commit>/, refs/<name> -> commit), written by the model's transformers config class."""
    from transformers import AutoConfig

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    AutoConfig.for_model(arch, **shape).save_pretrained(snapshot)
    for ref in refs:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot / "config.json"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache (HF_HUB_OFFLINE) holding the shipped hub recipes' config.json files;
    tests add their own models with write_hub_config."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    for (repo, commit), shape in SHIPPED_HUB_MODELS.items():
        write_hub_config(cache, repo, commit, **shape)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache
