"""GPTQ, AWQ and FP8 targets through llm-compressor, built by the real runner on the mini model.

One module-scoped build (local source = the trained mini model, 8 x 128 calibration
tokens) serves most tests; error cases use tiny random-weight models built in memory.
Perplexity is computed by a small helper here (the evals package's is not used, so a
failure here points at the targets, not at the eval code).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import InvalidInput
from pipeline.targets.compressed import AwqMapping, AwqTarget, GptqTarget

TARGETS = """\
  - {name: w4-gptq, kind: gptq, bits: 4, group_size: 128}
  - {name: w4-awq, kind: awq, bits: 4, group_size: 128}
  - {name: fp8-dyn, kind: fp8, scheme: dynamic}
  - {name: fp8-static, kind: fp8, scheme: static, kv_cache: true}
  - {name: w4-gptq-levers, kind: gptq, group_size: 64, symmetric: false, actorder: weight, observer: mse, block_size: 64, dampening_frac: 0.05}
  - {name: w4-awq-gptq, kind: awq, group_size: 64, n_grid: 4, duo_scaling: both, observer: memoryless_mse, gptq: {actorder: static}}
  - {name: w4-autoround, kind: autoround, group_size: 128, symmetric: false, iters: 4, batch_size: 4}
"""


def recipe_text(model_dir: Path, targets: str = TARGETS, dtype: str = "bfloat16") -> str:
    return (
        f"name: compressed-test\n"
        f"source: {{model: {model_dir}, dtype: {dtype}}}\n"
        f"calibration: {{dataset: builtin, samples: 8, seq_len: 128}}\n"
        f"targets:\n{targets}"
    )


def plan_for(path: Path, artifacts: Path):
    from pipeline.plan import make_plan
    from pipeline.validation import load_recipe

    return make_plan(load_recipe(path), artifacts)


@pytest.fixture(scope="module")
def built(mini_model, tmp_path_factory):
    """Every target built once through the runner: {stage name: StageResult}."""
    from pipeline.core.runner import execute

    root = tmp_path_factory.mktemp("compressed")
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(mini_model))
    plan = plan_for(recipe, root / "artifacts")
    lines: list[str] = []
    results = execute(plan.stages, root / "artifacts", log=lines.append)
    failed = {n: r.reason for n, r in results.items() if r.output is None}
    assert not failed, f"stages failed: {failed}\n" + "\n".join(lines[-40:])
    return results


def heldout_ids(tokenizer_dir: Path, text: str, windows: int = 4, length: int = 128):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(text[:20000]).input_ids
    assert len(ids) >= windows * length
    return torch.tensor(ids[: windows * length]).reshape(windows, length)


def perplexity(model_dir: Path, ids) -> float:
    """exp(mean next-token NLL) over the windows; compressed folders are decompressed on load."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return math.exp(float(loss))


# ------------------------------------------------------------------ builds
@pytest.mark.parametrize("stage,fmt,stored", [
    ("w4-gptq/quantize", "pack-quantized", "int32-packed"),
    ("w4-awq/quantize", "pack-quantized", "int32-packed"),
    ("fp8-dyn/quantize", "float-quantized", "float8_e4m3fn"),
    ("fp8-static/quantize", "float-quantized", "float8_e4m3fn"),
    ("w4-gptq-levers/quantize", "pack-quantized", "int32-packed"),
    ("w4-awq-gptq/quantize", "pack-quantized", "int32-packed"),
    ("w4-autoround/quantize", "pack-quantized", "int32-packed"),
])
def test_target_builds_a_verified_checkpoint(built, stage, fmt, stored, mini_model):
    out = built[stage].output
    result = out.result
    assert result["verification"]["ok"], result["verification"]["failures"]
    assert result["format"] == fmt
    q = result["verification"]["quantized"]
    assert q["stored_as"] == [stored]
    assert q["quantized_linears"] == 14  # 2 layers x 7 Linear; lm_head ignored
    for f in ("config.json", "recipe.yaml", "README.md", "tokenizer.json", "generation_config.json"):
        assert (out.path / f).is_file(), f
    card = (out.path / "README.md").read_text()
    # What was built from what (the source by name, never a local path), and how to get and serve it.
    assert card.count("# builtin:tiny-llama-mini: ") == 1 and "## Source" in card
    assert "mlflow artifacts download --artifact-uri models:/MODEL@production -d DIR" in card
    assert "vllm serve DIR\n" in card and "python -m sglang.launch_server --model-path DIR\n" in card
    assert "Filled in" not in card and "## Evaluation" not in card and str(Path(mini_model).parent) not in card
    assert built[stage].stage.artifact.format.startswith(f"compressed-tensors {fmt}")


def test_int4_groups_have_at_most_16_levels_and_lm_head_is_untouched(built, mini_model):
    """Read the saved safetensors directly, independently of the stage's verifier."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    for stage in ("w4-gptq/quantize", "w4-awq/quantize"):
        path = built[stage].output.path
        tensors = load_file(str(path / "model.safetensors"))
        name = "model.layers.0.mlp.down_proj"
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size(tensors[f"{name}.weight_shape"].tolist()))
        assert q.shape == (256, 512) and q.min() >= -8 and q.max() <= 7
        assert q.reshape(-1, 128).unique(dim=None).numel() <= 16
        assert tensors[f"{name}.weight_scale"].shape == (256, 4)  # one scale per group of 128
        source = load_file(str(Path(mini_model) / "model.safetensors"))
        if "lm_head.weight" in source:
            assert tensors["lm_head.weight"].dtype == source["lm_head.weight"].dtype
            assert torch.equal(tensors["lm_head.weight"], source["lm_head.weight"])


@pytest.mark.parametrize("stage,modifiers,weights,modifier_args", [
    ("w4-gptq-levers/quantize", ["GPTQModifier"], {"observer": "mse", "actorder": "weight", "symmetric": False, "group_size": 64},
     {"block_size": 64, "dampening_frac": 0.05}),
    ("w4-awq-gptq/quantize", ["AWQModifier", "GPTQModifier"], {"observer": "memoryless_mse", "actorder": "static", "symmetric": False, "group_size": 64},
     {"duo_scaling": "both", "n_grid": 4}),
    ("w4-autoround/quantize", ["AutoRoundModifier"], {"symmetric": False, "group_size": 128}, {"iters": 4, "batch_size": 4}),
    # the defaults: min-max scales, activation order by weight
    ("w4-gptq/quantize", ["GPTQModifier"], {"observer": "minmax", "actorder": "weight", "symmetric": True}, {"block_size": 128}),
])
def test_recipe_levers_reach_llm_compressor_and_the_saved_config(built, stage, modifiers, weights, modifier_args):
    """The levers are in the recipe llm-compressor ran (its own recipe.yaml) and in the config vLLM reads."""
    import yaml

    path = built[stage].output.path
    ran = yaml.safe_load((path / "recipe.yaml").read_text())
    found = {}
    for group in ran.values():
        for mods in group.values():
            found.update(mods)
    assert list(found) == modifiers
    args = {k: v for mod in found.values() for k, v in mod.items()}
    for key, value in modifier_args.items():
        assert args[key] == value, (key, args.get(key))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    saved = qc["config_groups"]["group_0"]["weights"]
    for key, value in weights.items():
        assert saved[key] == value, (key, saved.get(key))
    if not weights["symmetric"]:  # asymmetric: a zero point per group, stored beside the scales
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert "model.layers.0.mlp.down_proj.weight_zero_point" in set(f.keys())


def test_fp8_static_calibrates_activation_and_kv_scales(built):
    from safetensors.torch import load_file

    config = json.loads((built["fp8-static/quantize"].output.path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["kv_cache_scheme"]["num_bits"] == 8 and qc["kv_cache_scheme"]["type"] == "float"
    tensors = load_file(str(built["fp8-static/quantize"].output.path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.input_scale" in tensors  # static activation scale
    assert any(k.endswith("k_scale") for k in tensors) and any(k.endswith("v_scale") for k in tensors)


@pytest.mark.parametrize("stage", ["w4-gptq/quantize", "w4-awq/quantize", "fp8-dyn/quantize", "fp8-static/quantize"])
def test_perplexity_within_5pct_of_source(built, mini_model, heldout_text, stage):
    ids = heldout_ids(mini_model, heldout_text)
    base = perplexity(mini_model, ids)
    quant = perplexity(built[stage].output.path, ids)
    print(f"{stage}: perplexity {quant:.3f} vs source {base:.3f} ({100 * (quant / base - 1):+.2f}%)")
    assert quant <= base * 1.05, f"{stage}: perplexity {quant:.2f} vs source {base:.2f}"


def test_verifier_fails_when_an_ignored_module_changed(built, mini_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.targets.compressed.verify import verify

    folder = tmp_path / "tampered"
    shutil.copytree(built["w4-gptq/quantize"].output.path, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * torch.tensor(1.01, dtype=tensors["lm_head.weight"].dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    report = verify(folder, Path(mini_model), ["lm_head"], None, 4, "int")
    assert not report["ok"]
    assert any("lm_head.weight: ignored but changed" in f for f in report["failures"])


# ------------------------------------------------------------- planning
def test_fp8_dynamic_needs_no_calibration_input(built):
    assert built["fp8-dyn/quantize"].stage.inputs == {"source": "source"}
    assert built["fp8-static/quantize"].stage.inputs == {"source": "source", "calibration": "calibration"}
    assert built["w4-gptq/quantize"].stage.inputs == {"source": "source", "calibration": "calibration"}


def test_changing_a_param_changes_only_that_targets_key(mini_model, tmp_path):
    from pipeline.core.runner import stage_keys

    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(recipe_text(mini_model))
    b.write_text(recipe_text(mini_model, TARGETS.replace("kind: gptq, bits: 4, group_size: 128", "kind: gptq, bits: 4, group_size: 64")))
    ka = stage_keys(plan_for(a, tmp_path / "art").stages)
    kb = stage_keys(plan_for(b, tmp_path / "art").stages)
    changed = {name for name in ka if ka[name] != kb[name]}
    assert changed == {"w4-gptq/quantize"}

    c = tmp_path / "c.yaml"
    c.write_text(recipe_text(mini_model, dtype="float16"))
    kc = stage_keys(plan_for(c, tmp_path / "art").stages)
    assert {n for n in ka if n.endswith("/quantize") and ka[n] == kc[n]} == set()  # the dtype shapes every artifact


# --------------------------------------------------------------- errors
def tiny_llama(hidden: int = 96, inter: int = 192):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=256))


def test_autoround_batch_larger_than_calibration_is_refused(mini_model, tmp_path):
    from pipeline.validation import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(mini_model, "  - {name: r, kind: autoround, batch_size: 16}\n"))
    with pytest.raises(InvalidInput, match=r"targets.0.batch_size.*larger than calibration.samples \(8\)"):
        load_recipe(path)


def test_bad_group_size_names_the_layer():
    from pipeline.targets.compressed.stages import check_group_size

    with pytest.raises(InvalidInput) as err:
        check_group_size(tiny_llama(hidden=96), GptqTarget(name="g", kind="gptq", group_size=64))
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "input width 96" in msg and "'channel'" in msg
    check_group_size(tiny_llama(hidden=96), GptqTarget(name="g", kind="gptq", group_size=32))  # divides: no error


def test_bad_group_size_stops_the_stage_before_quantizing(tmp_path):
    from pipeline.targets.compressed.stages import quantize_to

    model = tiny_llama(hidden=96)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(InvalidInput, match="does not divide layer 'model.layers.0"):
        quantize_to(tmp_path / "out", GptqTarget(name="g", kind="gptq", group_size=64), tmp_path / "src", "bfloat16", None, "g/quantize", print)
    assert not (tmp_path / "out").exists()


def test_awq_unmappable_architecture_names_the_class_and_the_recipe_key():
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.targets.compressed.stages import check_awq_mappings

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=256, word_embed_proj_dim=64))
    with pytest.raises(InvalidInput) as err:
        check_awq_mappings(opt, AwqTarget(name="a", kind="awq"))
    msg = str(err.value)
    assert "OPTForCausalLM" in msg and "mappings:" in msg and "smooth_layer:" in msg and "balance_layers:" in msg

    # explicit mappings that fit OPT's layer names make it mappable
    fitting = [AwqMapping(smooth_layer="re:.*self_attn_layer_norm$", balance_layers=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"])]
    assert check_awq_mappings(opt, AwqTarget(name="a", kind="awq", mappings=fitting)) == 1


def test_awq_mapping_typo_is_named():
    from pipeline.targets.compressed.stages import check_awq_mappings

    typo = [AwqMapping(smooth_layer="re:.*input_layernorm$", balance_layers=["re:.*q_prj$"])]
    with pytest.raises(InvalidInput, match=r"q_prj.*matches no layers of LlamaForCausalLM"):
        check_awq_mappings(tiny_llama(), AwqTarget(name="a", kind="awq", mappings=typo))


def test_out_of_memory_is_recognised_and_explained():
    import torch

    from pipeline.targets.compressed.stages import is_out_of_memory, oom_message

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    msg = oom_message("w4/quantize", GptqTarget(name="w4", kind="gptq"), 64, 2048, "cpu")
    assert "w4/quantize" in msg and "64 calibration samples x 2048 tokens" in msg
    assert "calibration.samples" in msg and "calibration.seq_len" in msg and "GPU" in msg and "onloads" in msg


# --------------------------------------------------------- AWQ on CPU
def test_awq_cpu_workaround_patches_only_pin_memory_only_inside():
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    from pipeline.targets.compressed.stages import awq_cpu_pin_memory_guard

    if torch.accelerator.is_available():
        pytest.skip("the workaround only applies without an accelerator")
    original = IntermediatesCache.__dict__["pin_memory"]
    cache = IntermediatesCache.from_dataloader([{"x": torch.ones(2)}], torch.device("cpu"))
    # The upstream bug this works around: pinning needs an accelerator. If this stops
    # raising, llm-compressor fixed it and the guard can go.
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)
    with awq_cpu_pin_memory_guard() as patched:
        assert patched
        cache.pin_memory(0)
        assert cache.fetch(0)["x"].tolist() == [1.0, 1.0]
    assert IntermediatesCache.__dict__["pin_memory"] is original


# ------------------------------------------------------------ placement
def test_threads_default_to_one_on_two_cores_and_env_overrides(monkeypatch):
    from pipeline.core.placement import THREADS_ENV, choose_placement, default_threads

    assert default_threads(cpu_count=2) == 1
    assert default_threads(cpu_count=16) == 14
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_placement().threads == 3
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(InvalidInput, match=THREADS_ENV):
        choose_placement()
