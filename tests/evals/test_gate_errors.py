"""Error bars in gates: a verdict is clear when the threshold lies outside value ± GATE_Z standard
errors, marginal when inside. On the real mini report's measured values and errors
(tests/registry/conftest.py::real_report); thresholds are placed relative to what was measured."""

from __future__ import annotations

import pytest

from pipeline.core.report import EvalEntry, GateCheck
from pipeline.recipe import GateSpec
from tests.registry.conftest import real_report  # noqa: F401 - the fixture


def test_errors_come_from_the_accuracy_record(real_report):  # noqa: F811
    from evals.policy import derive_metrics

    r = real_report.model_copy(deep=True)
    for a in r.built():
        a.evals["cpu"].metrics.delta_ppl_pct_err = a.evals["cpu"].metrics.kl_mean_err = a.evals["cpu"].metrics.bpw_linear = None
    derive_metrics(r)
    for a in r.built():
        ev: EvalEntry = a.evals["cpu"]
        assert ev.metrics.delta_ppl_pct_err == pytest.approx(100 * ev.accuracy["ppl_ratio_err"])
        assert ev.metrics.kl_mean_err == ev.accuracy["kl_mean_err"] > 0
        assert ev.metrics.bpw_linear == a.bpw_linear is not None  # so MLflow logs cpu.bpw_linear


def test_clear_and_marginal_verdicts(real_report):  # noqa: F811
    from evals.policy import GATE_Z, describe_check, evaluate_gates, marginal

    a = real_report.artifact("fp8")
    m = a.evals["cpu"].metrics
    v, e = m.kl_mean, m.kl_mean_err
    cases = {  # threshold -> (passed, clear)
        v + 3 * GATE_Z * e: (True, True),
        v + 0.5 * GATE_Z * e: (True, False),
        v - 0.5 * GATE_Z * e: (False, False),
        v - 3 * GATE_Z * e: (False, True),
    }
    for threshold, (passed, clear) in cases.items():
        g = evaluate_gates(GateSpec(max_kl_divergence=threshold), ["cpu"], a.evals)
        (check,) = [c for c in g.checks if c.name == "kl_mean"]
        assert (check.passed, check.clear) == (passed, clear), threshold
        assert (check in marginal(g, "cpu")) is (not clear)
        text = describe_check(check)
        assert ("marginal" in text) is (not clear) and ("clear of the threshold" in text) is clear
        assert f"± {check.err:.3g}" in text
    # A measure without an error (top-1 agreement) says nothing about clearance.
    g = evaluate_gates(GateSpec(min_top1_agreement_pct=50.0), ["cpu"], a.evals)
    assert [c.clear for c in g.checks if c.name == "top1_agreement_pct"] == [None]


def test_gate_check_round_trips_through_json():
    c = GateCheck(name="kl_mean", device="cpu", value=0.1, threshold=0.2, passed=True, err=0.01, clear=True)
    assert GateCheck.model_validate_json(c.model_dump_json()) == c


def test_speed_gate_compares_within_one_runtime(real_report):  # noqa: F811
    """fp8 runs in transformers like the source: its speed-up is compared. The GGUF runs in llama.cpp:
    no speed-up against transformers, so a speed gate leaves it unverified instead of passing it."""
    from evals.policy import derive_metrics, evaluate_gates

    r = real_report.model_copy(deep=True)
    derive_metrics(r)
    fp8, gguf = r.artifact("fp8").evals["cpu"], r.artifact("gguf-Q8_0").evals["cpu"]
    assert fp8.speedup_basis == "within transformers" and fp8.metrics.decode_speedup == pytest.approx(
        fp8.metrics.decode_tps / r.baseline["cpu"].metrics.decode_tps)
    assert gguf.metrics.decode_speedup is None and gguf.speedup_basis.startswith("not comparable: measured in llama.cpp")
    spec = GateSpec(max_perplexity_increase_pct=None, max_kl_divergence=None, min_decode_speedup=0.01)
    assert evaluate_gates(spec, ["cpu"], {"cpu": fp8}).status == "passed"
    g = evaluate_gates(spec, ["cpu"], {"cpu": gguf})
    assert g.status == "unverified" and g.passed is None and g.per_device() == {"cpu": None}
    assert "llama.cpp" in g.checks[0].reason and g.checks[0].comparable is False
