"""quantforge's KL statistics agree with llama-perplexity --kl-divergence on the same GGUFs and tokens.

Real model (SmolLM2-135M-Instruct): its F16 GGUF is the base, a Q4_K_M made from it the
quantized model; both are scored by quantforge's accuracy code through the llama.cpp
runtime and by llama.cpp's own tool, on the same 8 windows of 256 tokens.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends import llamacpp

pytestmark = pytest.mark.skipif(llamacpp.missing(["llama-perplexity", "llama-quantize"]) is not None,
                                reason=str(llamacpp.missing(["llama-perplexity", "llama-quantize"])))
CONTEXT, WINDOWS = 256, 8


@pytest.fixture(scope="module")
def ggufs(smollm2_model, tmp_path_factory):
    from pipeline.targets.gguf.convert import convert

    d = tmp_path_factory.mktemp("kl")
    convert(Path(smollm2_model), d / "f16.gguf", "f16", log=lambda m: None)
    llamacpp.run_tool("llama-quantize", [d / "f16.gguf", d / "q4km.gguf", "Q4_K_M", 1], log=lambda m: None)
    return d


def _llama_perplexity(ggufs: Path, text_file: Path) -> str:
    tool = str(llamacpp.tool("llama-perplexity"))
    common = [str(a) for a in ("-f", text_file, "-c", CONTEXT, "-b", CONTEXT, "--chunks", WINDOWS, "-t", 1)]
    base = ggufs / "base.kld"
    subprocess.run([tool, "-m", str(ggufs / "f16.gguf"), *common, "--kl-divergence-base", str(base)], check=True, capture_output=True)
    out = subprocess.run([tool, "-m", str(ggufs / "q4km.gguf"), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
                         check=True, capture_output=True, text=True)
    return out.stdout + out.stderr


def _stat(log: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*([-\d.]+)", log)
    assert m, f"{label!r} not in llama-perplexity's output"
    return float(m.group(1))


def test_kl_statistics_match_llama_perplexity(ggufs, smollm2_model, heldout_text, tmp_path):
    from transformers import AutoTokenizer

    from evals.accuracy import run_accuracy

    text = heldout_text[:60_000]
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(smollm2_model)(text, add_special_tokens=False)["input_ids"]
    ref = run_accuracy("llama_cpp", ggufs / "f16.gguf", "cpu", 1, ids, text, CONTEXT, WINDOWS, None, None, tmp_path / "reference.npz")
    assert ref["status"] == "done", ref
    ours = run_accuracy("llama_cpp", ggufs / "q4km.gguf", "cpu", 1, ids, text, CONTEXT, WINDOWS, None, tmp_path / "reference.npz", None)
    assert ours["status"] == "done", ours
    assert ours["kl_method"].startswith("full vocabulary")
    theirs = _llama_perplexity(ggufs, text_file)
    assert f"{ours['tokens_scored']}" in theirs or ours["tokens_scored"] == WINDOWS * (CONTEXT // 2 - 1)
    # llama.cpp stores the base's log-probabilities as 16-bit integers per token and skips
    # base probabilities below e^-16: agreement to about 1 % on KL, tighter on the rest.
    assert ours["kl_mean"] == pytest.approx(_stat(theirs, "Mean    KLD"), rel=0.02)
    assert ours["kl_median"] == pytest.approx(_stat(theirs, "Median  KLD"), rel=0.03)
    assert ours["kl_p99"] == pytest.approx(_stat(theirs, "99.0%   KLD"), rel=0.03)
    assert ours["kl_max"] == pytest.approx(_stat(theirs, "Maximum KLD"), rel=0.03)
    assert ours["ppl_ratio"] == pytest.approx(_stat(theirs, "Mean PPL(Q)/PPL(base)"), rel=2e-3)
    assert ours["rms_dp_pct"] == pytest.approx(_stat(theirs, "RMS Δp"), abs=0.05)
    assert ours["top1_agreement_pct"] == pytest.approx(_stat(theirs, "Same top p"), abs=0.2)
    assert ours["perplexity"] == pytest.approx(np.exp(np.log(ref["perplexity"]) + ours["ln_ppl_ratio"]), rel=1e-9)
