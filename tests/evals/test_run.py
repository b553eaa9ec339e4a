"""`evals.run.evaluate` end to end on the mini model: reference, artifacts, gates, pending devices, cache.

The report is written by hand (as a build would) with two artifacts that transformers loads:
an exact copy of the source, and a copy with noise added to its weights.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest

from pipeline.core.report import ArtifactReport, Report, SourceReport, report_path, write_report
from pipeline.core.store import MANIFEST, Store

RECIPE = """
name: evtest
source: {{model: {source}}}
calibration: {{dataset: builtin}}
targets:
  - {{name: copy, kind: fp8}}
  - {{name: noisy, kind: fp8}}
evals:
  devices: [cpu, h100]
  context: 128
  max_windows: 6
  speed: {{prompt_lengths: [32], decode_tokens: 8, warmup: 1, min_iterations: 3, min_seconds: 0.2, threads: 1}}
gates: {{max_perplexity_increase_pct: 2.0, min_top1_agreement_pct: 95}}
"""


def _noisy_copy(src: Path, dst: Path, scale: float = 0.5) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    model.to(torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def _artifact(store: Store, name: str, folder: Path) -> ArtifactReport:
    """Put a folder into the store as a build stage would (manifest, content hash) and describe it."""
    entry = store.run_once("test-artifact", name * 8, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True) and None)
    return ArtifactReport(name=name, target=name, kind="fp8", status="built", path=str(entry.path),
                          bytes=entry.manifest["bytes"], content_sha256=entry.manifest["content_sha256"])


@pytest.fixture(scope="module")
def evaluated(mini_model, tmp_path_factory):
    from evals.run import evaluate
    from pipeline.validation import load_recipe

    work = tmp_path_factory.mktemp("evals")
    copy, noisy = work / "copy", work / "noisy"
    shutil.copytree(mini_model, copy)
    _noisy_copy(Path(mini_model), noisy)
    rfile = work / "recipe.yaml"
    rfile.write_text(RECIPE.format(source=mini_model))
    loaded = load_recipe(rfile, check_source=False)
    arts = work / "artifacts"
    rpath = report_path(arts, "evtest")
    rpath.parent.mkdir(parents=True)
    write_report(rpath, Report(recipe="evtest", source=SourceReport(model=str(mini_model), fingerprint="mini-test", path=str(mini_model)),
                               artifacts=[_artifact(Store(arts), "copy", copy), _artifact(Store(arts), "noisy", noisy)]))
    logs: list[str] = []
    first = evaluate(loaded, arts, device="auto", log=logs.append)
    first_log_lines = len(logs)
    t0 = time.perf_counter()
    second = evaluate(loaded, arts, device="auto", log=logs.append)
    return {"first": first, "second": second, "second_s": time.perf_counter() - t0, "logs": logs,
            "first_log_lines": first_log_lines, "loaded": loaded, "arts": arts, "rpath": rpath}


def test_source_against_itself_is_exact(evaluated):
    rep = evaluated["first"]
    base = rep.baseline["cpu"]
    assert base.status == "done", base
    assert base.accuracy["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert base.accuracy["top1_agreement_pct"] == 100.0
    copy = rep.artifact("copy").evals["cpu"]
    assert copy.status == "done", copy
    m = copy.metrics
    assert m.kl_mean == pytest.approx(0.0, abs=1e-4) and m.kl_p99 == pytest.approx(0.0, abs=1e-3)
    assert m.top1_agreement_pct == 100.0 and m.rms_dp_pct == pytest.approx(0.0, abs=0.1)
    assert m.delta_ppl_pct == pytest.approx(0.0, abs=1e-3) and m.ppl_ratio == pytest.approx(1.0, abs=1e-4)
    acc = copy.accuracy
    assert acc["windows"] == 6 and acc["context"] == 128 and acc["stride"] == 128
    assert acc["tokens_scored"] == 6 * (128 - 64 - 1)
    assert acc["kl_method"].startswith("full vocabulary")  # a 4096-token vocabulary: every probability kept
    assert 1.0 < base.metrics.perplexity < 4096


def test_damaged_artifact_fails_its_gate_and_is_not_recommended(evaluated):
    rep = evaluated["first"]
    noisy = rep.artifact("noisy")
    m = noisy.evals["cpu"].metrics
    assert m.delta_ppl_pct > 2.0 and m.kl_mean > 0.01 and m.top1_agreement_pct < 100
    # llama-perplexity's statistics hang together: ordered percentiles, ratio = exp(mean ln ratio).
    assert m.kl_median <= m.kl_p90 <= m.kl_p95 <= m.kl_p99 <= m.kl_p999 <= m.kl_max
    assert m.ppl_ratio == pytest.approx(1 + m.delta_ppl_pct / 100, rel=1e-6) and m.ppl_ratio_err > 0
    assert noisy.gates.status == "failed" and noisy.gates.passed is False
    failed = {c.name for c in noisy.gates.checks if not c.passed}
    assert "perplexity_increase_pct" in failed
    # Recommendations are per device: on cpu, the exact copy passes and the damaged one does not.
    rec = rep.recommendations["cpu"]
    assert rec.artifact == "copy" and "noisy" not in rec.reason.split(" Pareto front")[0]  # (the front lists every model on it)
    # The front: no listed model is both at least as small and at least as close to the source as another.
    points = {"source": (rep.baseline["cpu"].metrics.size_bytes, 0.0)}
    points.update({a.name: (a.evals["cpu"].metrics.size_bytes, a.evals["cpu"].metrics.kl_mean) for a in rep.built()})
    assert "source" in rec.pareto and set(rec.pareto) <= set(points)
    for a in rec.pareto:
        assert not any(points[b][0] <= points[a][0] and points[b][1] <= points[a][1] and points[b] != points[a] for b in points)

def test_absent_device_is_pending_not_failed(evaluated):
    rep = evaluated["first"]
    assert rep.devices["h100"].status == "pending"
    assert rep.devices["cpu"].status == "done" and rep.devices["cpu"].fingerprint_hash
    copy = rep.artifact("copy")
    assert copy.evals["h100"].status == "pending"
    assert copy.gates.status == "pending" and copy.gates.passed is None and not copy.gates.promotable
    assert copy.gates.pending_devices == ["h100"]
    assert all(c.passed for c in copy.gates.checks)


def test_speed_numbers_are_positive_finite_with_spread(evaluated):
    ev = evaluated["first"].artifact("copy").evals["cpu"]
    spd = ev.speed
    assert spd["status"] == "done" and spd["threads"] == 1
    run = spd["runs"][0]
    for metric in ("ttft_s", "prefill_tps", "decode_tps"):
        s = run[metric]
        assert s["n"] >= 3
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("median", "p25", "p75", "min", "max"))
        assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]
    assert spd["peak_rss_mib"] > 0 and spd["load_seconds"] > 0 and spd["artifact_bytes"] > 0
    assert spd["dequantized"] is False  # a plain bf16 folder: nothing to decompress
    assert ev.roofline["bandwidth_gbs"] > 0 and ev.roofline["pct"] > 0


def test_second_eval_is_served_from_the_store(evaluated):
    second = evaluated["second"]
    first = evaluated["first"]
    for a in second.built():
        assert a.evals["cpu"].stage_key == first.artifact(a.name).evals["cpu"].stage_key
        assert a.evals["cpu"].metrics == first.artifact(a.name).evals["cpu"].metrics
    # Nothing was measured the second time: every eval stage was a store hit.
    second_logs = evaluated["logs"][evaluated["first_log_lines"]:]
    assert not [line for line in second_logs if "running" in line], second_logs


def test_results_are_keyed_by_device_fingerprint(evaluated, monkeypatch):
    import pipeline.backends.devices as devices
    from evals.stages import eval_context, eval_stages
    from pipeline.core.runner import stage_keys
    from pipeline.core.store import Store

    loaded, report = evaluated["loaded"], evaluated["first"]
    here = stage_keys(eval_stages(eval_context(loaded, "cpu"), report))
    real = devices.fingerprint("cpu")
    monkeypatch.setattr(devices, "fingerprint", lambda d: {**real, "cpu_model": "another CPU"})
    there = stage_keys(eval_stages(eval_context(loaded, "cpu"), report))
    assert set(here) == set(there) and all(here[n] != there[n] for n in here)
    store = Store(evaluated["arts"])
    assert store.get("eval-source", there["eval/cpu/source"]) is None
    assert store.get("eval-source", here["eval/cpu/source"]) is not None


def test_an_artifact_changed_after_the_build_is_not_evaluated(evaluated, tmp_path):
    from evals.run import evaluate
    from pipeline.core.report import read_report

    arts = tmp_path / "artifacts"
    shutil.copytree(evaluated["arts"], arts)
    rpath = report_path(arts, "evtest")
    rep = read_report(rpath)
    for a in rep.artifacts:  # the copy's paths
        a.path = a.path.replace(str(evaluated["arts"]), str(arts))
    rep.source.path = evaluated["first"].source.path
    write_report(rpath, rep)
    folder = Path(rep.artifact("copy").path)
    victim = next(p for p in sorted(folder.iterdir()) if p.suffix == ".json" and p.name != MANIFEST)
    victim.write_text(victim.read_text() + " ")
    out = evaluate(evaluated["loaded"], arts, device="cpu", log=lambda m: None)
    ev = out.artifact("copy").evals["cpu"]
    assert ev.status == "failed" and "changed since" in ev.reason and victim.name in ev.reason
    assert out.artifact("noisy").evals["cpu"].status == "done"


def test_tables_and_plots(evaluated):
    from rich.console import Console

    from evals.present import render

    console = Console(record=True, width=220)
    render(evaluated["first"], console)
    text = console.export_text()
    assert "noisy" in text and "copy" in text and "failed" in text and "h100: pending" in text
    out = evaluated["rpath"].parent
    assert (out / "plots-cpu.png").stat().st_size > 1000 and not (out / "plots-h100.png").exists()  # h100 pending: no figure
