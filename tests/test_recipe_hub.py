"""Hub sources checked before any download: `validate` reads the model's config.json alone.

No network: config.json files are written by transformers into an offline hub cache
(tests/hub_cache.py); an empty offline cache is the unreachable hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.errors import EXIT_HUB_UNREACHABLE, EXIT_INVALID_INPUT
from tests.hub_cache import hub_cache, write_hub_config  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
# A SmolLM2-135M-shaped model: 9 heads, widths 576/1536, 8192 positions.
SMOL = "acme/smol-9-heads"
SMOL_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMOL_SHAPE = dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=8192, vocab_size=1024, architectures=["LlamaForCausalLM"])

IMPOSSIBLE = f"""
name: hub-impossible
source: {{model: {SMOL}, revision: {SMOL_COMMIT}}}
calibration: {{dataset: builtin, samples: 4, seq_len: 64}}
targets:
  - {{name: g, kind: gptq, group_size: 100}}
  - {{name: t, kind: tensorrt, quant: fp8, tp_size: 2, output: checkpoint}}
evals: {{devices: [cpu], context: 100000}}
"""


def test_impossible_hub_settings_fail_before_download(hub_cache, write_recipe):
    """group size 100, tp 2 on 9 heads, context 100000: all caught from config.json alone."""
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    path = write_recipe(IMPOSSIBLE)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID_INPUT, result.output
    out = result.output
    assert re.search(r"recipe\.yaml:6: targets\.0\.group_size: group size 100 does not divide .*input width 576", out)
    assert "targets.1: tp_size 2 does not divide num_attention_heads 9" in out
    assert "evals.context: context 100000 exceeds the model's 8192 positions" in out
    # Nothing was downloaded: the cache still holds config.json files alone.
    assert {p.name for p in hub_cache.rglob("*") if p.is_file() and "snapshots" in p.parts} == {"config.json"}


def test_a_branch_revision_reads_the_cached_ref(hub_cache, write_recipe):
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    path = write_recipe(IMPOSSIBLE.replace(f"revision: {SMOL_COMMIT}", "revision: main"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "tp_size 2 does not divide num_attention_heads 9" in result.output


def test_a_fitting_hub_recipe_passes(hub_cache, write_recipe):
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    path = write_recipe(IMPOSSIBLE.replace("group_size: 100", "group_size: 64").replace("tp_size: 2", "tp_size: 3")
                        .replace("context: 100000", "context: 4096"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def test_unreachable_hub_names_the_skipped_checks_and_exits_4(hub_cache, write_recipe):
    """Not in the cache and offline: not 'ok', not 'invalid input' either."""
    path = write_recipe(IMPOSSIBLE)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_HUB_UNREACHABLE == 4, result.output
    assert "invalid input" not in result.output
    assert "skipped: " in result.output and f"config.json of {SMOL}@{SMOL_COMMIT}" in result.output
    for check in ("targets.0.group_size 100 against the layer widths", "targets.1 tp_size/pp_size against heads",
                  "evals.context", "against max_position_embeddings"):
        assert check in result.output
    data = json.loads(runner.invoke(app, ["validate", str(path), "--json"]).output)
    assert data["ok"] is True and data["complete"] is False and data["recipes"][0]["skipped"]
    # A problem found elsewhere still makes it invalid input (2), with the skip not hiding it.
    bad = write_recipe(IMPOSSIBLE.replace("devices: [cpu]", "devices: [cpu, tpu]"), name="bad.yaml")
    assert runner.invoke(app, ["validate", str(bad)]).exit_code == EXIT_INVALID_INPUT
    # Several files: the invalid one decides the exit code; the other's skipped checks are still named.
    both = runner.invoke(app, ["validate", str(path), str(bad)])
    assert both.exit_code == EXIT_INVALID_INPUT
    assert "evals.devices.1: device 'tpu'" in both.output and f"skipped: {path}: " in both.output


def test_hub_checks_run_even_when_the_schema_check_fails(hub_cache, write_recipe):
    """A bad gate value and a bad target do not hide the group size the model cannot take."""
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    path = write_recipe(IMPOSSIBLE.replace("evals: {devices: [cpu], context: 100000}",
                                           "  - {name: x, kind: gguf, quants: [Q4_K_N]}\n"
                                           "evals: {devices: [cpu], context: 100000}\ngates: {max_kl_divergence: -1}"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID_INPUT
    out = result.output
    assert "gates.max_kl_divergence" in out and "targets.2.quants" in out  # the schema's problems
    assert "targets.0.group_size: group size 100 does not divide" in out  # and the model's
    assert "targets.1: tp_size 2 does not divide num_attention_heads 9" in out
    assert "evals.context: context 100000 exceeds" in out


def test_a_bad_section_is_not_checked_as_its_default(hub_cache, write_recipe):
    """A calibration section with a bad value is not 'missing': no 'needs calibration data' for it."""
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    path = write_recipe(IMPOSSIBLE.replace("samples: 4", "samples: 0"))
    result = runner.invoke(app, ["validate", str(path)])
    assert "calibration.samples" in result.output
    assert "needs calibration data" not in result.output
    assert "group size 100 does not divide" in result.output


STARTER = REPO / "recipes" / "starters" / "qwen2.5-7b-cuda.yaml"


def test_starter_8b_recipe_validates_and_plans_from_config_json(hub_cache, tmp_path):
    """The real-model starter: checked against Qwen2.5-7B-Instruct's shape, planned at its pinned commit."""
    result = runner.invoke(app, ["validate", str(STARTER)])
    assert result.exit_code == 0, result.output
    # Its eval text (WikiText-2 from the hub) is hashed into the GGUF and ModelOpt stage keys, so
    # planning needs it: offline that is "hub unreachable" (4), not invalid input.
    artifacts = tmp_path / "artifacts"
    result = runner.invoke(app, ["plan", str(STARTER), "--artifacts-dir", str(artifacts)])
    assert result.exit_code == EXIT_HUB_UNREACHABLE, result.output
    assert "evals.suite: cannot reach the hub for dataset 'wikitext:wikitext-2-raw-v1'" in result.output
    # With local eval text in its place, the rest of the recipe plans as it is.
    text = tmp_path / "heldout.txt"
    text.write_text("Held-out text for the plan's tokenizer checks.\n\nA second paragraph.\n")
    local = tmp_path / "starter.yaml"
    local.write_text(STARTER.read_text().replace("suite: wikitext2", f"suite: {text}"))
    result = runner.invoke(app, ["plan", str(local), "--json", "--artifacts-dir", str(artifacts)])
    assert result.exit_code == 0, result.output
    rows = {r["stage"]: r for r in json.loads(result.output)}
    assert rows["source"]["kind"] == "source-hub" and "a09a35458c70" in rows["source"]["what"]
    assert {"calibration", "w4a16-gptq/quantize", "w4a16-awq/quantize", "fp8/quantize", "gguf/convert", "gguf/imatrix",
            "gguf/quantize/Q8_0", "gguf/quantize/Q4_K_M", "trt-fp8/checkpoint"} <= set(rows)
    assert all(r["status"] == "miss" for s, r in rows.items() if not s.startswith("eval"))
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    # The same recipe on a model whose widths 128 does not divide is refused, located.
    smol = tmp_path / "smol.yaml"
    smol.write_text(STARTER.read_text().replace("Qwen/Qwen2.5-7B-Instruct", SMOL)
                    .replace("a09a35458c702b33eeacc393d103063234e8bc28", SMOL_COMMIT))
    write_hub_config(hub_cache, SMOL, SMOL_COMMIT, **SMOL_SHAPE)
    result = runner.invoke(app, ["validate", str(smol)])
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "targets.0.group_size: group size 128 does not divide" in result.output
    assert "targets.1.group_size: group size 128 does not divide" in result.output


def test_plan_of_an_unpinned_hub_model_offline_exits_4(hub_cache, write_recipe, tmp_path):
    """A branch name needs the hub to become a commit: unreachable is 4, and nothing is written."""
    path = write_recipe(IMPOSSIBLE.replace(f"revision: {SMOL_COMMIT}", "revision: main"))
    artifacts = tmp_path / "artifacts"
    result = runner.invoke(app, ["plan", str(path), "--artifacts-dir", str(artifacts)])
    assert result.exit_code == EXIT_HUB_UNREACHABLE, result.output
    assert f"cannot resolve hub model '{SMOL}' at revision 'main'" in result.output
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
