"""tensorrt target: build settings, plan/skip reasons, ModelOpt checkpoints on the mini model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import InvalidInput, StageFailed
from pipeline.targets.tensorrt import TensorRtTarget
from pipeline.targets.tensorrt.settings import build_settings

LLAMA_MINI = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 4096}
# Llama-3-8B's shape (GQA: 32 query heads, 8 KV heads)
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32}


def trt(**kw) -> TensorRtTarget:
    return TensorRtTarget(name="trt", kind="tensorrt", **kw)


# ---------------------------------------------------------------- build settings
def test_fp8_defaults_translate_to_trtllm_build_args():
    s = build_settings(trt(quant="fp8"), LLAMA_MINI)
    assert (s.quant_algo, s.kv_cache_quant_algo, s.group_size) == ("FP8", None, None)
    args = s.trtllm_build_args("/ckpt", "/eng")
    assert args[:5] == ["trtllm-build", "--checkpoint_dir", "/ckpt", "--output_dir", "/eng"]
    flags = dict(zip(args[5::2], args[6::2]))
    assert flags == {"--max_batch_size": "8", "--max_input_len": "1024", "--max_seq_len": "2048",
                     "--max_num_tokens": "8192", "--gemm_plugin": "auto", "--workers": "1"}
    assert s.export_kwargs() == {"inference_tensor_parallel": 1, "inference_pipeline_parallel": 1}
    assert s.llm_api_kwargs()["quant_config"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None}


def test_int4_awq_with_fp8_kv_cache_and_tp():
    s = build_settings(trt(quant="int4_awq", kv_cache_quant="fp8", tp_size=4, pp_size=2, max_batch_size=16,
                           max_input_len=2048, max_seq_len=4096, max_num_tokens=4096), LLAMA3_8B)
    assert (s.quant_algo, s.kv_cache_quant_algo, s.group_size) == ("W4A16_AWQ", "FP8", 128)
    assert s.quant_config() == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 128}
    assert s.llm_api_kwargs()["tensor_parallel_size"] == 4 and s.llm_api_kwargs()["pipeline_parallel_size"] == 2
    assert s.world_size == 8 and "--workers" in s.trtllm_build_args("c", "o")
    # tp 16 > 8 KV heads: ModelOpt duplicates them (tp % kv == 0), so it is allowed
    assert build_settings(trt(quant="fp8", tp_size=16), LLAMA3_8B).tp_size == 16


def test_nvfp4_and_none():
    assert build_settings(trt(quant="nvfp4"), LLAMA_MINI).quant_config() == {"quant_algo": "NVFP4", "kv_cache_quant_algo": None}
    s = build_settings(trt(quant="none"), LLAMA_MINI)
    assert s.quant_algo is None and s.min_compute_capability == (8, 0)


@pytest.mark.parametrize("kw, config, message", [
    ({"tp_size": 3}, LLAMA_MINI, "tp_size 3 does not divide num_attention_heads 4"),
    ({"tp_size": 4}, {**LLAMA3_8B, "num_key_value_heads": 6, "num_attention_heads": 24}, "num_key_value_heads 6"),
    ({"pp_size": 3}, LLAMA_MINI, "pp_size 3 exceeds num_hidden_layers 2"),
    ({"max_batch_size": 64, "max_num_tokens": 32}, LLAMA_MINI, "below max_batch_size"),
    ({"quant": "int4_awq", "tp_size": 4}, LLAMA_MINI, "o_proj input per rank (heads*head_dim/tp) is 64"),
    ({"quant": "int4_awq"}, {**LLAMA_MINI, "intermediate_size": 704}, "intermediate_size/tp) is 704"),
    ({"quant": "none", "kv_cache_quant": "fp8"}, LLAMA_MINI, "needs a weight quant"),
])
def test_invalid_settings_are_refused(kw, config, message):
    with pytest.raises(InvalidInput, match=".*" + message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        build_settings(trt(**kw), config)


def test_max_num_tokens_is_clipped_like_tensorrt_llm():
    s = build_settings(trt(max_batch_size=2, max_input_len=128, max_seq_len=256, max_num_tokens=8192), LLAMA_MINI)
    assert s.max_num_tokens == 512 and any("clipped" in n for n in s.notes)


def test_device_requirements():
    fp8 = build_settings(trt(quant="fp8"), LLAMA_MINI)
    assert fp8.device_problem((9, 0), 1) is None
    assert "8.9" in fp8.device_problem((8, 0), 1)
    assert "SM>=100" in build_settings(trt(quant="int4_awq"), LLAMA_MINI).device_problem((10, 0), 1)
    assert "10.0" in build_settings(trt(quant="nvfp4"), LLAMA_MINI).device_problem((9, 0), 1)
    assert "needs 2 GPUs" in build_settings(trt(quant="fp8", tp_size=2), LLAMA_MINI).device_problem((9, 0), 1)


def test_engine_skip_reasons():
    from pipeline.targets.tensorrt.stages import engine_skip_reason

    s = build_settings(trt(quant="fp8"), LLAMA_MINI)
    h100 = (("NVIDIA H100 80GB HBM3", (9, 0)),)
    missing = engine_skip_reason(s, gpus=(), trtllm=None)
    assert "pip install tensorrt-llm==1.2.1 --extra-index-url https://pypi.nvidia.com" in missing
    assert "compute capability >= 8.9" in missing and "pin 1.x" in missing and "no NVIDIA GPU" in missing
    assert "engines need 1.x" in engine_skip_reason(s, gpus=h100, trtllm="2.0.0")
    assert "no NVIDIA GPU" in engine_skip_reason(s, gpus=(), trtllm="1.2.1")
    assert engine_skip_reason(s, gpus=h100, trtllm="1.2.1") is None
    b200 = (("NVIDIA B200", (10, 0)),)
    assert "SM>=100" in engine_skip_reason(build_settings(trt(quant="int4_awq"), LLAMA_MINI), gpus=b200, trtllm="1.2.1")


# ------------------------------------------------------------------------ plan
RECIPE = """
name: trt
source: {{model: builtin:tiny-llama-mini, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 8, seq_len: 64}}
targets:
{targets}
evals: {{devices: [cpu], context: 128}}
"""


def _plan(write_recipe, targets: str, tmp_path):
    from pipeline.plan import make_plan
    from pipeline.validation import load_recipe

    return make_plan(load_recipe(write_recipe(RECIPE.format(targets=targets))), tmp_path / "artifacts")


def test_plan_stages_without_tensorrt_llm(write_recipe, tmp_path):
    from pipeline.targets.tensorrt.stages import torch_cuda_available, trtllm_version

    if trtllm_version() is not None or torch_cuda_available():
        pytest.skip("this test describes a machine without tensorrt-llm and without CUDA")
    plan = _plan(write_recipe, "  - {name: trt-fp8, kind: tensorrt, quant: fp8, kv_cache_quant: fp8}\n"
                               "  - {name: trt-nvfp4, kind: tensorrt, quant: nvfp4, output: checkpoint}", tmp_path)
    by = plan.by_name()
    assert [n for n in by if n.startswith("trt-")] == ["trt-fp8/checkpoint", "trt-fp8/trtllm-checkpoint",
                                                     "trt-fp8/engine", "trt-nvfp4/checkpoint"]
    ck, eng = by["trt-fp8/checkpoint"], by["trt-fp8/engine"]
    assert ck.skip_reason is None and ck.artifact.kind == "tensorrt-checkpoint"
    assert ck.inputs == {"source": "source", "calibration": "calibration"}
    assert ck.params["modelopt_config"] == "FP8_DEFAULT_CFG" and ck.params["kv_cache_quant"] == "fp8"
    assert eng.artifact.kind == "tensorrt-engine" and eng.inputs["trtllm_checkpoint"] == "trt-fp8/trtllm-checkpoint"
    assert "tensorrt-llm 1.2.x" in eng.skip_reason and "pypi.nvidia.com" in eng.skip_reason
    assert eng.device_fingerprint is None  # no GPU to fingerprint
    assert by["trt-fp8/trtllm-checkpoint"].skip_reason.startswith("feeds only the engine stage")
    assert "CUDA GPU" in by["trt-nvfp4/checkpoint"].skip_reason
    for st in plan.stages:
        json.dumps(st.params)  # params are JSON-able (they feed the cache key)
    assert ck.key({"source": "a", "calibration": "b"}) != by["trt-nvfp4/checkpoint"].key({"source": "a", "calibration": "b"})


def test_plan_refuses_tp_that_does_not_divide_heads(write_recipe, tmp_path):
    with pytest.raises(InvalidInput, match="tp_size 3 does not divide num_attention_heads 4"):
        _plan(write_recipe, "  - {name: t, kind: tensorrt, quant: fp8, tp_size: 3}", tmp_path)


# ------------------------------------------------------ ModelOpt checkpoints
def _calib(model_dir: Path, samples: int, seq_len: int):
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.data.corpus import corpus_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(corpus_text("train")[:100_000], add_special_tokens=False)["input_ids"][: samples * seq_len]
    return np.asarray(ids, dtype=np.int64).reshape(samples, seq_len)


@pytest.fixture(scope="module")
def fp8_checkpoint(mini_model, heldout_text, tmp_path_factory):
    from pipeline.targets.tensorrt.checkpoint import build_checkpoint

    out = tmp_path_factory.mktemp("fp8")
    facts = build_checkpoint(mini_model, out, quant="fp8", kv_cache_quant="fp8", calib_ids=_calib(mini_model, 8, 128),
                             check_text=heldout_text, seq_len=256)
    return out, facts


def test_fp8_checkpoint_verified(fp8_checkpoint, mini_model):
    from pipeline.targets.tensorrt.checkpoint import MAX_PPL_RATIO, read_quant_config

    out, facts = fp8_checkpoint
    config, hq = read_quant_config(out)
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert hq["quantization"]["quant_algo"] == "FP8" and hq["quantization"]["kv_cache_quant_algo"] == "FP8"
    v = facts["verification"]
    assert v["quantized_linears"] == 14 and v["kv_scales"] == 2
    assert v["weight_rel_error_max"] < 0.05
    # Quality is the evals' call; the build only bounds breakage (and records what it saw).
    assert v["perplexity_dequantized"] < MAX_PPL_RATIO * v["perplexity_source"]
    assert v["perplexity_increase_pct"] == pytest.approx(100 * (v["perplexity_dequantized"] / v["perplexity_source"] - 1), abs=1e-2)
    card = (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file() and "quantization=\"modelopt\"" in card
    # Titled by the source model's name, no local path; serve commands for each runtime that loads it.
    assert "\n# builtin:tiny-llama-mini: NVIDIA ModelOpt FP8 checkpoint" in card and str(Path(mini_model).parent) not in card
    from huggingface_hub import ModelCard  # Hub-ready front matter

    assert ModelCard(card, ignore_metadata_errors=False).data.pipeline_tag == "text-generation"
    assert "trtllm-serve DIR --backend pytorch\n" in card and "vllm serve DIR --quantization modelopt\n" in card
    assert "python -m sglang.launch_server --model-path DIR --quantization modelopt\n" in card
    print("fp8", json.dumps(v))


def test_int4_awq_checkpoint_verified(mini_model, heldout_text, tmp_path):
    from pipeline.targets.tensorrt.checkpoint import MAX_PPL_RATIO, build_checkpoint, read_quant_config

    facts = build_checkpoint(mini_model, tmp_path, quant="int4_awq", kv_cache_quant=None,
                             calib_ids=_calib(mini_model, 8, 64), check_text=heldout_text, seq_len=256)
    _, hq = read_quant_config(tmp_path)
    assert hq["quantization"]["quant_algo"] == "W4A16_AWQ" and hq["quantization"]["group_size"] == 128
    v = facts["verification"]
    assert 0.05 < v["weight_rel_error_max"] < 0.35  # 4-bit: clearly lossy, but bounded
    assert v["perplexity_dequantized"] < MAX_PPL_RATIO * v["perplexity_source"]
    # 4-bit weights: well under half the bf16 source's size
    src_bytes = sum(p.stat().st_size for p in Path(mini_model).glob("*.safetensors"))
    assert facts["checkpoint_bytes"] < 0.75 * src_bytes
    print("int4_awq", json.dumps(v))


def test_verification_catches_a_wrong_scale(fp8_checkpoint, mini_model, tmp_path):
    """Scales off by 1.5x (what a reader ignoring the layout would do) must fail the stage."""
    from safetensors.torch import load_file, save_file

    from pipeline.targets.tensorrt.checkpoint import verify_checkpoint

    out, _ = fp8_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.down_proj.weight_scale"] = t["model.layers.1.mlp.down_proj.weight_scale"] * 1.5
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(StageFailed, match="down_proj.weight differs from the source"):
        verify_checkpoint(bad, mini_model, "fp8", "fp8", check_text=None)
    with pytest.raises(StageFailed, match="quant_algo is 'FP8', expected 'W4A16_AWQ'"):
        verify_checkpoint(out, mini_model, "int4_awq", None, check_text=None)


def test_plain_transformers_is_refused(fp8_checkpoint, mini_model):
    from pipeline.backends.modelopt import ModelOptCheckpointRefused, refuse_plain_transformers

    out, _ = fp8_checkpoint
    with pytest.raises(ModelOptCheckpointRefused, match="vLLM") as exc:
        refuse_plain_transformers(out)
    assert exc.value.exit_code == 2 and "quant_algo FP8" in str(exc.value)
    refuse_plain_transformers(mini_model)  # an ordinary HF folder passes


def test_trtllm_checkpoint_for_tp2(mini_model, tmp_path):
    """The trtllm-build input, exported on CPU: quant algo and tp mapping as the settings say."""
    import numpy as np

    from pipeline.core.stage import StageContext, StageOutput
    from pipeline.targets.tensorrt.stages import run_trtllm_checkpoint

    cal = tmp_path / "cal"
    cal.mkdir()
    np.save(cal / "input_ids.npy", _calib(mini_model, 4, 64))
    (cal / "texts.jsonl").write_text("")
    s = build_settings(trt(quant="fp8", kv_cache_quant="fp8", tp_size=2), LLAMA_MINI)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage=None, out_dir=out, log=print, artifacts_dir=tmp_path, inputs={
        "source": StageOutput("source", "k", Path(mini_model), {"result": {"model_dir": str(mini_model)}}),
        "calibration": StageOutput("calibration", "k", cal, {})})
    facts = run_trtllm_checkpoint(ctx, settings_dict=s.to_dict(), dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"]["quant_algo"] == "FP8" and cfg["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert facts["ranks"] == ["rank0.safetensors", "rank1.safetensors"]
    assert cfg["rotary_base"] == json.loads((Path(mini_model) / "config.json").read_text())["rope_parameters"]["rope_theta"]
