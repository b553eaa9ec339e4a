"""Random-weight Llama-shaped models (``builtin:random-llama-1b``, ``builtin:random-llama-8b``).

For measuring what builds cost as a model grows (time, peak memory, disk) without
downloading one: the shapes of TinyLlama-1.1B and Llama-3-8B, weights drawn from
N(0, 0.02) with a fixed seed (norms 1), and SmolLM2's tokenizer (rebuilt from its
GGUF, so llama.cpp's converter and tokenizer checks run as for a real model).
Accuracy numbers of such a model mean nothing; recipes on it measure cost only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class RandomShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0

    def config(self, vocab_size: int) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size, **asdict(self)}


SHAPES: dict[str, RandomShape] = {
    "random-llama-1b": RandomShape(2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape
    "random-llama-8b": RandomShape(4096, 14336, 32, 32, 8),  # Llama-3-8B's shape
}
VOCAB_SIZE = 49152  # SmolLM2's tokenizer, which these models use
SEED = 0


def build(out: Path, name: str, dtype: str, tokenizer_gguf: Path, log) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from pipeline.sources.gguf import build_tokenizer_files, finalize_config

    t0 = time.perf_counter()
    shape = SHAPES[name]
    special = build_tokenizer_files(tokenizer_gguf, out)
    config = LlamaConfig(**{k: v for k, v in shape.config(VOCAB_SIZE).items() if k not in ("architectures", "model_type")},
                         tie_word_embeddings=False, bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                         pad_token_id=special["pad_token_id"])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    gen = torch.Generator().manual_seed(SEED)
    state = {}
    for pname, p in model.named_parameters():
        # Drawn in float32 on the CPU with a seeded generator (the same bytes on every machine),
        # then rounded to the recipe's dtype.
        t = torch.empty(p.shape, dtype=torch.float32)
        if pname.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[pname] = t.to(getattr(torch, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.generation_config = GenerationConfig(bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                                               pad_token_id=special["pad_token_id"])
    model.save_pretrained(str(out), safe_serialization=True)
    finalize_config(out / "config.json")
    (out / "README.md").write_text(f"# {name}\n\nRandom weights (seed {SEED}) in the shape of {name}; SmolLM2's tokenizer. "
                                   "For measuring build cost only: its accuracy means nothing.\n")
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e9:.2f}B random parameters in {dtype} written in {time.perf_counter() - t0:.0f} s")
    return {"parameters": params, "seconds": round(time.perf_counter() - t0, 1)}
