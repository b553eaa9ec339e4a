"""GGUF accuracy through the llama_cpp binding against the transformers reference (skipped without llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.backends import llamacpp

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


def test_gguf_worker_keeps_llama_cpp_alone(f32_gguf, reference, heldout_text, tmp_path):
    """A GGUF eval worker measures speed, accuracy and tasks, and no process holding llama.cpp
    ever loads torch, transformers, pyarrow, pandas or datasets: a CUDA build of llama.cpp
    aborted beside each of them (H200). Tasks run lm-eval in a child, the model in a scorer."""
    from evals.tasks import TASKS_DIR
    from pipeline.core.proc import call

    ref, d = reference
    text = tmp_path / "suite.txt"
    text.write_text(heldout_text, encoding="utf-8")
    job = {"runtime": "llama_cpp", "path": str(f32_gguf), "device": "cpu", "threads": 1,
           "speed": {"prompt_lengths": [16], "decode_tokens": 4, "batch_sizes": [1], "warmup": 0,
                     "min_iterations": 1, "min_seconds": 0},
           "accuracy": {"context": 128, "max_windows": 4, "text": str(text), "ids": str(d / "ids.npy"),
                        "bos": ref["bos_id"], "reference": str(d / "reference.npz")},
           "tasks": {"names": ["kjv_word4"], "limit": 8, "include": [str(TASKS_DIR)]}}
    out = call("evals.worker", job, what="the llama_cpp worker", timeout=600)
    assert {part: out[part]["status"] for part in ("speed", "accuracy", "tasks")} == dict.fromkeys(("speed", "accuracy", "tasks"), "done"), out
    assert out["accuracy"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    assert out["modules_beside_llama_cpp"] == []  # the worker: speed and accuracy
    assert out["tasks"]["modules_beside_llama_cpp"] == []  # the scorer that served lm-eval
    assert out["tasks"]["scores"]["kjv_word4"]["samples"] == 8
    native = out["tasks"]["lm_eval"]  # lm-eval's own results block, written beside report.json by the eval
    assert native["results"]["kjv_word4"]["acc,none"] == out["tasks"]["scores"]["kjv_word4"]["value"]
    assert native["n-samples"]["kjv_word4"]["effective"] == 8


def test_a_process_holding_llama_cpp_refuses_what_cannot_share_it():
    """The guard behind the test above: after isolate(), importing pyarrow (or torch, pandas,
    datasets, transformers) is an ImportError that says why, and loading llama.cpp after numpy
    is refused before it could crash."""
    import subprocess
    import sys

    probe = ("from pipeline.backends.llamacpp import isolate\nisolate()\n"
             "for m in ('pyarrow', 'pandas', 'datasets', 'torch', 'transformers'):\n"
             "    try:\n        __import__(m)\n    except ImportError as e:\n        print(m, 'refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = [line.split()[0] for line in proc.stdout.splitlines() if "refused: " in line]
    assert refused == ["pyarrow", "pandas", "datasets", "torch", "transformers"], proc.stdout
    assert "cannot share a process with it" in proc.stdout
    late = subprocess.run([sys.executable, "-c", "import numpy\nfrom pipeline.backends.llamacpp import isolate\nisolate()"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert late.returncode != 0 and "numpy already loaded: llama.cpp must be the first library" in late.stderr
