"""The whole command line on a small real model: run, plan, a cached re-run, partial builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.report import read_report, report_path

runner = CliRunner()


@pytest.fixture
def flow(tmp_path, mini_model):
    recipe = tmp_path / "flow.yaml"
    recipe.write_text(
        f"""
name: flow
source: {{model: {mini_model}, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 8, seq_len: 128}}
targets:
  - {{name: fp8, kind: fp8, scheme: dynamic}}
  - {{name: gguf, kind: gguf, quants: [Q8_0], pre_tokenizer: gpt-2}}
evals:
  devices: [cpu]
  context: 128
  max_windows: 2
  speed: {{prompt_lengths: [32], decode_tokens: 8, warmup: 0, min_iterations: 1, min_seconds: 0}}
gates: {{max_perplexity_increase_pct: 5.0}}
registry: {{model_name: flow}}
"""
    )
    artifacts = tmp_path / "artifacts"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return recipe, artifacts, uri


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_run_then_cached_rerun(flow):
    recipe, artifacts, uri = flow
    first = invoke("run", recipe, "--artifacts-dir", artifacts, "--tracking-uri", uri)
    assert first.exit_code == 0, first.output
    report = read_report(report_path(artifacts, "flow"))
    built = {a.name: a for a in report.artifacts}
    assert set(built) == {"fp8", "gguf-Q8_0"}
    for a in built.values():
        assert a.status == "built" and a.bytes > 0 and len(a.content_sha256) == 64
        assert a.evals["cpu"].status == "done"
        assert a.gates.passed is True
        assert a.registry.version == "1"
    assert report.baseline["cpu"].metrics.perplexity > 1
    assert report.source.fingerprint and report.recipe_config["name"] == "flow"
    assert "build: flow" in first.output and "flow on cpu" in first.output

    plan = invoke("plan", recipe, "--artifacts-dir", artifacts)
    assert plan.exit_code == 0
    assert "miss" not in plan.output and "stages cached" in plan.output

    second = invoke("run", recipe, "--artifacts-dir", artifacts, "--tracking-uri", uri)
    assert second.exit_code == 0, second.output
    again = read_report(report_path(artifacts, "flow"))
    assert {s.status for s in again.stages} <= {"hit", "skipped"}
    assert [a.registry.version for a in again.artifacts] == ["1", "1"], "an unchanged recipe adds no versions"
    assert all(a.content_sha256 == built[a.name].content_sha256 for a in again.artifacts)
    assert all(a.evals["cpu"].stage_key == built[a.name].evals["cpu"].stage_key for a in again.artifacts)
    assert "running" not in second.output, "every build and eval stage comes from the store"


def test_build_one_target_and_bad_target(flow):
    recipe, artifacts, _ = flow
    only = invoke("build", recipe, "--target", "fp8", "--artifacts-dir", artifacts)
    assert only.exit_code == 0, only.output
    report = read_report(report_path(artifacts, "flow"))
    assert [a.name for a in report.artifacts] == ["fp8"]
    assert not (artifacts / "store" / "gguf-convert").exists()

    bad = invoke("build", recipe, "--target", "fp9", "--artifacts-dir", artifacts)
    assert bad.exit_code == 2
    assert "unknown target(s) fp9" in bad.output


def test_eval_before_build_is_a_clear_error(flow):
    recipe, artifacts, _ = flow
    result = invoke("eval", recipe, "--artifacts-dir", artifacts)
    assert result.exit_code == 2
    assert "quantforge build" in result.output


def test_register_with_unreachable_server_exits_1_and_keeps_results(flow):
    recipe, artifacts, _ = flow
    assert invoke("build", recipe, "--target", "fp8", "--artifacts-dir", artifacts).exit_code == 0
    result = invoke("register", recipe, "--artifacts-dir", artifacts, "--tracking-uri", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "quantforge register" in result.output
    assert json.loads(report_path(artifacts, "flow").read_text())["artifacts"][0]["status"] == "built"


def test_eval_refuses_a_different_source_model(flow):
    """An eval runner whose source model differs from the build's must not compare against it."""
    from pipeline.core.report import updating

    recipe, artifacts, _ = flow
    assert invoke("build", recipe, "--target", "fp8", "--artifacts-dir", artifacts).exit_code == 0
    path = report_path(artifacts, "flow")
    with updating(path, "flow") as report:
        report.source.fingerprint = "0" * 64  # as if the artifacts came from another model
        report.source.path = None  # and this runner had to make the source itself
    result = invoke("eval", recipe, "--artifacts-dir", artifacts)
    assert result.exit_code == 1
    assert "is not the one the artifacts were built from" in result.output


def test_relative_artifacts_dir_gives_usable_absolute_paths(flow, monkeypatch):
    """`--artifacts-dir artifacts` (the Makefile's default) from the recipe's folder."""
    recipe, artifacts, uri = flow
    monkeypatch.chdir(recipe.parent)
    result = invoke("run", recipe.name, "--artifacts-dir", "artifacts", "--tracking-uri", uri, "--no-register")
    assert result.exit_code == 0, result.output
    report = read_report(report_path(artifacts, "flow"))
    for a in report.artifacts:
        assert a.path and a.path.startswith("/") and (artifacts / "store").resolve() in Path(a.path).parents
    result = invoke("register", recipe.name, "--artifacts-dir", "artifacts", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert all(a.registry.version == "1" for a in read_report(report_path(artifacts, "flow")).artifacts)
