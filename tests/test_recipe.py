"""Recipe validation: every shipped recipe is valid; broken ones fail with located messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.errors import InvalidInput
from pipeline.validation import load_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
BROKEN = sorted((Path(__file__).parent / "recipes" / "broken").glob("*.yaml"))
runner = CliRunner()


def _expectation(path: Path) -> tuple[str, str]:
    first = path.read_text().splitlines()[0]
    dotted, message = first.removeprefix("# expect:").split("|")
    return dotted.strip(), message.strip()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    loaded = load_recipe(path)
    assert loaded.recipe.targets


def test_there_are_shipped_recipes():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_fails_with_its_path(path, tmp_path):
    dotted, message = _expectation(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f": {dotted}: " in result.output
    assert message in result.output
    # The message is located: FILE:LINE: path: message
    assert re.search(re.escape(path.name) + r":\d+: " + re.escape(dotted), result.output)
    # Building it fails the same way and creates nothing.
    artifacts = tmp_path / "artifacts"
    result = runner.invoke(app, ["build", str(path), "--artifacts-dir", str(artifacts)])
    assert result.exit_code == 2
    assert not artifacts.exists() or not any(artifacts.rglob("*"))


def test_every_problem_is_reported_at_once(write_recipe):
    path = write_recipe(
        """
name: many
source: {model: builtin:tiny-llama-mini, dtype: float64}
calibration: {samples: 0}
targets:
  - {name: a, kind: gptq, bits: 3}
  - {name: a, kind: fp8, schema: dynamic}
"""
    )
    with pytest.raises(InvalidInput) as info:
        load_recipe(path)
    paths = {p.path for p in info.value.problems}
    assert {"source.dtype", "calibration.samples", "targets.0.bits", "targets.1.schema"} <= paths
    lines = {p.path: p.line for p in info.value.problems}
    assert lines["targets.0.bits"] == 6 and lines["source.dtype"] == 3


def test_cross_field_checks_run_after_field_checks_pass(write_recipe):
    path = write_recipe(
        """
name: dupes
source: {model: builtin:tiny-llama-mini}
targets:
  - {name: a, kind: gguf, quants: [Q8_0], imatrix: true}
  - {name: a, kind: fp8}
"""
    )
    with pytest.raises(InvalidInput) as info:
        load_recipe(path)
    got = {p.path: p.message for p in info.value.problems}
    assert "needs calibration data" in got["targets.0.kind"]
    assert "duplicate target name 'a'" in got["targets.1.name"]


def test_unknown_builtin_model_suggests_the_right_one(write_recipe):
    path = write_recipe("name: x\nsource: {model: builtin:tiny-lama}\ntargets: [{name: f, kind: fp8}]\n")
    with pytest.raises(InvalidInput, match="did you mean 'builtin:tiny-llama'"):
        load_recipe(path)


def test_per_target_gate_overrides(write_recipe):
    path = write_recipe(
        """
name: gates
source: {model: builtin:tiny-llama-mini}
targets:
  - {name: f, kind: fp8, gates: {max_perplexity_increase_pct: 1.5}}
  - {name: g, kind: fp8, scheme: block}
gates: {max_perplexity_increase_pct: 5.0, min_top1_agreement_pct: 90}
"""
    )
    recipe = load_recipe(path).recipe
    assert recipe.gates_for("f").max_perplexity_increase_pct == 1.5
    assert recipe.gates_for("f").min_top1_agreement_pct == 90
    assert recipe.gates_for("g").max_perplexity_increase_pct == 5.0


def test_recipe_hash_ignores_formatting_but_not_values(write_recipe):
    a = write_recipe("name: h\nsource: {model: builtin:tiny-llama-mini}\ntargets: [{name: f, kind: fp8}]\n", "a.yaml")
    b = write_recipe("# comment\nname: h\nsource:\n  model: builtin:tiny-llama-mini\ntargets:\n  - name: f\n    kind: fp8\n    scheme: dynamic\n", "b.yaml")
    c = write_recipe("name: h\nsource: {model: builtin:tiny-llama-mini}\ntargets: [{name: f, kind: fp8, scheme: block}]\n", "c.yaml")
    ha, hb, hc = (load_recipe(p).recipe.sha256() for p in (a, b, c))
    assert ha == hb != hc


def test_schema_command_prints_json_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["properties"]) >= {"name", "source", "calibration", "targets", "evals", "gates", "registry"}
    assert schema["additionalProperties"] is False
