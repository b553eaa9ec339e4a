"""Recipe `tensorrt` target -> TensorRT-LLM 1.2.x engine build settings (pure; no tensorrt_llm import).

Two equivalent outputs, both from :func:`build_settings`:

* ``trtllm_build_args(checkpoint_dir, output_dir)``: the ``trtllm-build`` command line
  (tensorrt_llm/commands/build.py: ``--checkpoint_dir --output_dir --max_batch_size
  --max_input_len --max_seq_len --max_num_tokens --workers`` and the plugin flags of
  tensorrt_llm/plugin/plugin.py such as ``--gemm_plugin``). trtllm-build takes no
  quantization or parallelism flags: it reads ``quantization.quant_algo``,
  ``quantization.kv_cache_quant_algo`` and ``mapping`` (tp_size, pp_size) from the
  TensorRT-LLM checkpoint's config.json (build.py: ``PretrainedConfig.from_json_file``,
  ``model_config.quantization.quant_algo``). That checkpoint is written by ModelOpt's
  ``export_tensorrt_llm_checkpoint(model, decoder_type, inference_tensor_parallel=tp,
  inference_pipeline_parallel=pp)`` -- ``export_kwargs()``.
* ``llm_api_kwargs()``: the LLM API form, ``BuildConfig(**build_config)`` and
  ``QuantConfig(quant_algo=QuantAlgo[...], kv_cache_quant_algo=QuantAlgo[...])`` plus
  ``tensor_parallel_size`` / ``pipeline_parallel_size`` (tensorrt_llm/llmapi/llm_args.py,
  tensorrt_llm/builder.py ``BuildConfig``), for ``tensorrt_llm._tensorrt_engine.LLM``.

Quant algorithm names are TensorRT-LLM's ``QuantAlgo`` members
(tensorrt_llm/quantization/mode.py) -- the same strings ModelOpt writes into
hf_quant_config.json (modelopt/torch/export/quant_utils.py ``process_layer_quant_config``).

Checks follow what TensorRT-LLM and ModelOpt enforce or silently change:

* ``max_input_len <= max_seq_len`` (builder.py ``_init_max_seq_len`` clips otherwise).
* ``max_num_tokens`` is clipped to ``max_batch_size * max_seq_len``
  (``check_max_num_tokens``, tensorrt_llm/_common.py); we clip too and say so, so the
  recorded settings are the ones the engine really has. Values above 16384 are warned
  about there; we note it. ``max_num_tokens < max_batch_size`` is refused: in-flight
  batching puts one token per generating request into a step, so a full batch could never
  be scheduled. ``max_num_tokens < max_input_len`` needs chunked context at run time (note).
* tensor parallelism: ``num_attention_heads % tp == 0``; KV heads either split
  (``num_key_value_heads % tp == 0``) or are duplicated when tp is larger, which ModelOpt's
  export asserts as ``tp % num_kv_heads == 0`` (modelopt/torch/export/layer_utils.py
  ``dup_kv_weight``). pipeline parallelism: at least one layer per stage.
* INT4-AWQ packs groups of 128 input columns (modelopt INT4_AWQ_CFG block size 128;
  ``_validate_int4_block_size`` in quant_utils.py): every Linear input width, divided by tp
  for the row-parallel o_proj/down_proj, must be a multiple of 128. NVFP4 needs multiples
  of 16 (its block).
* Device floors (``min_compute_capability``): FP8 needs Ada/Hopper or newer (8.9);
  NVFP4 needs Blackwell (10.0); INT4/INT8 weight-only engines are refused on SM 10.x
  (builder.py ``build``: "INT8/INT4 quantization is not supported on SM>=100");
  TensorRT-LLM 1.x needs Ampere (8.0) at least.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import InvalidInput

QUANT_ALGO = {"fp8": "FP8", "int4_awq": "W4A16_AWQ", "nvfp4": "NVFP4", "none": None}
KV_CACHE_QUANT_ALGO = {"fp8": "FP8", None: None}
GROUP_SIZE = {"int4_awq": 128, "nvfp4": 16}
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9), "int4_awq": (8, 0), "nvfp4": (10, 0), "none": (8, 0)}
# Compute capabilities [lo, hi) on which TensorRT-LLM refuses an engine of that quant.
REFUSED_COMPUTE_CAPABILITY = {"int4_awq": ((10, 0), (12, 0))}
MAX_NUM_TOKENS_ADVISED = 16384  # _common.py check_max_num_tokens warns above this


@dataclass(frozen=True)
class TrtBuildSettings:
    quant: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int | None
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    tp_size: int
    pp_size: int
    dtype: str = "bfloat16"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def min_compute_capability(self) -> tuple[int, int]:
        return MIN_COMPUTE_CAPABILITY[self.quant]

    def device_problem(self, compute_capability: tuple[int, int], gpu_count: int) -> str | None:
        """Why an engine with these settings cannot be built on this device, or None."""
        need = self.min_compute_capability
        if tuple(compute_capability) < need:
            return (f"{self.quant_algo or 'unquantized'} engines need compute capability >= {need[0]}.{need[1]}; "
                    f"this GPU has {compute_capability[0]}.{compute_capability[1]}")
        refused = REFUSED_COMPUTE_CAPABILITY.get(self.quant)
        if refused and refused[0] <= tuple(compute_capability) < refused[1]:
            return (f"TensorRT-LLM refuses {self.quant_algo} engines on compute capability "
                    f"{compute_capability[0]}.{compute_capability[1]} (INT4/INT8 weight-only is not supported on SM>=100)")
        if gpu_count < self.world_size:
            return f"tp_size*pp_size = {self.world_size} needs {self.world_size} GPUs; this machine has {gpu_count}"
        return None

    def build_config(self) -> dict[str, int]:
        return {"max_batch_size": self.max_batch_size, "max_input_len": self.max_input_len,
                "max_seq_len": self.max_seq_len, "max_num_tokens": self.max_num_tokens}

    def trtllm_build_args(self, checkpoint_dir: str, output_dir: str) -> list[str]:
        args = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
        for key, value in self.build_config().items():
            args += [f"--{key}", str(value)]
        # gemm_plugin auto: the plugin dtype follows the checkpoint dtype (plugin.py).
        args += ["--gemm_plugin", "auto", "--workers", str(self.world_size)]
        return args

    def quant_config(self) -> dict[str, Any]:
        """QuantConfig kwargs, algo names as QuantAlgo members."""
        out: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.group_size is not None and self.quant == "int4_awq":
            out["group_size"] = self.group_size
        return out

    def llm_api_kwargs(self) -> dict[str, Any]:
        return {"build_config": self.build_config(), "quant_config": self.quant_config(),
                "tensor_parallel_size": self.tp_size, "pipeline_parallel_size": self.pp_size}

    def export_kwargs(self) -> dict[str, int]:
        """Keyword arguments for modelopt's export_tensorrt_llm_checkpoint (its default
        inference_tensor_parallel=0 divides by zero on a single process)."""
        return {"inference_tensor_parallel": self.tp_size, "inference_pipeline_parallel": self.pp_size}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _width_problems(config: dict, quant: str, tp: int) -> list[str]:
    block = GROUP_SIZE.get(quant)
    if block is None:
        return []
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {}
    if hidden:
        widths["q/k/v/gate/up_proj input (hidden_size)"] = hidden  # column-parallel: full input
    if heads and head_dim:
        widths[f"o_proj input per rank (heads*head_dim/tp)"] = heads * head_dim // tp
    if inter:
        widths[f"down_proj input per rank (intermediate_size/tp)"] = inter // tp
    name = QUANT_ALGO[quant]
    return [f"{name} quantizes blocks of {block} input columns, but {label} is {w}: not a multiple of {block}"
            for label, w in widths.items() if w % block]


def build_settings(target, model_config: dict | None = None, dtype: str = "bfloat16") -> TrtBuildSettings:
    """Translate a TensorRtTarget (+ the source model's config.json dict) into build settings.

    Raises InvalidInput listing every problem; recoverable oddities go to ``notes``.
    """
    problems, settings = _settings(target, model_config, dtype)
    if problems:
        raise InvalidInput(f"target {target.name!r} (tensorrt): " + "; ".join(problems))
    return settings


def settings_problems(target, model_config: dict | None = None, dtype: str = "bfloat16") -> list[str]:
    """Every reason these settings cannot build (empty when they can): the recipe's static check."""
    return _settings(target, model_config, dtype)[0]


def _settings(target, model_config: dict | None, dtype: str) -> tuple[list[str], TrtBuildSettings]:
    problems: list[str] = []
    notes: list[str] = []
    quant = target.quant
    tp, pp = target.tp_size, target.pp_size
    if target.max_input_len > target.max_seq_len:
        problems.append(f"max_input_len ({target.max_input_len}) exceeds max_seq_len ({target.max_seq_len})")
    if target.max_num_tokens < target.max_batch_size:
        problems.append(f"max_num_tokens ({target.max_num_tokens}) is below max_batch_size ({target.max_batch_size}): "
                        "each generating request needs a token per step, so a full batch could never run")
    max_num_tokens = target.max_num_tokens
    ceiling = target.max_batch_size * target.max_seq_len
    if max_num_tokens > ceiling:
        notes.append(f"max_num_tokens {max_num_tokens} clipped to max_batch_size*max_seq_len = {ceiling}, as TensorRT-LLM does")
        max_num_tokens = ceiling
    if max_num_tokens > MAX_NUM_TOKENS_ADVISED:
        notes.append(f"max_num_tokens {max_num_tokens} > {MAX_NUM_TOKENS_ADVISED}: TensorRT-LLM advises against it (no gain, may exceed tensor volume)")
    if max_num_tokens < target.max_input_len:
        notes.append(f"max_num_tokens {max_num_tokens} < max_input_len {target.max_input_len}: prompts that long need enable_chunked_prefill at run time")
    if target.kv_cache_quant and quant == "none":
        problems.append("kv_cache_quant fp8 needs a weight quant (fp8, int4_awq or nvfp4): KV scales are calibrated with it")

    if model_config:
        heads = model_config.get("num_attention_heads")
        kv_heads = model_config.get("num_key_value_heads") or heads
        layers = model_config.get("num_hidden_layers")
        if heads and heads % tp:
            problems.append(f"tp_size {tp} does not divide num_attention_heads {heads}")
        if kv_heads and kv_heads % tp and tp % kv_heads:
            problems.append(f"tp_size {tp} and num_key_value_heads {kv_heads}: KV heads can be split only if tp divides them, "
                            "or duplicated only if they divide tp")
        if layers and pp > layers:
            problems.append(f"pp_size {pp} exceeds num_hidden_layers {layers}")
        problems += _width_problems(model_config, quant, tp)
        src_dtype = model_config.get("dtype") or model_config.get("torch_dtype")
        if dtype == "float32":
            notes.append("TensorRT-LLM engines use bfloat16/float16 activations; float32 source exported as float16 (ModelOpt's default)")
            dtype = "float16"
        elif src_dtype and src_dtype != dtype:
            notes.append(f"source weights are {src_dtype}; quantized in {dtype}")
    return problems, TrtBuildSettings(
        quant=quant,
        quant_algo=QUANT_ALGO[quant],
        kv_cache_quant_algo=KV_CACHE_QUANT_ALGO[target.kv_cache_quant],
        group_size=GROUP_SIZE.get(quant),
        max_batch_size=target.max_batch_size,
        max_input_len=target.max_input_len,
        max_seq_len=target.max_seq_len,
        max_num_tokens=max_num_tokens,
        tp_size=tp,
        pp_size=pp,
        dtype=dtype,
        notes=tuple(notes),
    )
