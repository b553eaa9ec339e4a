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
from pipeline.core.store import content_hash, file_table

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


def _artifact(name: str, path: Path) -> ArtifactReport:
    files = file_table(path)
    return ArtifactReport(name=name, target=name, kind="fp8", status="built", path=str(path),
                          bytes=sum(f["bytes"] for f in files), content_sha256=content_hash(files))


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
                               artifacts=[_artifact("copy", copy), _artifact("noisy", noisy)]))
    logs: list[str] = []
    first = evaluate(loaded, arts, device="auto", log=logs.append)
    t0 = time.perf_counter()
    second = evaluate(loaded, arts, device="auto", log=logs.append)
    return {"first": first, "second": second, "second_s": time.perf_counter() - t0, "logs": logs,
            "loaded": loaded, "arts": arts, "rpath": rpath}


def test_source_against_itself_is_exact(evaluated):
    rep = evaluated["first"]
    base = rep.baseline["cpu"]
    assert base["status"] == "done", base
    assert base["accuracy"]["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert base["accuracy"]["top1_agreement_pct"] == 100.0
    copy = rep.artifact("copy").evals["cpu"]
    assert copy["status"] == "done", copy
    assert copy["metrics"]["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert copy["metrics"]["top1_agreement_pct"] == 100.0
    assert copy["metrics"]["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-3)
    acc = copy["accuracy"]
    assert acc["windows"] == 6 and acc["context"] == 128 and acc["stride"] == 128
    assert acc["tokens_scored"] == 6 * (128 - 64 - 1)
    assert 1.0 < base["metrics"]["perplexity"] < 4096


def test_damaged_artifact_fails_its_gate(evaluated):
    rep = evaluated["first"]
    noisy = rep.artifact("noisy")
    m = noisy.evals["cpu"]["metrics"]
    assert m["delta_ppl_pct"] > 2.0 and m["kl_mean"] > 0.01 and m["top1_agreement_pct"] < 100
    assert noisy.gates["status"] == "failed" and noisy.gates["passed"] is False
    failed = {c["name"] for c in noisy.gates["checks"] if not c["passed"]}
    assert "perplexity_increase_pct" in failed


def test_absent_device_is_pending_not_failed(evaluated):
    rep = evaluated["first"]
    assert rep.devices["h100"]["status"] == "pending"
    assert rep.devices["cpu"]["status"] == "done" and rep.devices["cpu"]["fingerprint_hash"]
    copy = rep.artifact("copy")
    assert copy.evals["h100"] == {"status": "pending"}
    assert copy.gates["status"] == "pending" and copy.gates["passed"] is None
    assert copy.gates["pending_devices"] == ["h100"]
    assert all(c["passed"] for c in copy.gates["checks"])


def test_speed_numbers_are_positive_finite_with_spread(evaluated):
    spd = evaluated["first"].artifact("copy").evals["cpu"]["speed"]
    assert spd["status"] == "done" and spd["threads"] == 1
    run = spd["runs"][0]
    for metric in ("ttft_s", "prefill_tps", "decode_tps"):
        s = run[metric]
        assert s["n"] >= 3
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("median", "p25", "p75", "min", "max"))
        assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]
    assert spd["peak_rss_mib"] > 0 and spd["load_seconds"] > 0 and spd["artifact_bytes"] > 0
    assert spd["dequantized"] is False  # a plain bf16 folder: nothing to decompress
    roof = evaluated["first"].artifact("copy").evals["cpu"]["roofline"]
    assert roof["bandwidth_gbs"] > 0 and roof["pct"] > 0


def test_second_eval_is_served_from_the_store(evaluated):
    second = evaluated["second"]
    for ev in [second.baseline["cpu"]] + [a.evals["cpu"] for a in second.artifacts]:
        assert ev["accuracy"]["cached"] is True and ev["speed"]["cached"] is True
    assert second.artifact("noisy").evals["cpu"]["metrics"] == evaluated["first"].artifact("noisy").evals["cpu"]["metrics"]


def test_results_are_keyed_by_device_fingerprint(evaluated, monkeypatch):
    import evals.devices as devices
    from evals.run import DeviceEval
    from evals.suites import load_suite

    loaded = evaluated["loaded"]
    suite = load_suite("builtin", base_dir=loaded.path.parent)
    src = Path(evaluated["first"].source.path)
    a = DeviceEval(loaded, evaluated["arts"], "cpu", src, "mini-test", suite, print)
    real = devices.fingerprint("cpu")
    monkeypatch.setattr(devices, "fingerprint", lambda d: {**real, "cpu_model": "another CPU"})
    b = DeviceEval(loaded, evaluated["arts"], "cpu", src, "mini-test", suite, print)
    try:
        assert a.fp_hash != b.fp_hash and a.reference_key != b.reference_key
        assert b.store.get("eval-reference", b.reference_key) is None
    finally:
        a.close()
        b.close()


def test_tables_and_plots(evaluated):
    from rich.console import Console

    from evals.present import render

    console = Console(record=True, width=220)
    render(evaluated["first"], console)
    text = console.export_text()
    assert "noisy" in text and "copy" in text and "failed" in text and "h100: pending" in text
    out = evaluated["rpath"].parent
    assert (out / "quality_vs_size.png").stat().st_size > 1000
    assert (out / "decode_vs_size.png").stat().st_size > 1000
