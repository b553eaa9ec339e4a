"""A plain perplexity for in-stage checks: exp(mean NLL) over non-overlapping windows.

Stages use it to sanity-check what they produce (the demo model after training, a
ModelOpt export after dequantizing it). It scores every token of each window, unlike
the evals' llama-perplexity-style scoring (evals/accuracy.py), which is what reports
and gates use.
"""

from __future__ import annotations

import math

from pipeline.errors import StageFailed


def window_perplexity(model, tokenizer, text: str, seq_len: int = 256, max_tokens: int = 8192) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` in windows of `seq_len`, float32 logits, on the model's device."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    t = torch.tensor(ids, dtype=torch.long)
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            w = t[start : start + seq_len].unsqueeze(0).to(device)
            if w.shape[1] < 2:
                break
            logits = model(input_ids=w).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    if count == 0:
        raise StageFailed("the text is too short to measure perplexity")
    return math.exp(nll / count), count
