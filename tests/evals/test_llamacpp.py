"""GGUF accuracy through the llama_cpp binding against the transformers reference (skipped without llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.targets.gguf import llamacpp

pytestmark = pytest.mark.skipif(llamacpp.missing(["llama-perplexity"]) is not None, reason=str(llamacpp.missing(["llama-perplexity"])))


@pytest.fixture(scope="module")
def f32_gguf(mini_model, tmp_path_factory) -> Path:
    from pipeline.targets.gguf.convert import convert

    out = tmp_path_factory.mktemp("gguf")
    # The demo tokenizer is a byte-level BPE with GPT-2's regex: llama.cpp's gpt-2 pre-tokenizer.
    convert(Path(mini_model), out / "model-F32.gguf", "f32", log=lambda m: None, pre_tokenizer="gpt-2")
    return out


@pytest.fixture(scope="module")
def reference(mini_model, heldout_text, tmp_path_factory):
    from evals.accuracy import run_accuracy

    d = tmp_path_factory.mktemp("ref")
    res = run_accuracy("transformers", Path(mini_model), "cpu", 1, None, heldout_text, 128, 4, None, None, d / "reference.npz")
    assert res["status"] == "done", res
    return res, d


def test_f32_gguf_matches_transformers(f32_gguf, reference, heldout_text):
    from evals.accuracy import run_accuracy

    ref, d = reference
    ids = np.load(d / "ids.npy").tolist()
    res = run_accuracy("llama_cpp", f32_gguf, "cpu", 1, ids, heldout_text, 128, 4, ref["bos_id"], d / "reference.npz", None)
    assert res["status"] == "done", res
    assert res["tokens_scored"] == ref["tokens_scored"]
    assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    assert res["kl_mean"] < 1e-3 and res["top1_agreement_pct"] > 95
    assert res["dequantized"] is False


def test_different_tokenization_is_refused(f32_gguf, reference, heldout_text):
    from evals.accuracy import run_accuracy

    ref, d = reference
    ids = np.load(d / "ids.npy").tolist()
    ids[10] = (ids[10] + 1) % 4096  # as if the source tokenizer had split the text differently
    res = run_accuracy("llama_cpp", f32_gguf, "cpu", 1, ids, heldout_text, 128, 4, ref["bos_id"], d / "reference.npz", None)
    assert res["status"] == "failed"
    assert "tokenizes the suite text differently" in res["reason"] and "token 10" in res["reason"]
