"""pipeline.registry.tracking and cards: URIs, names, races, the UI's experiment kind, serve commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.registry import tracking
from pipeline.registry.cards import rounded, serve_commands


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    assert tracking.tracking_uri_for(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}"
    assert tracking.local_artifact_root(tracking.tracking_uri_for(tmp_path)) == (tmp_path / "mlflow" / "artifacts").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri_for(tmp_path) == "http://tracking.example:5000"
    assert tracking.tracking_uri_for(tmp_path, "http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert tracking.local_artifact_root("http://127.0.0.1:1") is None


def test_names_and_values():
    assert tracking.flatten({"a": {"b": [1, 2], "c": [{"d": None}]}, "e": "x"}) == {"a.b": "[1, 2]", "a.c.0.d": "null", "e": "x"}
    assert tracking.key("cpu.kl (p99)%") == "cpu.kl _p99__" and len(tracking.key("x" * 400)) == 250
    assert tracking.quote("it's") == "'it\\'s'"
    assert rounded(140.88280336464317) == 140.88 and rounded(4.8999457039308e-05) == 4.8999e-05 and rounded(3761510) == 3761510.0


def test_ui_hint_names_the_store_and_a_compare_page(tmp_path):
    uri = tracking.tracking_uri_for(tmp_path)
    lines = tracking.ui_hint(uri, "3", ["r1", "r2"])
    assert lines[0].startswith(f"browse: mlflow ui --backend-store-uri {uri} --default-artifact-root {tmp_path.resolve() / 'mlflow' / 'artifacts'}")
    assert lines[1] == "charts: http://127.0.0.1:5000/#/experiments/3/runs?compareRunsMode=CHART"
    assert lines[2] == 'compare: http://127.0.0.1:5000/#/compare-runs?runs=["r1","r2"]&experiments=["3"]'
    assert tracking.ui_hint("http://mlflow.example:5000/", "3", [])[0] == "browse: http://mlflow.example:5000"


def test_experiment_kind_is_the_one_the_installed_ui_knows():
    """The tag value must be one of MLflow 3.17's ExperimentKind values (read from its UI bundle)."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="ignore") for p in js.glob("main.*.js"))
    assert f'CUSTOM_MODEL_DEVELOPMENT="{tracking.EXPERIMENT_KIND}"' in bundle
    assert f'"{tracking.EXPERIMENT_KIND_TAG}"' in bundle


def test_unique_race_is_retried_and_other_errors_are_not():
    from mlflow.exceptions import MlflowException

    race = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name", error_code="BAD_REQUEST")
    other = MlflowException("Registered Model with name=x not found", error_code="RESOURCE_DOES_NOT_EXIST")
    assert tracking.is_unique_race(race) and not tracking.is_unique_race(other)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise race
        return "set"

    assert tracking.retry_races(flaky) == "set" and len(calls) == 3
    with pytest.raises(MlflowException, match="not found"):
        tracking.retry_races(lambda: (_ for _ in ()).throw(other))


def test_serve_commands_follow_the_formats_declared_runtimes():
    assert serve_commands("fp8", None, "demo-fp8") == [
        "vllm serve DIR", "python -m sglang.launch_server --model-path DIR",
        "python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('DIR')\"   # decompresses to dense weights"]
    assert serve_commands("tensorrt-checkpoint", None, "demo-trt-fp8") == [
        "trtllm-serve DIR --backend pytorch", "vllm serve DIR --quantization modelopt", "python -m sglang.launch_server --model-path DIR --quantization modelopt"]
    assert serve_commands("gguf", "demo-Q4_K_M.gguf", "demo-gguf-Q4_K_M") == [
        "llama-server -m DIR/demo-Q4_K_M.gguf", "ollama create demo-q4_k_m -f DIR/Modelfile && ollama run demo-q4_k_m",
        "lms import DIR/demo-Q4_K_M.gguf"]
    assert serve_commands("tensorrt-engine", None, "x") == ["trtllm-serve DIR --backend tensorrt --tokenizer DIR"]
