"""Train the built-in demo model ("builtin:tiny-llama") from the shipped corpus.

A byte-level BPE tokenizer (GPT-2 pre-tokenizer regex, so llama.cpp's ``gpt-2``
pre-tokenizer reproduces it) and a small ``LlamaForCausalLM``, trained on CPU in
float32 for a fixed number of steps from a fixed seed, saved as a complete Hugging
Face folder with bfloat16 weights.

Why float32 compute, not bf16 autocast: the machines this ran on (AMD EPYC, AVX2 only:
no AVX-512-BF16, no AMX) spent ~18x more CPU time per step under
``torch.autocast("cpu", dtype=torch.bfloat16)`` than in float32 (mini variant, 1 thread:
~12 s vs ~0.65 s CPU per step). float32 is also the same arithmetic on every x86 CPU.

    python -m pipeline.sources.tiny tiny-llama /tmp/tiny-llama

Heavy libraries (torch, transformers, tokenizers) are imported inside functions.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.corpus import corpus_paragraphs, corpus_sha256, corpus_text
from pipeline.core.perplexity import window_perplexity

EOS_TOKEN = "<|endoftext|>"

# Plain-text role markers; every message ends with the end-of-text token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '" + EOS_TOKEN + "\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Threads: one, on purpose. Measured on the 2-core machine (AMD EPYC, AVX2) while other
# jobs shared it (load ~15), float32, wall/CPU seconds per step:
#   tiny-llama (16 x 512):     1 thread ~18-25 s wall / ~5 s CPU;  2 threads ~29-43 s / ~7-10 s
#   tiny-llama-mini (8 x 256): 1 thread ~2-3 s wall / ~0.65 s CPU; 2 threads ~5-14 s / ~1.5-3.9 s
# With anything else running, OpenMP's second thread mostly waits (as measured for
# GPTQ and llama.cpp too); a single thread also fixes the reduction order, so the bytes written
# are reproducible. On an idle machine 2 threads would be at best ~1.8x faster.
TRAIN_THREADS = 1


@dataclass(frozen=True)
class DemoVariant:
    """Shape and training schedule of one demo model. Every width is a multiple of 256
    (GGUF K-quants use 256-blocks; GPTQ uses groups of 128)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position: int
    train_steps: int
    batch: int
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    eval_max_tokens: int = 32768

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, name) % 256:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of 256")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if self.seq_len > self.max_position:
            raise ValueError("seq_len exceeds max_position")


VARIANTS: dict[str, DemoVariant] = {
    # ~5.5M parameters; about 5 minutes on the 2-core machine.
    "tiny-llama": DemoVariant(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
        num_heads=4, num_kv_heads=4, max_position=512,
        train_steps=100, batch=8, seq_len=512, lr=3e-3, warmup_steps=10,
    ),
    # For tests: ~3.4M parameters; well under 60 s including the tokenizer.
    "tiny-llama-mini": DemoVariant(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2,
        num_heads=4, num_kv_heads=4, max_position=512,
        train_steps=120, batch=4, seq_len=256, lr=3e-3, warmup_steps=10,
        eval_max_tokens=8192,
    ),
}


def build_tokenizer(paragraphs: list[str], vocab_size: int):
    """Byte-level BPE with exactly GPT-2's pre-tokenization; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    # ByteLevel alphabet (256) + special + merges may fall short of the target on tiny
    # text; the model's embedding is sized to vocab_size regardless (extra rows unused).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _finish_tokenizer_files(out_dir: Path) -> None:
    """Make the no-BOS/no-EOS policy explicit for converters (gguf's SpecialVocab reads
    add_bos_token/add_eos_token from tokenizer_config.json; transformers 5 omits them) and
    write special_tokens_map.json, which transformers 5 no longer writes, for older tools."""
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("add_eos_token", False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {k: EOS_TOKEN for k in ("bos_token", "eos_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _token_stream(tokenizer, paragraphs: list[str], eos_id: int):
    """One long 1-D tensor: <eos> para <eos> para ... (paragraph text as in corpus_text)."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        ids.append(eos_id)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def train_demo_model(
    variant: str,
    out_dir: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``variant`` from the shipped corpus and write a Hugging Face folder to ``out_dir``
    (which must exist and be empty). Returns facts about the run."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if variant not in VARIANTS:
        raise KeyError(f"unknown demo variant {variant!r}; known: {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} must be an existing, empty directory")

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        t0 = time.perf_counter()
        train_paras = corpus_paragraphs("train")
        tokenizer = build_tokenizer(train_paras, v.vocab_size)
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        stream = _token_stream(tokenizer, train_paras, eos_id)
        t_tok = time.perf_counter() - t0
        log(f"[{variant}] tokenizer: {len(tokenizer)} tokens, train stream {len(stream)} tokens "
            f"({t_tok:.1f}s)")

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=v.vocab_size,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            num_key_value_heads=v.num_kv_heads,
            max_position_embeddings=v.max_position,
            tie_word_embeddings=False,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": v.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=v.lr, betas=(0.9, 0.95), eps=1e-8,
        )

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < v.warmup_steps:
                return v.lr * (step + 1) / v.warmup_steps
            frac = (step - v.warmup_steps) / max(1, v.train_steps - v.warmup_steps)
            return v.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

        # Deterministic data order: random windows drawn from a generator seeded by `seed`.
        gen = torch.Generator().manual_seed(seed)
        n_windows = len(stream) - v.seq_len - 1
        model.train()
        t1 = time.perf_counter()
        c1 = time.process_time()
        losses: list[float] = []
        for step in range(v.train_steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            starts = torch.randint(0, n_windows, (v.batch,), generator=gen)
            batch = torch.stack([stream[s : s + v.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == v.train_steps - 1:
                log(f"[{variant}] step {step}/{v.train_steps} loss {losses[-1]:.3f} "
                    f"({time.perf_counter() - t1:.0f}s)")
        train_s = time.perf_counter() - t1
        train_cpu_s = time.process_time() - c1

        # Store bfloat16; measure held-out perplexity on exactly those (rounded) weights.
        model = model.to(torch.bfloat16)
        model.generation_config = GenerationConfig(
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        _finish_tokenizer_files(out_dir)
        ppl, eval_tokens = window_perplexity(
            model.float(), tokenizer, corpus_text("heldout"), v.seq_len, v.eval_max_tokens
        )
        final_loss = sum(losses[-10:]) / len(losses[-10:])
        facts = {
            "variant": variant,
            "seed": seed,
            "steps": v.train_steps,
            "train_tokens": v.train_steps * v.batch * v.seq_len,
            "tokenizer_seconds": round(t_tok, 2),
            "train_seconds": round(train_s, 2),
            "train_cpu_seconds": round(train_cpu_s, 2),
            "total_seconds": round(time.perf_counter() - t0, 2),
            "final_train_loss": round(final_loss, 4),
            "heldout_perplexity": round(ppl, 3),
            "heldout_eval_tokens": eval_tokens,
            "parameters": n_params,
            "threads": TRAIN_THREADS,
            "corpus_sha256": corpus_sha256(),
            "variant_config": asdict(v),
        }
        log(f"[{variant}] done: {json.dumps({k: facts[k] for k in list(facts)[:12]})}")
        return facts
    finally:
        torch.set_num_threads(prev_threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] not in VARIANTS:
        print(f"usage: python -m pipeline.sources.tiny {{{','.join(VARIANTS)}}} OUT_DIR [SEED]",
              file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    facts = train_demo_model(argv[0], out, seed=int(argv[2]) if len(argv) == 3 else 0)
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
