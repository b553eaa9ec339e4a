"""Accuracy metrics, windows, gates and the runtime registry on small fixed inputs (no model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evals.accuracy import Reference, kl_divergence, log_softmax, make_windows, perplexity, token_nll, top1_agreement
from evals.policy import evaluate_gates, failed_checks
from pipeline.core.report import EvalEntry, Metrics
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
    return EvalEntry(status="done", metrics=Metrics(**metrics))


def test_gates_pass_fail_pending_unverified():
    spec = GateSpec(max_perplexity_increase_pct=5.0, max_kl_divergence=0.1, min_top1_agreement_pct=90)
    ok = _ev(delta_ppl_pct=1.0, kl_mean=0.01, top1_agreement_pct=95)
    bad = _ev(delta_ppl_pct=12.0, kl_mean=0.01, top1_agreement_pct=95)
    assert evaluate_gates(spec, ["cpu"], {"cpu": ok}).status == "passed"
    g = evaluate_gates(spec, ["cpu"], {"cpu": bad})
    assert g.status == "failed" and g.passed is False and g.per_device() == {"cpu": False}
    failing = [c for c in g.checks if not c.passed]
    assert [(c.name, c.device, c.value, c.threshold) for c in failing] == [("perplexity_increase_pct", "cpu", 12.0, 5.0)]
    assert failed_checks(g) == ["perplexity_increase_pct 12 > 5 on cpu"]
    g = evaluate_gates(spec, ["cpu", "h100"], {"cpu": ok, "h100": EvalEntry(status="pending")})
    assert g.status == "pending" and g.pending_devices == ["h100"] and g.passed is None and not g.promotable
    assert g.per_device() == {"cpu": True, "h100": None}
    g = evaluate_gates(spec, ["cpu", "h100"], {"cpu": bad})  # a failure is final even with a device pending
    assert g.status == "failed" and g.pending_devices == ["h100"]
    g = evaluate_gates(spec, ["cpu"], {"cpu": EvalEntry(status="skipped", reason="no runtime")})
    assert g.status == "unverified" and g.passed is None and g.per_device() == {"cpu": None}


def test_gate_speedup_kl_tail_task_recovery_and_missing_metric():
    spec = GateSpec(max_perplexity_increase_pct=None, min_decode_speedup=1.5)
    assert evaluate_gates(spec, ["cpu"], {"cpu": _ev(decode_speedup=2.0)}).passed
    g = evaluate_gates(spec, ["cpu"], {"cpu": _ev()})
    assert g.status == "failed" and "no decode_speedup" in g.checks[0].reason
    spec = GateSpec(max_perplexity_increase_pct=None, max_kl_p99=0.5, min_task_accuracy_recovery_pct=94)
    assert evaluate_gates(spec, ["cpu"], {"cpu": _ev(kl_p99=0.4, task_recovery_pct=96.0)}).passed
    g = evaluate_gates(spec, ["cpu"], {"cpu": _ev(kl_p99=0.6, task_recovery_pct=90.0)})
    assert sorted(c.name for c in g.checks if not c.passed) == ["kl_p99", "task_recovery_pct"]


def test_runtime_lookup_did_you_mean_and_choice_per_format_and_device():
    from evals.runtimes import RUNTIMES, get_runtime
    from evals.stages import choose_runtimes
    from pipeline.errors import InvalidInput
    from pipeline.targets import declarations

    with pytest.raises(InvalidInput, match="did you mean 'llama_cpp'"):
        get_runtime("llama-cpp")
    assert get_runtime("transformers").name == "transformers"
    # Every runtime a kind declares has an adapter (no declared runtime without code).
    for decl in declarations():
        for fmt in decl.formats:
            for names in fmt.eval_runtimes.values():
                assert set(names) <= set(RUNTIMES), (decl.kind, names)
    # ModelOpt checkpoints are never loaded by plain transformers: they get the dequantizing reader.
    assert choose_runtimes("tensorrt-checkpoint", "cpu").accuracy == "modelopt_dequant"
    assert choose_runtimes("gguf", "cpu").accuracy == "llama_cpp"
    assert choose_runtimes("gptq", "cpu").accuracy == choose_runtimes("gptq", "cpu").speed == "transformers"
    # An engine has no CPU runtime: a skip that says where it runs.
    engine = choose_runtimes("tensorrt-engine", "cpu")
    assert engine.accuracy is None and "cuda" in engine.skip_reason
    unknown = choose_runtimes("onnx", "cpu")
    assert unknown.skip_reason and "onnx" in unknown.skip_reason


def test_missing_runtime_is_a_skip_with_reason():
    from evals.runtimes import get_runtime

    # Neither vLLM nor TensorRT-LLM is installable on these machines.
    for name, dist in (("vllm", "vllm"), ("tensorrt_llm", "tensorrt-llm")):
        reason = get_runtime(name).unavailable("cpu")
        assert reason and (dist in reason or "CUDA" in reason)


def test_device_resolution_records_absent_devices_as_pending():
    from pipeline.backends.devices import gpu_class, present_devices, resolve_devices
    from pipeline.errors import InvalidInput

    assert gpu_class("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_class("NVIDIA H200") == "h200"
    here = present_devices()
    assert "cpu" in here
    absent = "gb300" if "gb300" not in here else "b100"  # known GPU classes, absent here
    now, pending = resolve_devices("auto", ["cpu", absent])
    assert now == ["cpu"] and pending == [absent]
    with pytest.raises(InvalidInput, match="not present"):
        resolve_devices(absent, ["cpu", absent])
    with pytest.raises(InvalidInput, match="h9000"):  # not a device name at all
        resolve_devices("h9000", ["cpu"])


def test_the_decode_ceiling_counts_the_stored_weights_a_token_reads(mini_model):
    """bandwidth / stored bytes per token: every stored tensor but the embedding table, which a
    token reads one row of, unless the model has no output matrix of its own (then it is that)."""
    from safetensors import safe_open

    from evals.roofline import roofline, stored_bytes_per_token

    sizes = {}
    for f in Path(mini_model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                sizes[name] = t.numel() * t.element_size()
    embedding = sum(n for k, n in sizes.items() if k.endswith("embed_tokens.weight"))
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    expected = sum(sizes.values()) - (0 if tied else embedding)
    assert stored_bytes_per_token(Path(mini_model)) == expected
    r = roofline(None, expected, 100.0)
    assert r["bound_tps"] == pytest.approx(100e9 / expected, rel=1e-3) and "pct" not in r
    assert roofline(r["bound_tps"] / 2, expected, 100.0)["pct"] == pytest.approx(50.0, abs=0.1)


def test_the_accelerator_probe_answers_once_without_torch():
    """One probe asks the NVIDIA driver (nvidia-smi, no torch): what it lists is what llama.cpp's build
    choice and the TensorRT engine checks see; without a driver it lists nothing, and nothing breaks."""
    import shutil
    import subprocess
    import sys

    from pipeline.backends import devices, llamacpp

    gpus = devices.nvidia_gpus()
    assert llamacpp._nvidia_gpu_present() == bool(gpus)
    if shutil.which("nvidia-smi") is None:
        assert gpus == () and devices.nvidia_smi("-L") is None
    else:
        assert all(g["name"] and g["capability"] for g in gpus)
    code = "import sys\nfrom pipeline.backends import devices\ndevices.nvidia_gpus()\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr
