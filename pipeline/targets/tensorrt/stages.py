"""`tensorrt` target: NVIDIA ModelOpt checkpoints and TensorRT-LLM 1.x engines.

Stages (``<name>`` is the recipe target's name):

* ``<name>/checkpoint`` (output checkpoint|both, quant != none): ModelOpt quantize +
  ``export_hf_checkpoint`` + tokenizer + model card, verified by reading it back
  (:mod:`pipeline.targets.tensorrt.checkpoint`). Artifact kind ``tensorrt-checkpoint``; it is what
  TensorRT-LLM's PyTorch backend, vLLM and SGLang load.
* ``<name>/trtllm-checkpoint`` (output engine|both): the same quantization exported with
  ``export_tensorrt_llm_checkpoint`` for tp/pp ranks -- the input ``trtllm-build`` reads.
  ModelOpt exports from the live quantized model (the HF export rewrites it in place:
  norms absorb AWQ scales), so this stage quantizes again from the same source and
  calibration data. Internal; no artifact.
* ``<name>/engine`` (output engine|both): ``trtllm-build`` (tensorrt_llm/commands/build.py)
  with the arguments of :mod:`pipeline.targets.tensorrt.settings`, then a short generation through the
  LLM API's TensorRT backend (``tensorrt_llm._tensorrt_engine.LLM``, tensorrt_llm/llmapi/llm.py)
  in a child process. Device-specific: keyed by GPU name, compute capability, TensorRT and
  TensorRT-LLM versions. Artifact kind ``tensorrt-engine``.

TensorRT-LLM 1.2 sources relied on: tensorrt_llm/commands/build.py (trtllm-build flags; quant and
mapping come from the checkpoint's config.json), tensorrt_llm/builder.py (BuildConfig, the
max_seq_len/max_input_len handling, the SM>=100 INT4 refusal), tensorrt_llm/_common.py
(check_max_num_tokens), tensorrt_llm/llmapi/llm.py (the TensorRT-backend LLM class and
llm.save), tensorrt_llm/llmapi/llm_utils.py (ModelLoader._update_from_hf_quant_config: the
PyTorch backend takes our HF checkpoint as pre-quantized via hf_quant_config.json).

Where a stage cannot run (no CUDA GPU for NVFP4, no tensorrt-llm 1.x or no GPU for an
engine) ``skip_reason`` is set at plan time; nothing is faked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

from pipeline.errors import InvalidInput, StageFailed
from pipeline.core.stage import ArtifactInfo, Stage, StageContext, tool_versions

CHECKPOINT_VERSION = "3"
TRTLLM_CHECKPOINT_VERSION = "2"
ENGINE_VERSION = "1"
MODELOPT_TOOLS = ("nvidia-modelopt", "torch", "transformers", "safetensors")
TRTLLM_PIN = "tensorrt-llm==1.2.1"
TRTLLM_INSTALL = f"pip install {TRTLLM_PIN} --extra-index-url https://pypi.nvidia.com"
BITS = {"fp8": 8, "int4_awq": 4, "nvfp4": 4, "none": None}


# --------------------------------------------------------------- environment probes
@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[tuple[str, tuple[int, int]], ...]:
    """(name, compute capability) per NVIDIA GPU, from the accelerator probe (no torch import at plan time)."""
    from pipeline.backends.devices import nvidia_gpus

    gpus = []
    for g in nvidia_gpus():
        try:
            major, minor = (int(x) for x in g["capability"].split("."))
        except ValueError:
            continue
        gpus.append((g["name"], (major, minor)))
    return tuple(gpus)


@functools.lru_cache(maxsize=1)
def torch_cuda_available() -> bool:
    """torch sees a CUDA GPU. Imports torch, so only asked when nvidia-smi saw one."""
    if not detect_gpus():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _dist_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            continue
    return None


def trtllm_version() -> str | None:
    return _dist_version("tensorrt_llm", "tensorrt-llm")


def tensorrt_version() -> str | None:
    return _dist_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12")


def engine_skip_reason(settings, gpus=None, trtllm: str | None | bool = False) -> str | None:
    """Why the engine stage cannot run here (None when it can).

    ``gpus`` / ``trtllm`` default to what this machine has; tests pass their own.
    """
    gpus = detect_gpus() if gpus is None else gpus
    trtllm = trtllm_version() if trtllm is False else trtllm
    need = "{}.{}".format(*settings.min_compute_capability)
    where = f"on a machine with an NVIDIA GPU (compute capability >= {need})"
    pin_note = "the engine (TensorRT) backend was removed from TensorRT-LLM's main branch in 2026, so pin 1.x"
    if trtllm is None:
        gpu_note = "" if gpus else "; this machine has no NVIDIA GPU (nvidia-smi found none)"
        return f"needs tensorrt-llm 1.2.x ({TRTLLM_INSTALL}) {where}{gpu_note}; {pin_note}"
    if not str(trtllm).startswith("1."):
        return f"tensorrt-llm {trtllm} is installed but engines need 1.x ({TRTLLM_INSTALL}) {where}; {pin_note}"
    if not gpus:
        return f"no NVIDIA GPU here (nvidia-smi found none): an engine is built on the GPU model it runs on; run quantforge build {where} with tensorrt-llm {trtllm}"
    problem = settings.device_problem(gpus[0][1], len(gpus))
    if problem:
        return f"{problem} ({gpus[0][0]}); build this engine on a suitable GPU"
    return None


def device_fingerprint(gpus=None) -> str | None:
    gpus = detect_gpus() if gpus is None else gpus
    if not gpus:
        return None
    name, (major, minor) = gpus[0]
    return f"{name}|cc{major}.{minor}|x{len(gpus)}|tensorrt {tensorrt_version()}|tensorrt-llm {trtllm_version()}"


# ----------------------------------------------------------------------- helpers
def _calibration_ids(out):
    """input_ids [samples, seq_len] of the calibration stage's output."""
    from pipeline.data.calibration import load_calibration

    return load_calibration(out.path).input_ids


def _source_config(ctx) -> dict | None:
    try:
        from pipeline.sources import peek_source_config
    except ImportError:
        return None
    try:
        return peek_source_config(ctx.loaded)
    except InvalidInput:  # the recipe loader reports source problems itself
        return None


def _quant_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------- run fns
def run_checkpoint(ctx: StageContext, *, quant: str, kv_cache_quant: str | None, dtype: str, seq_len: int, check_text: str) -> dict:
    from pipeline.targets.tensorrt import checkpoint as mc

    source = ctx.inputs["source"].model_dir
    calib = _calibration_ids(ctx.inputs["calibration"])
    device = _quant_device()
    if quant == "nvfp4" and device != "cuda":
        raise StageFailed("NVFP4 quantization needs a CUDA GPU (ModelOpt's NVFP4 forward has no CPU path)")
    return mc.build_checkpoint(source, ctx.out_dir, quant=quant, kv_cache_quant=kv_cache_quant, calib_ids=calib,
                               dtype=dtype, device=device, check_text=check_text, seq_len=seq_len, log=ctx.log)


def run_trtllm_checkpoint(ctx: StageContext, *, settings_dict: dict, dtype: str) -> dict:
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    from pipeline.targets.tensorrt import checkpoint as mc

    quant, kv = settings_dict["quant"], ("fp8" if settings_dict["kv_cache_quant_algo"] == "FP8" else None)
    source = ctx.inputs["source"].model_dir
    device = _quant_device()
    if quant == "nvfp4" and device != "cuda":
        raise StageFailed("NVFP4 quantization needs a CUDA GPU")
    model = mc.load_source_model(source, dtype, device)
    facts: dict = {"device": device}
    if quant != "none":
        facts.update(mc.quantize_model(model, quant, kv, _calibration_ids(ctx.inputs["calibration"]), log=ctx.log))
    decoder = get_model_type(model)
    if decoder is None:
        raise StageFailed(f"ModelOpt cannot export {type(model).__name__} to a TensorRT-LLM checkpoint (no decoder type)")
    torch_dtype = torch.float16 if settings_dict["dtype"] == "float16" else getattr(torch, dtype)
    export_tensorrt_llm_checkpoint(model, decoder, dtype=torch_dtype, export_dir=str(ctx.out_dir),
                                   inference_tensor_parallel=settings_dict["tp_size"],
                                   inference_pipeline_parallel=settings_dict["pp_size"])
    facts["rope_patched"] = patch_rope(Path(ctx.out_dir), json.loads((Path(source) / "config.json").read_text()))
    facts.update(verify_trtllm_checkpoint(Path(ctx.out_dir), settings_dict))
    facts["decoder_type"] = decoder
    ctx.log(f"TensorRT-LLM checkpoint ({decoder}, {facts['quant_algo']}, tp{settings_dict['tp_size']} pp{settings_dict['pp_size']}) written")
    return facts


def patch_rope(folder: Path, source_config: dict) -> dict:
    """Carry RoPE settings that ModelOpt 0.47 misses under transformers 5 into the checkpoint.

    transformers 5 moved ``rope_theta`` / ``rope_scaling`` into ``config.rope_parameters``;
    ModelOpt reads ``rope_theta`` as a top-level attribute (modelopt/torch/export/hf_config_map.py)
    and otherwise writes no ``rotary_base``, so TensorRT-LLM would fall back to 10000 -- wrong
    for Llama 3 (500000). Returns what was changed.
    """
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rp = dict(source_config.get("rope_parameters") or source_config.get("rope_scaling") or {})
    theta = rp.get("rope_theta", source_config.get("rope_theta"))
    changed = {}
    if theta is not None and cfg.get("rotary_base") != theta:
        cfg["rotary_base"] = changed["rotary_base"] = theta
    rtype = rp.get("rope_type") or rp.get("type")
    if rtype and rtype != "default" and not cfg.get("rotary_scaling"):
        scaling = {"type": rtype, **{k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type", "type")}}
        cfg["rotary_scaling"] = changed["rotary_scaling"] = scaling
    if changed:
        cfg_path.write_text(json.dumps(cfg, indent=4))
    return changed


def verify_trtllm_checkpoint(folder: Path, settings_dict: dict) -> dict:
    """config.json says the requested quantization and mapping; one safetensors per rank."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise StageFailed(f"{folder}: export wrote no config.json")
    cfg = json.loads(cfg_path.read_text())
    q = cfg.get("quantization") or {}
    mapping = cfg.get("mapping") or {}
    problems = []
    if q.get("quant_algo") != settings_dict["quant_algo"]:
        problems.append(f"quantization.quant_algo {q.get('quant_algo')!r} != {settings_dict['quant_algo']!r}")
    if q.get("kv_cache_quant_algo") != settings_dict["kv_cache_quant_algo"]:
        problems.append(f"quantization.kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r} != {settings_dict['kv_cache_quant_algo']!r}")
    if settings_dict.get("group_size") and settings_dict["quant"] == "int4_awq" and q.get("group_size") != settings_dict["group_size"]:
        problems.append(f"quantization.group_size {q.get('group_size')!r} != {settings_dict['group_size']}")
    for key in ("tp_size", "pp_size"):
        if mapping.get(key) != settings_dict[key]:
            problems.append(f"mapping.{key} {mapping.get(key)!r} != {settings_dict[key]}")
    world = settings_dict["tp_size"] * settings_dict["pp_size"]
    ranks = sorted(p.name for p in folder.glob("rank*.safetensors"))
    if len(ranks) != world:
        problems.append(f"{len(ranks)} rank files for world size {world}: {ranks}")
    if problems:
        raise StageFailed(f"TensorRT-LLM checkpoint {folder} does not match the build settings: " + "; ".join(problems))
    return {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
            "architecture": cfg.get("architecture"), "dtype": cfg.get("dtype"), "ranks": ranks}


# Child-process smoke test: load the engine with the LLM API's TensorRT backend and generate.
def run_engine(ctx: StageContext, *, settings_dict: dict) -> dict:
    import tempfile
    import time

    from pipeline.core.proc import call, run_tool
    from pipeline.targets.tensorrt.checkpoint import copy_tokenizer
    from pipeline.targets.tensorrt.settings import TrtBuildSettings

    settings = TrtBuildSettings(**{**settings_dict, "notes": tuple(settings_dict.get("notes", ()))})
    ckpt = ctx.inputs["trtllm_checkpoint"].path
    args = settings.trtllm_build_args(str(ckpt), str(ctx.out_dir))
    exe = shutil.which("trtllm-build") or shutil.which("trtllm-build", path=str(Path(sys.executable).parent))
    # trtllm-build is the console script of tensorrt_llm.commands.build:main.
    args = [exe, *args[1:]] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build", *args[1:]]
    ctx.log("running " + " ".join(args))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # trtllm-build writes its timing cache to the cwd
        output = run_tool(args, what="trtllm-build", cwd=scratch)
    secs = time.perf_counter() - t0
    (Path(ctx.out_dir) / "build.log").write_text(output)
    cfg_path = Path(ctx.out_dir) / "config.json"
    engines = sorted(p.name for p in Path(ctx.out_dir).glob("rank*.engine"))
    if not cfg_path.is_file() or len(engines) != settings.world_size:
        raise StageFailed(f"trtllm-build wrote {engines} and {'a' if cfg_path.is_file() else 'no'} config.json; expected {settings.world_size} rank engines")
    cfg = json.loads(cfg_path.read_text())
    q = (cfg.get("pretrained_config") or {}).get("quantization") or {}
    build = cfg.get("build_config") or {}
    problems = []
    if q.get("quant_algo") != settings.quant_algo:
        problems.append(f"engine quant_algo {q.get('quant_algo')!r} != {settings.quant_algo!r}")
    for key in ("max_batch_size", "max_seq_len"):
        if build.get(key) != getattr(settings, key):
            problems.append(f"engine build_config.{key} {build.get(key)!r} != {getattr(settings, key)}")
    if problems:
        raise StageFailed("engine does not match the build settings: " + "; ".join(problems))
    copy_tokenizer(ctx.inputs["source"].model_dir, ctx.out_dir)
    sample = call("pipeline.targets.tensorrt.smoke", {"engine_dir": str(ctx.out_dir)},
                  what="the engine's load-and-generate check in TensorRT-LLM's TensorRT backend")
    (Path(ctx.out_dir) / "README.md").write_text(
        f"# TensorRT-LLM engine ({settings.quant_algo or 'unquantized'})\n\n"
        f"Built by trtllm-build (tensorrt-llm {trtllm_version()}, TensorRT {tensorrt_version()}) on {device_fingerprint()}.\n"
        "Runs only on that GPU model with those versions. Load with\n"
        "`from tensorrt_llm._tensorrt_engine import LLM; LLM(model=\"<this folder>\")`.\n\n"
        f"Build settings:\n```json\n{json.dumps(settings.to_dict(), indent=2)}\n```\n")
    ctx.log(f"engine built in {secs:.0f}s: {engines}; sample {sample['text']!r}")
    return {"build_seconds": round(secs, 1), "engines": engines, "engine_bytes": sum((Path(ctx.out_dir) / e).stat().st_size for e in engines),
            "build_config": {k: build.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")},
            "smoke_generation": sample, "device": device_fingerprint()}


# ------------------------------------------------------------------------- plan
def plan_stages(target, ctx) -> list[Stage]:
    from pipeline.targets.tensorrt.checkpoint import MODELOPT_CONFIGS
    from pipeline.targets.tensorrt.settings import build_settings

    recipe = ctx.recipe
    dtype = recipe.source.dtype
    model_config = _source_config(ctx)
    settings = build_settings(target, model_config, dtype=dtype)  # InvalidInput on bad tp, lengths, widths
    inputs = {"source": ctx.source_stage}
    if target.quant != "none":
        inputs["calibration"] = ctx.calibration_stage
    nvfp4_skip = None
    if target.quant == "nvfp4" and not torch_cuda_available():
        nvfp4_skip = ("NVFP4 needs a CUDA GPU: ModelOpt's NVFP4 quantized forward has no CPU path "
                      "(\"amax must be a CUDA tensor\"); run quantforge build on a machine with an NVIDIA GPU "
                      "and a CUDA build of torch (the checkpoint itself runs natively on Blackwell, cc >= 10.0)")
    stages: list[Stage] = []
    if target.output in ("checkpoint", "both") and target.quant != "none":
        seq_len = recipe.evals.context
        stages.append(Stage(
            name=f"{target.name}/checkpoint",
            kind="modelopt-checkpoint",
            version=CHECKPOINT_VERSION,
            params={"quant": target.quant, "kv_cache_quant": target.kv_cache_quant, "dtype": dtype,
                    "modelopt_config": MODELOPT_CONFIGS[target.quant], "verify_seq_len": seq_len,
                    "check_text_sha256": hashlib.sha256(ctx.check_text.encode()).hexdigest()},
            inputs=dict(inputs),
            tools=tool_versions(*MODELOPT_TOOLS),
            target=target.name,
            artifact=ArtifactInfo(name=target.name, target=target.name, kind="tensorrt-checkpoint",
                                  variant=settings.quant_algo,
                                  format=f"modelopt hf {settings.quant_algo}" + (" + FP8 KV" if target.kv_cache_quant else ""),
                                  runtimes=("tensorrt-llm-pytorch", "vllm", "sglang"),
                                  bits=BITS[target.quant], group_size=settings.group_size),
            run=functools.partial(run_checkpoint, quant=target.quant, kv_cache_quant=target.kv_cache_quant,
                                  dtype=dtype, seq_len=seq_len, check_text=ctx.check_text),
            skip_reason=nvfp4_skip,
            description=f"ModelOpt {settings.quant_algo} checkpoint (HF layout), verified by dequantized read-back",
        ))
    if target.output in ("engine", "both"):
        eskip = engine_skip_reason(settings)
        sd = settings.to_dict()
        ckpt_name = f"{target.name}/trtllm-checkpoint"
        stages.append(Stage(
            name=ckpt_name,
            kind="trtllm-checkpoint",
            version=TRTLLM_CHECKPOINT_VERSION,
            params={"settings": {k: sd[k] for k in ("quant", "quant_algo", "kv_cache_quant_algo", "group_size", "tp_size", "pp_size", "dtype")}},
            inputs=dict(inputs),
            tools=tool_versions(*MODELOPT_TOOLS),
            target=target.name,
            run=functools.partial(run_trtllm_checkpoint, settings_dict=sd, dtype=dtype),
            skip_reason=nvfp4_skip or (f"feeds only the engine stage, which cannot run here: {eskip}" if eskip else None),
            description="ModelOpt export_tensorrt_llm_checkpoint (input of trtllm-build)",
        ))
        stages.append(Stage(
            name=f"{target.name}/engine",
            kind="trtllm-engine",
            version=ENGINE_VERSION,
            params={"build": settings.build_config(), "quant_algo": settings.quant_algo,
                    "kv_cache_quant_algo": settings.kv_cache_quant_algo, "tp_size": settings.tp_size,
                    "pp_size": settings.pp_size, "trtllm_build_flags": ["--gemm_plugin", "auto"]},
            inputs={"trtllm_checkpoint": ckpt_name, "source": ctx.source_stage},
            tools=tool_versions("tensorrt_llm", "tensorrt"),
            device_fingerprint=device_fingerprint(),
            target=target.name,
            artifact=ArtifactInfo(name=f"{target.name}-engine", target=target.name, kind="tensorrt-engine",
                                  variant=settings.quant_algo, format=f"tensorrt-llm engine {settings.quant_algo or 'bf16'}",
                                  runtimes=("tensorrt-llm",), bits=BITS[target.quant], group_size=settings.group_size),
            run=functools.partial(run_engine, settings_dict=sd),
            skip_reason=eskip,
            description="trtllm-build engine for this GPU model and TensorRT/TensorRT-LLM versions",
        ))
    return stages
