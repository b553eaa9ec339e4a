"""Bits per weight, counted from artifacts the real build makes (GPTQ, AWQ, GGUF, ModelOpt) on the
trained mini model, and written into report.json by the real build job.

Expected values come from each format's definition (stored bits per group or block), never from
an earlier run: W4A16 symmetric group g stores 4 bits plus a 16-bit scale per g weights; asymmetric
adds a 4-bit zero point per group; GGUF Q8_0 stores 32 int8 weights with one fp16 scale (34 bytes
per 32 weights). The build is cached under .pytest_cache (first run about a minute).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from tests.conftest import CACHE_ARTIFACTS

RECIPE = """\
name: bitsmini
source: {model: builtin:tiny-llama-mini, dtype: bfloat16}
calibration: {dataset: builtin, samples: 8, seq_len: 128}
targets:
  - {name: gptq-g64, kind: gptq, bits: 4, group_size: 64}
  - {name: awq-g32, kind: awq, bits: 4, group_size: 32, n_grid: 4}
  - {name: gguf, kind: gguf, quants: [Q8_0, Q4_K_M], pre_tokenizer: gpt-2}
  - {name: mo-int4, kind: tensorrt, quant: int4_awq, output: checkpoint}
evals: {devices: [cpu], max_windows: 2, context: 128}
"""


@pytest.fixture(scope="module")
def built(mini_model):
    """report.json of the bits recipe after the real build job (cached in the store)."""
    from pipeline.build import build
    from pipeline.core.report import read_report, report_path
    from pipeline.validation import load_recipe

    CACHE_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    recipe = CACHE_ARTIFACTS.parent / "bitsmini.yaml"
    with open(CACHE_ARTIFACTS / ".bitsmini.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recipe.write_text(RECIPE)
        build(load_recipe(recipe), CACHE_ARTIFACTS, log=lambda _m: None)
        report = read_report(report_path(CACHE_ARTIFACTS, "bitsmini"))
    assert {a.name for a in report.built()} == {"gptq-g64", "awq-g32", "gguf-Q8_0", "gguf-Q4_K_M", "mo-int4"}, \
        [(a.name, a.status, a.reason) for a in report.artifacts]
    return report


@pytest.mark.slow
def test_every_artifact_states_its_bits_in_the_report(built):
    src = built.source
    assert src.bpw_linear == 16.0 and src.bpw_model == 16.0  # a bfloat16 folder
    counts = {a.name: a.bpw_detail for a in built.built()}
    # The same model, whatever the format: every count finds the same parameters as the source's.
    for name, d in counts.items():
        assert d["linear_params"] == src.bpw_detail["linear_params"], name
        assert d["model_params"] == src.bpw_detail["model_params"], name
    assert 0 < src.bpw_detail["linear_params"] < src.bpw_detail["model_params"]
    for a in built.built():
        assert a.bpw_linear is not None and a.bpw_model is not None, a.name
        assert a.bpw_linear < a.bpw_model or a.kind == "gguf", a.name  # 16-bit embeddings raise the whole-model figure
    # report.json itself carries the names other tools read
    raw = json.loads((CACHE_ARTIFACTS / "bitsmini" / "report.json").read_text())
    assert all({"bpw_linear", "bpw_model"} <= set(a) for a in raw["artifacts"] if a["status"] == "built")


@pytest.mark.slow
def test_bits_follow_each_formats_definition(built):
    bpw = {a.name: a for a in built.built()}
    n_lin = built.source.bpw_detail["linear_params"]
    # GPTQ W4 symmetric g64: 4 + 16/64 bits, plus the 2 x int64 weight_shape of each packed layer
    gptq = bpw["gptq-g64"]
    shape_bits = 7 * 2 * 64 * 2 / n_lin  # 7 linear layers per block, 2 blocks
    assert gptq.bpw_linear == pytest.approx(4 + 16 / 64 + shape_bits, abs=1e-3)
    # AWQ W4 asymmetric g32: 4 + 16/32 (scale) + 4/32 (packed zero point)
    assert bpw["awq-g32"].bpw_linear == pytest.approx(4 + 16 / 32 + 4 / 32 + shape_bits, abs=1e-3)
    # GGUF Q8_0: 34 bytes per block of 32 on every linear layer
    assert bpw["gguf-Q8_0"].bpw_linear == 8.5
    assert 4.5 <= bpw["gguf-Q4_K_M"].bpw_linear < 6.6  # Q4_K (4.5) mixed with Q6_K (6.5625) rows
    # ModelOpt INT4-AWQ, 128-column blocks: two weights per byte + a 16-bit scale per 128 (+ its AWQ scales)
    assert 4 + 16 / 128 <= bpw["mo-int4"].bpw_linear < 4.4
    assert bpw["mo-int4"].bpw_detail["counted_from"].startswith("safetensors headers (ModelOpt")


@pytest.mark.slow
def test_counts_match_the_tensors_that_the_library_reads(built):
    """The byte ranges counted from the safetensors header are the tensors safetensors itself loads."""
    from safetensors import safe_open

    from evals.bits import safetensors_bits

    folder = Path(built.artifact("gptq-g64").path)
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
    assert safetensors_bits(folder).model_bytes == total


def test_a_folder_without_weights_says_why(tmp_path):
    from evals.bits import BitsError, bits_fields, count_bits

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BitsError, match="neither a GGUF file nor a folder of safetensors"):
        count_bits(tmp_path)
    assert "error" in bits_fields(tmp_path)["bpw_detail"]
    assert bits_fields(tmp_path / "missing") == {}
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(BitsError, match="too short"):
        count_bits(tmp_path)
