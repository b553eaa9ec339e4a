"""Device names: an unknown one would leave its eval job waiting for a runner that never comes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.backends.devices import Device
from pipeline.cli.main import app

runner = CliRunner()
RECIPE = """
name: devices
source: {{model: builtin:tiny-llama-mini}}
targets:
  - {{name: fp8, kind: fp8}}
evals: {{devices: {devices}, context: 128}}
"""


def test_every_unknown_device_is_reported_at_its_index(write_recipe):
    path = write_recipe(RECIPE.format(devices="[cpu, tpu, h1000]"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "evals.devices.1: device 'tpu': TPUs are not supported" in out
    assert "evals.devices.2: unknown device 'h1000' (did you mean 'h100'?)" in out
    assert "evals.devices.0" not in out


@pytest.mark.parametrize("devices", ["[cpu]", "[cuda]", "[cpu, cuda, h100, h200]", "[a100, l40s, rtx4090]"])
def test_known_devices_pass(write_recipe, devices):
    result = runner.invoke(app, ["validate", str(write_recipe(RECIPE.format(devices=devices)))])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name, message", [
    ("cuda:1", "not GPU indices: use 'cuda'"),
    ("mps", "not supported yet"),
    ("gpu", "name the GPU kind"),
    ("h10", "did you mean 'h100'?"),
])
def test_device_parse_says_why(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        Device.parse(name)


def test_device_kinds():
    assert Device.parse("cpu") == Device("cpu", "cpu")
    assert Device.parse("cuda").kind == Device.parse("h200").kind == "cuda"


def test_required_devices_must_be_eval_devices(write_recipe):
    text = RECIPE.format(devices="[cpu]") + "gates: {required_devices: [cpu, cuda]}\n"
    result = runner.invoke(app, ["validate", str(write_recipe(text))])
    assert result.exit_code == 2
    assert "gates.required_devices.1: device 'cuda' is not in evals.devices ['cpu']" in result.output


def test_an_unknown_device_option_gets_a_did_you_mean(write_recipe, tmp_path):
    path = write_recipe(RECIPE.format(devices="[cpu]"))
    result = runner.invoke(app, ["plan", str(path), "-d", "h1000", "--artifacts-dir", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "--device: unknown device 'h1000' (did you mean 'h100'?)" in result.output


def test_code_asks_the_device_type_not_its_name():
    """Runtimes and measurements ask Device.of(...), which also takes one GPU by index (a recipe may not)."""
    from pipeline.backends.devices import Device

    assert Device.of("cpu").on_gpu is False and Device.of("cpu").torch == "cpu"
    assert Device.of("cuda").on_gpu and Device.of("cuda").torch == "cuda"
    one = Device.of("cuda:1")
    assert one.kind == "cuda" and one.index == 1 and one.torch == "cuda:1"
    assert Device.of("h100").kind == "cuda" and Device.of("H100").name == "h100"
    with pytest.raises(ValueError, match="not GPU indices"):
        Device.parse("cuda:1")
    with pytest.raises(ValueError, match="did you mean 'cuda'"):
        Device.of("cdua")
