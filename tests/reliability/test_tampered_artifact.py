"""A stored file altered after the build, end to end through the command line: `eval`
reports that artifact failed (naming the file) instead of measuring it, `register`
exits non-zero for it and creates no model version, the intact artifact is evaluated
and registered all the same, and `build` puts the altered artifact right again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.report import read_report, report_path
from tests.reliability.helpers import NAME, check_report, check_store, recipe_text

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def versions(db, model: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    return sorted(str(v.version) for v in MlflowClient(f"sqlite:///{db}").search_model_versions(f"name = '{model}'"))


@pytest.mark.slow
def test_altered_artifact_is_caught_before_eval_and_register_then_rebuilt(tmp_path, mini_model, empty_db):
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8 gguf"))
    artifacts = (tmp_path / "artifacts").resolve()
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_db, db)
    uri = f"sqlite:///{db}"

    built = invoke("build", recipe, "--artifacts-dir", artifacts)
    assert built.exit_code == 0, built.output
    fp8 = {a.name: a for a in read_report(report_path(artifacts, NAME)).artifacts}["fp8"]
    weights = sorted(Path(fp8.path).glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the sha256 can tell
    weights.write_bytes(bytes(data))

    evaluated = invoke("eval", recipe, "--artifacts-dir", artifacts, "--fail-on-gate")
    assert evaluated.exit_code == 3, evaluated.output  # the eval job fails (as in CI, with --fail-on-gate)
    assert f"fp8: NOT evaluated, its stored files changed since the build: {weights.name} changed" in evaluated.output
    report = {a.name: a for a in read_report(report_path(artifacts, NAME)).artifacts}
    assert report["fp8"].evals["cpu"].status == "failed" and weights.name in report["fp8"].evals["cpu"].reason
    assert report["fp8"].evals["cpu"].metrics.perplexity is None, "nothing was measured on it"
    assert report["fp8"].gates.passed is False
    assert report["gguf-Q8_0"].evals["cpu"].status == "done", "the intact artifact is evaluated all the same"

    registered = invoke("register", recipe, "--artifacts-dir", artifacts, "--tracking-uri", uri)
    assert registered.exit_code == 1, registered.output
    assert "fp8" in registered.output and weights.name in registered.output and "no model version was created" in registered.output
    assert versions(db, f"{NAME}-fp8") == [], "no model version for the altered artifact"
    assert versions(db, f"{NAME}-gguf-Q8_0") == ["1"]
    assert read_report(report_path(artifacts, NAME)).artifact("fp8").registry is None

    # "rebuild it", as both messages say: the build notices and builds that artifact again.
    rebuilt = invoke("build", recipe, "--artifacts-dir", artifacts)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "[fp8/quantize] the stored files changed since they were built" in rebuilt.output
    assert "[fp8/quantize] done in" in rebuilt.output and "[gguf/quantize/Q8_0] done in" not in rebuilt.output
    check_store(artifacts)
    check_report(artifacts)

    assert invoke("eval", recipe, "--artifacts-dir", artifacts, "--fail-on-gate").exit_code == 0
    check_report(artifacts, evaluated=True)
    again = invoke("register", recipe, "--artifacts-dir", artifacts, "--tracking-uri", uri)
    assert again.exit_code == 0, again.output
    assert versions(db, f"{NAME}-fp8") == ["1"] and versions(db, f"{NAME}-gguf-Q8_0") == ["1"]
