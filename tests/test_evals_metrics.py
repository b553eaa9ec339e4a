"""Accuracy metrics, windows, gates and the runtime registry on small fixed inputs (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.accuracy import Reference, kl_divergence, log_softmax, make_windows, perplexity, token_nll, top1_agreement
from evals.gates import evaluate_gates
from pipeline.spec import GateSpec


def test_perplexity_by_hand():
    # Two positions, vocab 2: p(target) = 1/2 and 1/4 -> nll = ln2, ln4 -> ppl = exp(1.5 ln 2) = 2^1.5
    lp = np.log(np.array([[0.5, 0.5], [0.75, 0.25]]))
    nll = token_nll(lp, [0, 1])
    assert nll == pytest.approx([math.log(2), math.log(4)])
    assert perplexity(nll) == pytest.approx(2 ** 1.5)


def test_log_softmax_matches_definition():
    logits = np.array([[1.0, 2.0, 3.0]])
    expected = np.log(np.exp(logits) / np.exp(logits).sum())
    assert log_softmax(logits) == pytest.approx(expected)


def test_kl_and_top1_by_hand():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    kl = kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl[1] == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(q, p).tolist() == [False, True]


def test_topk_reference_is_a_lower_bound_and_exact_on_itself():
    rng = np.random.default_rng(0)
    p = log_softmax(rng.normal(size=(6, 50)) * 3)
    q = log_softmax(np.log(np.exp(p)) + rng.normal(size=(6, 50)))
    ref = Reference.build([p], vocab=50, k=5, full_limit=0)
    assert ref.mode == "top-k"
    kl_topk, agree = ref.compare(0, q)
    kl_full = kl_divergence(p, q)
    assert np.all(kl_topk <= kl_full + 1e-9)
    assert np.all(kl_topk > 0)
    assert agree.tolist() == top1_agreement(p, q).tolist()
    self_kl, self_agree = ref.compare(0, p)
    assert self_kl.max() == pytest.approx(0.0, abs=1e-6) and self_agree.all()


def test_full_reference_matches_exact_kl():
    rng = np.random.default_rng(1)
    p = log_softmax(rng.normal(size=(4, 30)))
    q = log_softmax(rng.normal(size=(4, 30)))
    ref = Reference.build([p], vocab=30)
    assert ref.mode == "full"
    kl, _ = ref.compare(0, q)
    assert kl == pytest.approx(kl_divergence(p, q), rel=1e-2, abs=1e-4)


def test_windows_score_second_half_like_llama_perplexity():
    w = make_windows(list(range(100)), context=16, max_windows=4, bos_id=7)
    assert len(w.windows) == 4 and w.stride == 16 and w.first == 8
    assert w.windows[1][0] == 7 and w.windows[1][1] == 17  # BOS replaces the first token
    assert w.targets(0) == list(range(9, 16))
    assert w.scored_tokens == 4 * 7
    with pytest.raises(ValueError):
        make_windows([1, 2, 3], context=16, max_windows=4)


def _ev(**metrics):
    return {"status": "done", "metrics": metrics}


def test_gates_pass_fail_pending_unverified():
    spec = GateSpec(max_perplexity_increase_pct=5.0, max_kl_divergence=0.1, min_top1_agreement_pct=90)
    ok = _ev(delta_ppl_pct=1.0, kl_mean=0.01, top1_agreement_pct=95)
    bad = _ev(delta_ppl_pct=12.0, kl_mean=0.01, top1_agreement_pct=95)
    assert evaluate_gates(spec, ["cpu"], {"cpu": ok})["status"] == "passed"
    g = evaluate_gates(spec, ["cpu"], {"cpu": bad})
    assert g["status"] == "failed" and g["passed"] is False
    failing = [c for c in g["checks"] if not c["passed"]]
    assert [(c["name"], c["device"], c["value"], c["threshold"]) for c in failing] == [("perplexity_increase_pct", "cpu", 12.0, 5.0)]
    g = evaluate_gates(spec, ["cpu", "h100"], {"cpu": ok, "h100": {"status": "pending"}})
    assert g["status"] == "pending" and g["pending_devices"] == ["h100"] and g["passed"] is None
    g = evaluate_gates(spec, ["cpu", "h100"], {"cpu": bad})  # a failure is final even with a device pending
    assert g["status"] == "failed" and g["pending_devices"] == ["h100"]
    g = evaluate_gates(spec, ["cpu"], {"cpu": {"status": "skipped", "reason": "no runtime"}})
    assert g["status"] == "unverified" and g["passed"] is None


def test_gate_speedup_and_missing_metric():
    spec = GateSpec(max_perplexity_increase_pct=None, min_decode_speedup=1.5)
    assert evaluate_gates(spec, ["cpu"], {"cpu": _ev(decode_speedup=2.0)})["passed"]
    g = evaluate_gates(spec, ["cpu"], {"cpu": _ev()})
    assert g["status"] == "failed" and "no decode_speedup" in g["checks"][0]["reason"]


def test_runtime_lookup_did_you_mean():
    from evals.runtimes import get_runtime, runtime_for
    from pipeline.errors import InvalidInput

    with pytest.raises(InvalidInput, match="did you mean 'llama_cpp'"):
        get_runtime("llama-cpp")
    assert get_runtime("transformers").name == "transformers"
    # ModelOpt checkpoints are never loaded by plain transformers: they get the dequantizing reader.
    assert runtime_for("tensorrt-checkpoint") == ("modelopt_dequant", None)
    name, why = runtime_for("onnx")
    assert name is None and "onnx" in why


def test_missing_runtime_is_a_skip_with_reason():
    from evals.runtimes import get_runtime

    # Neither vLLM nor TensorRT-LLM is installable on these machines.
    for name, dist in (("vllm", "vllm"), ("tensorrt_llm", "tensorrt-llm")):
        reason = get_runtime(name).unavailable("cpu")
        assert reason and (dist in reason or "CUDA" in reason)


def test_device_resolution_records_absent_devices_as_pending():
    from evals.devices import gpu_class, present_devices, resolve_devices
    from pipeline.errors import InvalidInput

    assert gpu_class("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_class("NVIDIA H200") == "h200"
    here = present_devices()
    assert "cpu" in here
    now, pending = resolve_devices("auto", ["cpu", "h9000"])
    assert now == ["cpu"] and pending == ["h9000"]
    with pytest.raises(InvalidInput, match="not present"):
        resolve_devices("h9000", ["cpu", "h9000"])


def test_task_accuracy_is_skipped_without_lm_eval(tmp_path):
    import importlib.util

    from evals.tasks import run_tasks

    res = run_tasks("gptq", tmp_path, "cpu", ["hellaswag"])
    if importlib.util.find_spec("lm_eval") is None:
        assert res == {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed"}
    res = run_tasks("gguf", tmp_path, "cpu", ["hellaswag"])
    assert res["status"] == "skipped" and res["reason"]
