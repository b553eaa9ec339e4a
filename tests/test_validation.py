"""`validate` runs every static check that `plan` (and so every build) runs: they refuse the same recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
BROKEN = sorted((Path(__file__).parent / "recipes" / "broken").glob("*.yaml"))
runner = CliRunner()


def _problems(output: str) -> set[str]:
    return {line for line in output.splitlines() if line.startswith("invalid input:")}


@pytest.mark.parametrize("path", SHIPPED + BROKEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_validate_and_plan_agree(path, tmp_path):
    validate = runner.invoke(app, ["validate", str(path)])
    plan = runner.invoke(app, ["plan", str(path), "--artifacts-dir", str(tmp_path / "artifacts")])
    assert validate.exit_code in (0, 2), validate.output
    assert plan.exit_code == validate.exit_code, (validate.output, plan.output)
    if validate.exit_code == 2:
        assert _problems(plan.output) == _problems(validate.output)
        assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*"))
    else:
        assert path in SHIPPED, f"{path.name} is meant to be broken"
        assert "stages cached" in plan.output


def test_every_kind_check_runs_in_validate(write_recipe):
    """A GGUF IQ quant without an imatrix used to pass validate and fail only at plan time."""
    path = write_recipe(
        """
name: iq
source: {model: builtin:tiny-llama-mini}
targets:
  - {name: gguf, kind: gguf, quants: [IQ2_XS, Q4_K_M], pre_tokenizer: gpt-2}
  - {name: trt, kind: tensorrt, quant: int4_awq, output: checkpoint, tp_size: 3}
"""
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert re.search(r"recipe\.yaml:\d+: targets\.0\.imatrix: quant type\(s\) IQ2_XS need an importance matrix", result.output)
    assert "targets.1: tp_size 3 does not divide num_attention_heads 4" in result.output
    assert "targets.1.kind: target 'trt' (tensorrt) needs calibration data" in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x02binary\xff", "holds binary data"),
        (b"name: caf\xe9\n", "not UTF-8 text"),
        (b"name: a\nname: b\n", "key 'name' is given twice (lines 1 and 2)"),
        (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n".encode()
            for i in range(8)), "expands to more than"),
        (b"- a\n- b\n", "a recipe is a YAML mapping"),
        (b"name: [unclosed\n", "not valid YAML"),
    ],
    ids=["binary", "latin1", "duplicate-key", "billion-laughs", "list", "syntax"],
)
def test_hostile_files_exit_2_with_a_message(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_source_path_the_file_system_refuses_is_an_input_error(write_recipe):
    """A name longer than the file system allows (found by the recipe fuzzer) is invalid input at
    source.model, never an OSError out of validate; also when another section is invalid."""
    path = write_recipe(f"name: null\nsource: {{model: {'a' * 300}}}\ntargets:\n  - {{name: fp8, kind: fp8}}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "source.model" in result.output and "Traceback" not in result.output
