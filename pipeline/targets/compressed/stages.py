"""Shared code of the llm-compressor targets (gptq, awq, autoround, fp8).

One stage per target: load the source model on CPU in the recipe's dtype, check
what can be checked before spending minutes (group sizes, AWQ mappings), run
llm-compressor's ``oneshot`` with modifiers translated from the recipe, save a
compressed-tensors checkpoint (weights, config, tokenizer, generation config,
``recipe.yaml``, model card), then verify it in a fresh process
(:mod:`pipeline.targets.compressed.verify`). A failed check raises
:class:`StageFailed`, so the runner keeps nothing.

The stage's params hold the target's whole config (minus its name and gates) and
the source dtype; the run function rebuilds the target from them, so nothing
that shapes the output can be missing from the cache key.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import InvalidInput, StageFailed
from pipeline.targets.compressed import AutoRoundTarget, AwqTarget, Fp8Target, GptqSettings, GptqTarget
from pipeline.core.stage import ArtifactInfo, Stage, StageContext, tool_versions

# Bump when the same inputs would give a different output (e.g. a changed card or layout).
STAGE_VERSION = "3"
TOOLS = ("transformers", "llmcompressor", "compressed-tensors", "torch")
RUNTIMES = ("vllm", "sglang", "transformers")
TARGET_CLASSES = {"gptq": GptqTarget, "awq": AwqTarget, "autoround": AutoRoundTarget, "fp8": Fp8Target}
FP8_PRESETS = {"dynamic": "FP8_DYNAMIC", "static": "FP8", "block": "FP8_BLOCK"}
VERIFY_TIMEOUT_S = 3600
VERIFY_MODULE = "pipeline.targets.compressed.verify"

AWQ_MAPPINGS_EXAMPLE = """\
    mappings:
      - smooth_layer: "re:.*input_layernorm$"
        balance_layers: ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
      - smooth_layer: "re:.*post_attention_layernorm$"
        balance_layers: ["re:.*gate_proj$", "re:.*up_proj$"]
      - smooth_layer: "re:.*up_proj$"
        balance_layers: ["re:.*down_proj$"]"""


# ------------------------------------------------------------------ planning
def stage_params(target, dtype: str) -> dict[str, Any]:
    """Everything that changes the output: the target's config and the source dtype."""
    return {
        "target": target.model_dump(mode="json", exclude={"name", "gates"}),
        "dtype": dtype,
    }


def target_from_params(name: str, params: dict) -> GptqTarget | AwqTarget | AutoRoundTarget | Fp8Target:
    config = params["target"]
    return TARGET_CLASSES[config["kind"]].model_validate({**config, "name": name})


def scheme_label(target) -> str:
    """Short human name of the scheme, e.g. ``W4A16 group 128`` or ``FP8 dynamic``."""
    if isinstance(target, Fp8Target):
        return f"FP8 {target.scheme}" + (" + FP8 KV cache" if target.kv_cache else "")
    sym = "" if target.symmetric else " asym"
    group = "per-channel" if target.group_size == "channel" else f"group {target.group_size}"
    return f"W{target.bits}A16{sym}, {group}"


def method_label(target) -> str:
    """The quantizer and its non-default levers, e.g. ``GPTQ (actorder weight, mse observer)``."""
    levers = []
    gptq = target if isinstance(target, GptqTarget) else getattr(target, "gptq", None)
    if isinstance(target, AwqTarget):
        name = "AWQ+GPTQ" if gptq is not None else "AWQ"
        if target.duo_scaling is not True:
            levers.append(f"duo_scaling {target.duo_scaling}")
    else:
        name = "AutoRound" if isinstance(target, AutoRoundTarget) else "GPTQ"
    if isinstance(target, AutoRoundTarget):
        levers.append(f"{target.iters} iters")
    if gptq is not None and gptq.actorder != "none":
        levers.append(f"actorder {gptq.actorder}")
    if getattr(target, "observer", "minmax") != "minmax":
        levers.append(f"{target.observer} observer")
    return name + (f" ({', '.join(levers)})" if levers else "")


def storage_format(target) -> str:
    """compressed-tensors' on-disk format name, as it writes into config.json.

    Predicted at plan time for report.json; the verifier checks the real one.
    """
    if isinstance(target, Fp8Target):
        return "float-quantized"
    return "pack-quantized"


def artifact_info(target) -> ArtifactInfo:
    bits = 8 if isinstance(target, Fp8Target) else target.bits
    group = None if isinstance(target, Fp8Target) else target.group_size
    if isinstance(target, Fp8Target) and target.scheme == "block":
        group = "block 128x128"
    return ArtifactInfo(
        name=target.name,
        target=target.name,
        kind=target.kind,
        format=f"compressed-tensors {storage_format(target)} ({scheme_label(target)})",
        runtimes=RUNTIMES,
        bits=bits,
        group_size=group,
    )


def plan_compressed_stage(target, ctx) -> list[Stage]:
    """The one stage of a gptq/awq/fp8 target."""
    inputs = {"source": ctx.source_stage}
    if target.needs_calibration():
        inputs["calibration"] = ctx.calibration_stage
    return [
        Stage(
            name=f"{target.name}/quantize",
            kind=f"llmc-{target.kind}",
            version=STAGE_VERSION,
            params=stage_params(target, ctx.recipe.source.dtype),
            run=run_compressed_stage,
            inputs=inputs,
            tools=tool_versions(*TOOLS),
            target=target.name,
            artifact=artifact_info(target),
            description=(scheme_label(target) if target.kind == "fp8" else f"{method_label(target)} {scheme_label(target)}") + " with llm-compressor",
        )
    ]


# ------------------------------------------------------- recipe -> modifiers
def weight_args(bits: int, group_size, symmetric: bool, observer: str = "minmax"):
    """compressed-tensors QuantizationArgs for integer weights (`observer`: llm-compressor's registry name)."""
    from compressed_tensors.quantization import QuantizationArgs

    common = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "observer": observer}
    if group_size == "channel":
        return QuantizationArgs(strategy="channel", **common)
    return QuantizationArgs(strategy="group", group_size=group_size, **common)


def int_scheme(target):
    """A weight-only integer QuantizationScheme for all Linear layers."""
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=weight_args(target.bits, target.group_size, target.symmetric, target.observer))


def gptq_modifier(target, settings: GptqSettings):
    """llm-compressor's GPTQModifier with the recipe's levers.

    ``actorder: none`` is passed as None explicitly: llm-compressor would otherwise
    default to ``static``. ``weight``/``static`` order columns by activation size during
    calibration only: the stored format is unchanged (no g_idx), so runtimes keep their
    fast kernels.
    """
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(
        config_groups={"group_0": int_scheme(target)},
        ignore=list(target.ignore),
        dampening_frac=settings.dampening_frac,
        block_size=settings.block_size,
        actorder=None if settings.actorder == "none" else settings.actorder,
    )


def kv_cache_args():
    """FP8 (e4m3) per-tensor static scales for keys and values, as vLLM reads them."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def awq_mappings(target: AwqTarget):
    """The recipe's mapping override as llm-compressor AWQMapping objects (None: infer)."""
    if target.mappings is None:
        return None
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    return [AWQMapping(m.smooth_layer, list(m.balance_layers)) for m in target.mappings]


def build_modifiers(target) -> list:
    """llm-compressor modifiers for one target (the recipe it runs)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    ignore = list(target.ignore)
    if isinstance(target, GptqTarget):
        return [gptq_modifier(target, target)]
    if isinstance(target, AwqTarget):
        from llmcompressor.modifiers.transform.awq import AWQModifier

        awq_kwargs: dict[str, Any] = {"n_grid": target.n_grid, "duo_scaling": target.duo_scaling}
        if target.mappings:
            awq_kwargs["mappings"] = awq_mappings(target)
        # AWQ is a transform in llm-compressor 0.14: it rescales channels against the scheme
        # of the quantization modifier that follows it, which then rounds (RTN) or runs GPTQ.
        quantizer = gptq_modifier(target, target.gptq) if target.gptq is not None else QuantizationModifier(config_groups={"group_0": int_scheme(target)}, ignore=ignore)
        return [AWQModifier(**awq_kwargs), quantizer]
    if isinstance(target, AutoRoundTarget):
        import torch
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return [
            AutoRoundModifier(
                config_groups={"group_0": int_scheme(target)},
                ignore=ignore,
                iters=target.iters,
                lr=target.lr,
                batch_size=target.batch_size,
                # torch.compile only pays off on an accelerator; on CPU it costs a C++ build per block.
                enable_torch_compile=torch.accelerator.is_available(),
            )
        ]
    if isinstance(target, Fp8Target):
        return [
            QuantizationModifier(
                targets=["Linear"],
                scheme=FP8_PRESETS[target.scheme],
                ignore=ignore,
                kv_cache_scheme=kv_cache_args() if target.kv_cache else None,
            )
        ]
    raise TypeError(f"not an llm-compressor target: {type(target).__name__}")


# ------------------------------------------------------------- pre-checks
def quantized_linears(model, ignore: list[str]) -> list[tuple[str, Any]]:
    """(name, module) of every Linear llm-compressor will quantize (its own matcher)."""
    from compressed_tensors.utils import match_named_modules

    return list(match_named_modules(model, ["Linear"], ignore))


def check_group_size(model, target) -> None:
    """Fail before quantizing when a group size does not divide a layer's input width."""
    group = getattr(target, "group_size", None)
    if not isinstance(group, int):
        return
    bad = [(name, m.in_features) for name, m in quantized_linears(model, list(target.ignore)) if m.in_features % group]
    if not bad:
        return
    name, width = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise InvalidInput(
        f"target {target.name!r}: group_size {group} does not divide layer {name!r} "
        f"(input width {width}){more}; use a divisor of {width}, 'channel', "
        f"or add the layer to `ignore:`"
    )


def check_awq_mappings(model, target: AwqTarget) -> int:
    """Resolve AWQ's mappings on this model before running; return how many layer sets match.

    llm-compressor falls back to Llama-style default mappings for unknown classes,
    which then either match nothing (AWQ silently does no smoothing) or fail deep
    inside with "Found a final incomplete set". Both become one clear error here.
    """
    from compressed_tensors.utils import match_modules_set, match_named_modules
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

    cls = type(model).__name__
    user = target.mappings is not None
    mappings = awq_mappings(target) if user else get_layer_mappings_from_model(model)
    total, problems = 0, []
    for m in mappings:
        patterns = (m.smooth_layer, *m.balance_layers)
        missing = [p for p in patterns if next(match_named_modules(model, [p]), None) is None]
        if missing and (user or len(missing) < len(patterns)):
            problems.append(f"{m.smooth_layer} -> {m.balance_layers}: {', '.join(missing)} matches no layers of {cls}")
            continue
        if missing:  # an inferred mapping for layers this model lacks: nothing to smooth there
            continue
        try:
            total += sum(1 for _ in match_modules_set(model, patterns))
        except ValueError as exc:  # layers exist but do not pair up per block
            problems.append(f"{m.smooth_layer} -> {m.balance_layers}: {exc}")
    if problems or total == 0:
        origin = "the recipe's `mappings:`" if user else (
            f"llm-compressor's mappings for {cls}" if cls in AWQ_MAPPING_REGISTRY else f"llm-compressor's default (Llama-style) mappings: {cls} has no AWQ mapping in llm-compressor"
        )
        detail = "\n".join(f"  - {p}" for p in problems) or "  - no mapping matched any layer"
        raise InvalidInput(
            f"target {target.name!r}: AWQ cannot map the layers of {cls} with {origin}:\n{detail}\n"
            f"Give the target explicit mappings (the norm or layer whose output feeds each group of "
            f"Linear layers; names are module names or 're:' regexes), e.g. for a Llama-like model:\n"
            f"  - name: {target.name}\n    kind: awq\n{AWQ_MAPPINGS_EXAMPLE}"
        )
    return total


# ------------------------------------------------------------- workarounds
@contextlib.contextmanager
def awq_cpu_pin_memory_guard() -> Iterator[bool]:
    """Make AWQ run on a CPU-only torch (llm-compressor 0.14.0.1).

    Upstream: ``AWQModifier._apply_smoothing`` (modifiers/transform/awq/base.py) calls
    ``IntermediatesCache.pin_memory`` (pipelines/cache.py) on every cached batch,
    and ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is
    available" without an accelerator. Pinning only speeds host-to-GPU copies, so with
    no accelerator skipping it changes nothing. The patch replaces only that one method,
    only when no accelerator exists, only while this context is open. Yields whether it
    patched.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]

    def pin_memory_noop(self, batch_index, input_names=None) -> None:
        return None

    IntermediatesCache.pin_memory = pin_memory_noop
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


# ---------------------------------------------------------------- loading
def load_source_model(model_dir: Path, dtype: str):
    """The source model on CPU in the recipe's dtype; llm-compressor onloads layers itself."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), device_map=None)


def load_calibration_dataset(calibration_dir: Path):
    """Calibration samples as a ``datasets.Dataset`` (input_ids, attention_mask)."""
    from pipeline.data.calibration import load_calibration

    return load_calibration(calibration_dir).as_dataset()


# ------------------------------------------------------------------ oneshot
def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    # CPU allocation failures surface as a plain RuntimeError from c10's allocator.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def oom_message(stage_name: str, target, samples: int | None, seq_len: int | None, device: str) -> str:
    data = f"{samples} calibration samples x {seq_len} tokens" if samples else "no calibration data"
    knobs = [
        "fewer calibration samples (`calibration.samples`)",
        "shorter sequences (`calibration.seq_len`)",
        "a GPU: llm-compressor's sequential pipeline onloads one decoder layer at a time, so the model stays on CPU and only a layer and its activations need GPU memory",
    ]
    if device != "cpu":  # a torch device string here (the one the stage quantized on)
        knobs.append("a GPU with more memory, or fewer other jobs on it")
    return (
        f"stage {stage_name}: out of memory on {device} while quantizing the model to "
        f"{scheme_label(target)} ({target.kind}) with {data}. What helps: " + "; ".join(knobs) + "."
    )


def run_oneshot(model, modifiers: list, dataset, seq_len: int | None, patch_awq: bool) -> None:
    """llm-compressor's oneshot on an in-memory model; nothing is saved here."""
    from llmcompressor import oneshot

    kwargs: dict[str, Any] = {}
    if dataset is not None:
        # Samples are already drawn (seeded) and tokenized by the calibration stage:
        # use them all, in order.
        kwargs = {"dataset": dataset, "num_calibration_samples": len(dataset), "max_seq_length": seq_len, "shuffle_calibration_samples": False}
    guard = awq_cpu_pin_memory_guard() if patch_awq else contextlib.nullcontext()
    with guard:
        oneshot(model=model, recipe=modifiers, **kwargs)


# ------------------------------------------------------------------ saving
def save_artifact(model, source_dir: Path, out_dir: Path) -> None:
    """Compressed weights + config (+ recipe.yaml, written by llm-compressor's save hook), tokenizer, generation config."""
    import shutil

    from transformers import AutoTokenizer

    model.save_pretrained(str(out_dir), save_compressed=True)
    AutoTokenizer.from_pretrained(str(source_dir)).save_pretrained(str(out_dir))
    gen = Path(source_dir) / "generation_config.json"
    if gen.is_file() and not (out_dir / "generation_config.json").is_file():
        shutil.copy2(gen, out_dir / "generation_config.json")
    if not (out_dir / "recipe.yaml").is_file():
        raise StageFailed(f"llm-compressor did not write recipe.yaml into {out_dir}")


def model_card(target, model_class: str, dtype: str, source, quant_config: dict) -> str:
    """README.md: what was built from what, and how to download and serve it.

    ``source``: a :class:`pipeline.targets.cards.SourceIdentity` (no local paths). Measured results are not here: they belong to a recipe's evaluation
    (the registry's version description and report.html), this folder to every recipe that
    builds the same thing.
    """
    from pipeline.backends.model_card import card_data, hub_card
    from pipeline.targets.cards import usage_sections

    params = target.model_dump(mode="json", exclude={"name", "gates", "kind"})
    fmt = quant_config.get("format", storage_format(target))
    label = scheme_label(target)
    title = label if label.upper().startswith(target.kind.upper()) else f"{target.kind.upper()} {label}"  # "FP8 dynamic", "GPTQ W4A16, group 64"
    data = card_data(source, library_name="transformers", tags=["compressed-tensors", "llm-compressor", target.kind])
    lines = [
        f"# {source.name}: {title}",
        "",
        f"A [compressed-tensors](https://github.com/neuralmagic/compressed-tensors) checkpoint (`{fmt}`) "
        f"of {source.sentence()}, a {model_class} quantized from {dtype} "
        "with [llm-compressor](https://github.com/vllm-project/llm-compressor) by quantforge.",
        "",
        "## Source",
        *source.lines(),
        "",
        "## Quantization",
        f"- method: {target.kind}",
        f"- scheme: {scheme_label(target)}",
        f"- format: compressed-tensors `{fmt}`",
        f"- source dtype: {dtype}",
        "- parameters:",
        *[f"  - `{k}`: `{json.dumps(v)}`" for k, v in params.items()],
        "- the llm-compressor recipe that ran: `recipe.yaml`",
        "",
        *usage_sections(target.kind, model=target.name, notes=[
            "vLLM and SGLang run the quantized kernels on GPUs that have them. transformers loads the folder by "
            "decompressing it to dense weights (pass `quantization_config=CompressedTensorsConfig(dequantize=True)` "
            "to `from_pretrained` to be explicit): its accuracy is the quantized model's, its speed and memory are not."]),
        "",
    ]
    return hub_card(data, lines)


# ------------------------------------------------------------ verification
def verify_request(folder: Path, source_dir: Path, target, calibration_dir: Path | None, threads: int) -> dict:
    """The request of the verifier child (:mod:`pipeline.targets.compressed.verify`)."""
    fp8 = isinstance(target, Fp8Target)
    return {"folder": str(folder), "source": str(source_dir), "threads": threads, "ignore": list(target.ignore),
            "calibration": str(calibration_dir) if calibration_dir is not None else None,
            "expect_bits": 8 if fp8 else target.bits, "expect_type": "float" if fp8 else "int"}


def run_verification(request: dict, log) -> dict:
    """Run the verifier in a fresh process (it must see the folder as a user would); its report."""
    from pipeline.core.proc import call

    report = call(VERIFY_MODULE, request, what="verification", timeout=VERIFY_TIMEOUT_S)
    for problem in report.get("failures", []):
        log(f"verify: {problem}")
    return report


# ---------------------------------------------------------------- the stage
def quantize_to(out_dir: Path, target, source_dir: Path, dtype: str, calibration_dir: Path | None, stage_name: str, log) -> dict:
    """Load, check, quantize and save one target; return timing and placement facts."""
    from pipeline.core.placement import applied, choose_placement

    placement = choose_placement()
    facts: dict[str, Any] = {"placement": placement.as_dict()}
    with applied(placement):
        t0 = time.perf_counter()
        model = load_source_model(source_dir, dtype)
        facts["model_class"] = type(model).__name__
        check_group_size(model, target)
        if isinstance(target, AwqTarget):
            facts["awq_mapped_layer_sets"] = check_awq_mappings(model, target)
        dataset = load_calibration_dataset(calibration_dir) if calibration_dir is not None else None
        seq_len = len(dataset[0]["input_ids"]) if dataset is not None else None
        facts["calibration"] = {"samples": len(dataset), "seq_len": seq_len} if dataset is not None else None
        facts["load_s"] = round(time.perf_counter() - t0, 3)
        log(f"{stage_name}: quantizing {facts['model_class']} to {scheme_label(target)} on {placement.device} with {placement.threads} thread(s)")
        t1 = time.perf_counter()
        try:
            run_oneshot(model, build_modifiers(target), dataset, seq_len, patch_awq=isinstance(target, AwqTarget))
        except (InvalidInput, StageFailed):
            raise
        except BaseException as exc:
            if is_out_of_memory(exc):
                raise StageFailed(oom_message(stage_name, target, len(dataset) if dataset is not None else None, seq_len, placement.device)) from exc
            raise
        facts["quantize_s"] = round(time.perf_counter() - t1, 3)
        t2 = time.perf_counter()
        save_artifact(model, source_dir, out_dir)
        facts["save_s"] = round(time.perf_counter() - t2, 3)
    return facts


def run_compressed_stage(ctx: StageContext) -> dict:
    """The stage's run function (see module docstring)."""
    from pipeline.targets.cards import source_identity

    stage = ctx.stage
    target = target_from_params(stage.target or stage.name.split("/")[0], stage.params)
    dtype = stage.params["dtype"]
    source = ctx.inputs["source"]
    calibration = ctx.inputs.get("calibration")
    calibration_dir = calibration.path if calibration is not None else None
    out_dir = Path(ctx.out_dir)
    facts = quantize_to(out_dir, target, source.model_dir, dtype, calibration_dir, stage.name, ctx.log)
    config = json.loads((out_dir / "config.json").read_text())
    quant_config = config.get("quantization_config", {})
    (out_dir / "README.md").write_text(model_card(target, facts["model_class"], dtype, source_identity(source), quant_config))
    t = time.perf_counter()
    threads = facts["placement"]["threads"]
    report = run_verification(verify_request(out_dir, source.model_dir, target, calibration_dir, threads), ctx.log)
    facts["verify_s"] = round(time.perf_counter() - t, 3)
    if not report.get("ok"):
        raise StageFailed(f"stage {stage.name}: the saved checkpoint failed verification:\n" + "\n".join(f"  - {f}" for f in report.get("failures", [])))
    facts["format"] = quant_config.get("format")
    facts["verification"] = report
    return facts
