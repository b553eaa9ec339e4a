"""Accuracy against the source model: perplexity, KL divergence, top-token agreement.

How text is scored (the same as llama.cpp's ``llama-perplexity``, so the two can
be cross-checked number for number):

* the suite text is tokenized once, without special tokens, by the source
  model's tokenizer; a runtime with its own tokenizer (llama.cpp) must produce
  the same ids, otherwise the comparison is refused;
* non-overlapping windows of ``context`` tokens (stride = context), at most
  ``max_windows``; when the tokenizer adds a BOS token, the window's first token
  is replaced by BOS (llama.cpp does the same);
* only the second half of each window is scored: the logits at positions
  ``context/2 .. context-2`` predict tokens ``context/2+1 .. context-1``, so
  every scored token has at least context/2 tokens of history.

Reference distributions of the source model are computed once per device and
stored compactly (bounded memory whatever the vocabulary):

* ``full``: when vocab x scored tokens <= :data:`FULL_LIMIT`, every log-probability
  in float16 (renormalized on reading) and the argmax id exactly. KL is exact up
  to float16 rounding (measured: ~2e-6 nats for the source against itself).
* ``top-k``: otherwise the top ``k`` = :data:`TOPK` log-probabilities and their ids,
  plus the log of the remaining mass. KL is then computed over k+1 outcomes (the
  top-k tokens and "everything else"), which by the log-sum inequality is a lower
  bound on the full-vocabulary KL; it is exact when the artifact's distribution
  within the tail is proportional to the source's. Top-1 agreement is exact.

KL is KL(source || artifact) per scored token, in nats, as llama.cpp's
``--kl-divergence`` reports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# Full-vocabulary references up to 2**27 float16 values (256 MiB; e.g. 2,048 scored tokens of a
# 49,152-token vocabulary): KL is then exact, as llama-perplexity's. Above, top-k + tail.
FULL_LIMIT = 1 << 27
TOPK = 32
SCORING = "second half of each window (as llama-perplexity)"


# ------------------------------------------------------------------ metrics
def log_softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    x = np.asarray(logits, dtype=dtype)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def token_nll(logprobs: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each target under its row of log-probabilities."""
    lp = np.asarray(logprobs)
    return -lp[np.arange(len(targets)), np.asarray(targets)].astype(np.float64)


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


def kl_divergence(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, full vocabulary, in nats."""
    p_lp = np.asarray(p_logprobs, dtype=np.float64)
    q_lp = np.asarray(q_logprobs, dtype=np.float64)
    return np.maximum((np.exp(p_lp) * (p_lp - q_lp)).sum(axis=-1), 0.0)


def top1_agreement(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """Whether the most likely token is the same, per row."""
    return np.asarray(p_logprobs).argmax(-1) == np.asarray(q_logprobs).argmax(-1)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (0 for fewer than 11 values)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    f = float(v.mean())
    df = float((v * v).mean() - f * f)
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def divergence_stats(kl: np.ndarray, nll_q: np.ndarray, nll_base: np.ndarray, same_top: np.ndarray) -> dict:
    """llama-perplexity --kl-divergence's statistics (tools/perplexity/perplexity.cpp), from per-token values.

    ``kl``: KL(base || q) per scored token; ``nll_q`` / ``nll_base``: each model's negative
    log-likelihood of the actual next token; ``same_top``: whether the argmax agrees.
    Percentiles interpolate linearly between sorted values, as llama.cpp's do.
    """
    kl = np.asarray(kl, dtype=np.float64)
    nll_q = np.asarray(nll_q, dtype=np.float64)
    nll_base = np.asarray(nll_base, dtype=np.float64)
    n = kl.size
    lq, lq_unc = mean_and_uncertainty(nll_q)
    lb, lb_unc = mean_and_uncertainty(nll_base)
    cov = float((nll_q * nll_base).mean() - lq * lb) / (n - 1) if n > 1 else 0.0
    ratio_log = lq - lb
    ratio_log_unc = math.sqrt(max(lq_unc**2 + lb_unc**2 - 2.0 * cov, 0.0))
    ppl_ratio = math.exp(ratio_log)
    kl_mean, kl_unc = mean_and_uncertainty(kl)
    p_diff = np.exp(-nll_q) - np.exp(-nll_base)
    mse, mse_unc = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    same = float(np.mean(same_top)) if n else 0.0
    q = lambda x, f: float(np.quantile(x, f))  # noqa: E731 - numpy's default is llama.cpp's linear rule
    return {
        "ppl_ratio": ppl_ratio,
        "ppl_ratio_err": ppl_ratio * ratio_log_unc,
        "ln_ppl_ratio": ratio_log,
        "ln_ppl_ratio_err": ratio_log_unc,
        "kl_mean": kl_mean,
        "kl_mean_err": kl_unc,
        "kl_max": float(kl.max()),
        "kl_p999": q(kl, 0.999),
        "kl_p99": q(kl, 0.99),
        "kl_p95": q(kl, 0.95),
        "kl_p90": q(kl, 0.90),
        "kl_median": float(np.median(kl)),
        "kl_p10": q(kl, 0.10),
        "kl_min": float(kl.min()),
        "delta_p_mean_pct": 100.0 * float(p_diff.mean()),
        "rms_dp_pct": 100.0 * rms,
        "rms_dp_pct_err": 100.0 * (0.5 / rms * mse_unc if rms > 0 else 0.0),
        "top1_agreement_pct": 100.0 * same,
        "top1_agreement_pct_err": 100.0 * math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0,
    }


# ------------------------------------------------------------------ windows
@dataclass(frozen=True)
class Windows:
    windows: list[list[int]]
    context: int
    first: int  # first scored logit position in each window

    @property
    def stride(self) -> int:
        return self.context

    def targets(self, i: int) -> list[int]:
        return self.windows[i][self.first + 1 :]

    @property
    def scored_tokens(self) -> int:
        return len(self.windows) * (self.context - self.first - 1)


def make_windows(ids: Sequence[int], context: int, max_windows: int, bos_id: int | None = None, skip: int = 0) -> Windows:
    """Up to `max_windows` windows after the first `skip` (text another measurement already used)."""
    n = min(max_windows, len(ids) // context - skip)
    if n < 1:
        if skip:
            raise ValueError(f"the suite text has {len(ids)} tokens, {len(ids) // context} windows of {context}: "
                             f"none left after the {skip} another measurement uses")
        raise ValueError(f"the suite text has {len(ids)} tokens, fewer than one window of {context}")
    windows = []
    for i in range(skip, skip + n):
        w = list(ids[i * context : (i + 1) * context])
        if bos_id is not None:
            w[0] = bos_id
        windows.append(w)
    return Windows(windows=windows, context=context, first=context // 2)


# ---------------------------------------------------------------- reference
class Reference:
    """The source model's distributions at every scored position, stored compactly."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.a = arrays

    @property
    def mode(self) -> str:
        return "full" if "logprobs" in self.a else "top-k"

    @property
    def method(self) -> str:
        if self.mode == "full":
            return "full vocabulary (float16 reference)"
        return f"top-{self.a['top_ids'].shape[1]} + tail bucket (a lower bound on full KL)"

    @classmethod
    def build(cls, rows: list[np.ndarray], vocab: int, k: int = TOPK, full_limit: int = FULL_LIMIT) -> "Reference":
        """Compact the source's rows of log-probabilities (all scored positions, in order)."""
        full = sum(r.shape[0] for r in rows) * vocab <= full_limit
        parts = [cls.compact(r, k, full) for r in rows]
        return cls({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})

    @staticmethod
    def compact(lp: np.ndarray, k: int, full: bool, nll: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One window's rows in the stored form (so the full rows of all windows are never held at once).

        ``nll`` (the source's negative log-likelihood of each actual next token) is kept
        exactly: the perplexity ratio and Δp statistics need it in either mode.
        """
        lp = np.asarray(lp, dtype=np.float32)
        extra = {"nll": np.asarray(nll, dtype=np.float64)} if nll is not None else {}
        if full:
            # argmax kept exactly: float16 rounding would break near-ties between the top two tokens.
            return {"logprobs": lp.astype(np.float16), "top1": lp.argmax(1).astype(np.int32), **extra}
        k = min(k, lp.shape[1])
        ids = np.argpartition(-lp, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(lp, ids, axis=1)
        order = np.argsort(-vals, axis=1)
        ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
        tail = np.log(np.clip(1.0 - np.exp(vals.astype(np.float64)).sum(1), 1e-30, None))
        return {"top_ids": ids.astype(np.int32), "top_logprobs": vals, "tail_log": tail.astype(np.float32), **extra}

    def save(self, path: Path) -> None:
        np.savez(path, **self.a)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path) as z:
            return cls({k: z[k] for k in z.files})

    def compare(self, start: int, q_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(KL per row, top-1 agreement per row) of artifact rows q_lp against reference rows start.."""
        n = q_lp.shape[0]
        q_lp = q_lp.astype(np.float64)
        if self.mode == "full":
            p = self.a["logprobs"][start : start + n].astype(np.float64)
            p = p - np.log(np.exp(p).sum(1, keepdims=True))  # undo float16 rounding of the total
            top1 = self.a["top1"][start : start + n] if "top1" in self.a else p.argmax(1)
            return kl_divergence(p, q_lp), top1 == q_lp.argmax(1)
        ids = self.a["top_ids"][start : start + n]
        p_top = self.a["top_logprobs"][start : start + n].astype(np.float64)
        p_tail = self.a["tail_log"][start : start + n].astype(np.float64)
        q_top = np.take_along_axis(q_lp, ids, axis=1)
        q_tail = np.log(np.clip(1.0 - np.exp(q_top).sum(1), 1e-30, None))
        kl = (np.exp(p_top) * (p_top - q_top)).sum(1) + np.exp(p_tail) * (p_tail - q_tail)
        return np.maximum(kl, 0.0), ids[:, 0] == q_lp.argmax(1)


# ---------------------------------------------------------------- evaluation
def evaluate_windows(window_logprobs: Callable[[list[int], int], np.ndarray], wins: Windows,
                     reference: Reference | None = None,
                     collect: Callable[[np.ndarray], object] | None = None) -> tuple[dict, list]:
    """Score every window; compare with `reference` when given; return (metrics, collect(rows) per window)."""
    nll, kls, agree, rows = [], [], [], []
    start = 0
    for i, w in enumerate(wins.windows):
        lp = window_logprobs(w, wins.first)
        if not np.all(np.isfinite(lp.max(axis=1))):
            raise FloatingPointError(f"non-finite logits in window {i}")
        nll.append(token_nll(lp, wins.targets(i)))
        if reference is not None:
            kl, ag = reference.compare(start, lp)
            kls.append(kl)
            agree.append(ag)
        if collect is not None:
            rows.append(collect(lp, nll[-1]))
        start += lp.shape[0]
    all_nll = np.concatenate(nll)
    out = {
        "perplexity": perplexity(all_nll),
        "nll_mean": float(all_nll.mean()),
        "tokens_scored": int(all_nll.size),
        "windows": len(wins.windows),
        "context": wins.context,
        "stride": wins.stride,
        "scored": SCORING,
    }
    if reference is not None:
        kl = np.concatenate(kls)
        base_nll = reference.a.get("nll")
        has_nll = base_nll is not None and len(base_nll) == all_nll.size
        stats = divergence_stats(kl, all_nll, base_nll if has_nll else all_nll, np.concatenate(agree))
        if not has_nll:
            # A reference without the source's per-token NLL: the perplexity ratio and Δp
            # cannot be computed, only the divergence itself.
            stats = {k: v for k, v in stats.items() if k.startswith(("kl_", "top1_"))}
        out.update(stats)
        out["kl_method"] = reference.method
    return out, rows


def bos_for_windows(source_path: Path) -> int | None:
    """The BOS id when the source tokenizer adds one (then each window starts with it), else None."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source_path))
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is not None and with_special and with_special[0] == tok.bos_token_id:
        return int(tok.bos_token_id)
    return None


def tokenize_source(source_path: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source_path))
    return list(tok(text, add_special_tokens=False)["input_ids"])


def run_accuracy(runtime_name: str, path: Path, device: str, threads: int, ids: list[int] | None, text: str,
                 context: int, max_windows: int, bos_id: int | None,
                 reference_path: Path | None, write_reference: Path | None, skip_windows: int = 0) -> dict:
    """One runtime on one artifact: the body of the accuracy subprocess.

    ``ids=None`` (the source model): tokenize `text` with the tokenizer at `path`
    and save the ids (``ids.npy``) next to the reference, so artifacts are scored
    on exactly the ids the reference was computed on.
    """
    from evals.runtimes import get_runtime

    if ids is None:
        ids = tokenize_source(path, text)
        bos_id = bos_for_windows(path)
        if write_reference is not None:
            np.save(Path(write_reference).parent / "ids.npy", np.asarray(ids, dtype=np.int64))

    rt = get_runtime(runtime_name)
    t0 = time.perf_counter()
    session = rt.open(path, device, threads, logits=True)
    load_s = time.perf_counter() - t0
    try:
        own = session.tokenize(text)
        if own is not None and own != list(ids):
            mism = next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))
            return {"status": "failed", "reason": (
                f"{runtime_name} tokenizes the suite text differently from the source tokenizer "
                f"({len(own)} vs {len(ids)} tokens, first difference at token {mism}); "
                "cross-runtime accuracy needs identical token ids")}
        wins = make_windows(ids, context, max_windows, bos_id, skip_windows)
        reference = Reference.load(reference_path) if reference_path else None
        t1 = time.perf_counter()
        collect = None
        if write_reference is not None:
            full = wins.scored_tokens * session.vocab_size <= FULL_LIMIT
            collect = lambda lp, nll: (Reference.compact(lp, TOPK, full, nll), lp[: min(len(lp), 8)])  # noqa: E731
        metrics, rows = evaluate_windows(session.window_logprobs, wins, reference, collect=collect)
        if write_reference is not None:
            parts = [r[0] for r in rows]
            ref = Reference({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
            ref.save(write_reference)
            # The source against its own stored reference (first rows of each window): 0 KL and
            # 100% top-1 up to storage rounding; a check that storing and reading agree.
            kl, ag = [], []
            start = 0
            for part, head in rows:
                k_, a_ = ref.compare(start, head)
                kl.append(k_)
                ag.append(a_)
                start += len(next(iter(part.values())))
            kl, ag = np.concatenate(kl), np.concatenate(ag)
            metrics.update({"kl_mean": float(kl.mean()), "top1_agreement_pct": float(100 * ag.mean()),
                            "kl_method": ref.method, "reference_mode": ref.mode})
        metrics.update({
            "status": "done",
            "suite_tokens": len(ids),
            "bos_id": bos_id,
            "runtime": runtime_name,
            "threads": threads,
            "load_seconds": round(load_s, 3),
            "eval_seconds": round(time.perf_counter() - t1, 3),
            **{k: v for k, v in session.info.items() if k in ("dequantized", "compute_dtype", "notes", "gguf_add_bos")},
        })
        return metrics
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="quantforge accuracy worker (run by evals.run in a subprocess)")
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--path", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ids", type=Path, help=".npy of the suite's token ids (default: tokenize with the model at --path)")
    ap.add_argument("--text", required=True, type=Path, help="the suite text, UTF-8")
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--max-windows", type=int, required=True)
    ap.add_argument("--bos", type=int, default=-1)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--write-reference", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    result = run_accuracy(a.runtime, a.path, a.device, a.threads, np.load(a.ids).tolist() if a.ids else None,
                          a.text.read_text(encoding="utf-8"), a.context, a.max_windows,
                          None if a.bos < 0 else a.bos, a.reference, a.write_reference)
    a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
