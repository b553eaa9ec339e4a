"""What the help texts and the Makefile print, and what they pass on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.mark.parametrize("command", ["validate", "schema", "plan", "build", "eval", "register", "pull", "run", "report"])
def test_help_shows_no_python_types(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "list[" not in result.output and "Path]" not in result.output


def test_exit_codes_are_in_the_help():
    out = runner.invoke(app, ["--help"]).output
    assert "4 the model hub could not be reached" in " ".join(out.split())


@needs_make
def test_make_help_expands_its_variables():
    out = subprocess.run(["make", "-s", "help", "QF_CACHE=/opt/qf-cache", "UI_PORT=5123"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "$(" not in out
    assert "/opt/qf-cache" in out and "http://127.0.0.1:5123" in out


@needs_make
@pytest.mark.parametrize("goal", ["run", "build", "plan"])
def test_make_passes_targets_on(goal):
    # -n prints the commands without running them (nor the setup they depend on).
    out = subprocess.run(["make", "-n", goal, "RECIPE=recipes/tiny.yaml", "TARGETS=fp8 gguf"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if f"quantforge {goal} recipes/tiny.yaml" in x)
    assert line.endswith("--target fp8 --target gguf")


def test_run_takes_targets():
    assert "--target" in runner.invoke(app, ["run", "--help"]).output


def test_eval_of_a_skipped_build_is_not_after_build(write_recipe, tmp_path):
    """A TensorRT engine that cannot be built here is not evaluated 'after build'."""
    path = write_recipe("""
name: trt
source: {model: builtin:tiny-llama-mini}
calibration: {dataset: builtin, samples: 4, seq_len: 64}
targets:
  - {name: trt, kind: tensorrt, quant: fp8}
evals: {devices: [cpu], context: 128}
""")
    result = runner.invoke(app, ["plan", str(path), "--json", "--artifacts-dir", str(tmp_path / "artifacts")])
    assert result.exit_code == 0, result.output
    rows = {r["stage"]: r for r in json.loads(result.output)}
    engine = rows.get("trt/engine")
    if engine is None or engine["status"] != "skip":
        pytest.skip("TensorRT-LLM can build engines here")
    assert rows["eval/cpu/trt-engine"]["status"] == "skip"
    assert rows["eval/cpu/trt-engine"]["reason"].startswith("its build is skipped (needs tensorrt-llm")
    assert rows["eval/cpu/trt"]["status"] == "after build"
