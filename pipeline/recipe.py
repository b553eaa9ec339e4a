"""The recipe: one YAML file that says what to build, evaluate and register.

The typed model *is* the config: unknown keys are errors, every value is checked,
and :func:`load_recipe` reports every problem at once, each with its YAML path
and line. A sample recipe::

    name: demo
    source: {model: builtin:tiny-llama, revision: main, dtype: bfloat16}
    calibration: {dataset: builtin, samples: 64, seq_len: 256}
    targets:
      - {name: w4a16-gptq, kind: gptq, bits: 4, group_size: 128}
      - {name: w4a16-awq,  kind: awq,  bits: 4, group_size: 128}
      - {name: fp8,        kind: fp8,  scheme: dynamic}
      - {name: gguf,       kind: gguf, quants: [Q8_0, Q4_K_M], imatrix: true}
      - {name: trt-fp8,    kind: tensorrt, quant: fp8}
    evals: {devices: [cpu]}
    gates: {max_perplexity_increase_pct: 5.0}
    registry: {model_name: demo}
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import InvalidInput, Problem

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------- source
class SourceSpec(Strict):
    """Where the unquantized model comes from.

    ``model`` is ``builtin:<variant>`` (a demo model the project trains), a local
    folder (absolute, or relative to the recipe file), or a hub id ``org/name``.
    """

    model: str
    revision: str = "main"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    license: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.model.startswith("builtin:")


# ---------------------------------------------------------------- calibration
class CalibrationSpec(Strict):
    """Text used to calibrate quantizers; tokenized once and shared by every target."""

    dataset: str = "builtin"
    split: str = "train"
    column: str = "text"
    samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(256, ge=8, le=131_072)
    seed: int = 0
    chat_template: bool = False


# -------------------------------------------------------------------- gates
class GateSpec(Strict):
    """Thresholds an artifact must meet on every required device to be promoted.

    ``None`` switches a check off.
    """

    max_perplexity_increase_pct: float | None = Field(5.0, ge=0)
    max_kl_divergence: float | None = Field(None, ge=0)
    min_top1_agreement_pct: float | None = Field(None, ge=0, le=100)
    min_decode_speedup: float | None = Field(None, gt=0)
    required_devices: list[str] | None = None


class GateOverride(Strict):
    """Per-target overrides of the recipe's gates; unset keys keep the recipe's value."""

    max_perplexity_increase_pct: float | None = Field(None, ge=0)
    max_kl_divergence: float | None = Field(None, ge=0)
    min_top1_agreement_pct: float | None = Field(None, ge=0, le=100)
    min_decode_speedup: float | None = Field(None, gt=0)


# ------------------------------------------------------------------ targets
GroupSize = Union[Annotated[int, Field(ge=1)], Literal["channel"]]


class TargetBase(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    gates: GateOverride | None = None

    #: Stays False for kinds whose every variant is calibration-free.
    def needs_calibration(self) -> bool:
        return True


class GptqTarget(TargetBase):
    """GPTQ weight-only quantization (W4A16 by default) through llm-compressor."""

    kind: Literal["gptq"]
    bits: Literal[4, 8] = 4
    group_size: GroupSize = 128
    symmetric: bool = True
    act_order: bool = False
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    ignore: list[str] = ["lm_head"]


class AwqMapping(Strict):
    """One AWQ smoothing step: scale ``smooth_layer``'s output, balance these inputs."""

    smooth_layer: str
    balance_layers: list[str] = Field(min_length=1)


class AwqTarget(TargetBase):
    """AWQ (activation-aware) weight-only quantization through llm-compressor."""

    kind: Literal["awq"]
    bits: Literal[4, 8] = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    ignore: list[str] = ["lm_head"]
    mappings: list[AwqMapping] | None = None
    #: Points in AWQ's per-layer scale search (llm-compressor's default 20); fewer is faster, coarser.
    n_grid: int = Field(20, ge=2, le=100)


class Fp8Target(TargetBase):
    """FP8 weights and activations (W8A8) through llm-compressor.

    ``dynamic``: per-token activation scales at run time, no data needed;
    ``static``: per-tensor activation scales calibrated on data;
    ``block``: 128x128 block weight scales (DeepSeek-style), dynamic activations.
    """

    kind: Literal["fp8"]
    scheme: Literal["dynamic", "static", "block"] = "dynamic"
    kv_cache: bool = False
    ignore: list[str] = ["lm_head"]

    def needs_calibration(self) -> bool:
        return self.scheme == "static" or self.kv_cache


class GgufTarget(TargetBase):
    """GGUF files for llama.cpp and Ollama: converted once, then quantized per type."""

    kind: Literal["gguf"]
    quants: list[str] = Field(min_length=1)
    imatrix: bool = False
    base_type: Literal["auto", "f32", "f16", "bf16"] = "auto"
    pre_tokenizer: str | None = None

    @field_validator("quants")
    @classmethod
    def _known_quant_types(cls, quants: list[str]) -> list[str]:
        known = gguf_quant_types()
        bad = [q for q in quants if q.upper() not in known]
        if bad:
            hints = []
            for q in bad:
                close = difflib.get_close_matches(q.upper(), sorted(known), n=1)
                hints.append(f"{q!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown llama.cpp quant type {', '.join(hints)}; known: {', '.join(sorted(known))}")
        upper = [q.upper() for q in quants]
        if len(set(upper)) != len(upper):
            raise ValueError("quant types repeat")
        return upper

    def needs_calibration(self) -> bool:
        return self.imatrix


class TensorRtTarget(TargetBase):
    """A ModelOpt-quantized checkpoint and, with tensorrt-llm 1.x on a GPU, an engine."""

    kind: Literal["tensorrt"]
    quant: Literal["fp8", "int4_awq", "nvfp4", "none"] = "fp8"
    kv_cache_quant: Literal["fp8"] | None = None
    output: Literal["checkpoint", "engine", "both"] = "both"
    max_batch_size: int = Field(8, ge=1)
    max_input_len: int = Field(1024, ge=1)
    max_seq_len: int = Field(2048, ge=1)
    max_num_tokens: int = Field(8192, ge=1)
    tp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)

    def needs_calibration(self) -> bool:
        return self.quant != "none"


Target = Annotated[
    Union[GptqTarget, AwqTarget, Fp8Target, GgufTarget, TensorRtTarget],
    Field(discriminator="kind"),
]
TARGET_KINDS = ("gptq", "awq", "fp8", "gguf", "tensorrt")


# -------------------------------------------------------------------- evals
class SpeedSpec(Strict):
    """How speed is measured: warm-up, then at least `min_iterations` and `min_seconds`."""

    prompt_lengths: list[int] = Field([64, 256], min_length=1)
    decode_tokens: int = Field(32, ge=1)
    batch_sizes: list[int] = Field([1], min_length=1)
    warmup: int = Field(1, ge=0)
    min_iterations: int = Field(3, ge=1)
    min_seconds: float = Field(1.0, ge=0)
    threads: int | None = Field(None, ge=1)


class EvalSpec(Strict):
    """Which devices evaluate the artifacts, and on what text."""

    devices: list[str] = Field(["cpu"], min_length=1)
    suite: str = "builtin"
    column: str = "text"
    context: int = Field(256, ge=16)
    max_windows: int = Field(32, ge=1)
    speed: SpeedSpec = SpeedSpec()
    tasks: list[str] = []

    @field_validator("devices")
    @classmethod
    def _device_names(cls, devices: list[str]) -> list[str]:
        for d in devices:
            if not re.match(NAME_PATTERN, d):
                raise ValueError(f"device {d!r} must match {NAME_PATTERN} (cpu, cuda, or a GPU class such as h100)")
        if len(set(devices)) != len(devices):
            raise ValueError("devices repeat")
        return devices


class RegistrySpec(Strict):
    """How artifacts appear in MLflow's model registry."""

    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    promotion_alias: str = Field("production", pattern=r"^[a-z][a-z0-9_-]*$")
    upload_max_mb: float = Field(2048, ge=0)
    tags: dict[str, str] = {}


# ------------------------------------------------------------------- recipe
class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    source: SourceSpec
    calibration: CalibrationSpec | None = None
    targets: list[Target] = Field(min_length=1)
    evals: EvalSpec = EvalSpec()
    gates: GateSpec = GateSpec()
    registry: RegistrySpec = RegistrySpec()

    def target(self, name: str):
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name

    def gates_for(self, target_name: str) -> GateSpec:
        """The recipe's gates with one target's overrides applied."""
        override = self.target(target_name).gates
        if override is None:
            return self.gates
        changes = override.model_dump(exclude_unset=True)
        return self.gates.model_copy(update=changes)

    def sha256(self) -> str:
        """Hash of the validated recipe (defaults filled in), so cosmetic YAML edits don't count."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


class LoadedRecipe(BaseModel):
    """A validated recipe with the file it came from (relative paths resolve against it)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    recipe: Recipe
    path: Path

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


# ----------------------------------------------------------- loading & checks
def gguf_quant_types() -> set[str]:
    """llama.cpp's file types, as mirrored by the gguf package (`LlamaFileType`)."""
    import gguf

    names = set()
    for member in gguf.LlamaFileType:
        if member.name == "GUESSED":
            continue
        names.add(member.name.removeprefix("MOSTLY_").removeprefix("ALL_"))
    return names


def line_index(text: str) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys/indices) to its 1-based line number."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index

    def walk(node, path):
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = (*path, key.value)
                index[k] = key.start_mark.line + 1
                walk(value, k)
                index[k] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return index


def _problem(file: str, loc: tuple, message: str, lines: dict[tuple, int]) -> Problem:
    line = None
    probe = tuple(loc)
    while probe and line is None:
        line = lines.get(probe)
        probe = probe[:-1]
    return Problem(file=file, path=".".join(str(p) for p in loc), message=message, line=line)


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's discriminator/union tags so a location is a real YAML path."""
    out: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in node and part in TARGET_KINDS + ("function-after",):
            continue  # tag inserted by the discriminated union
        elif isinstance(node, dict):
            out.append(part)  # a missing or unknown key: name it, stop descending
            node = None
        else:
            continue
    return tuple(out)


def _pydantic_problems(file: str, exc: ValidationError, data: Any, lines) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]), data)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            node = data
            for p in parent:
                node = node[p]
            allowed = _allowed_keys(parent, data)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif err["type"] == "union_tag_invalid":
            kind = err["input"].get("kind") if isinstance(err["input"], dict) else err["input"]
            msg = f"unknown target kind {kind!r}; known kinds: {', '.join(TARGET_KINDS)}"
            close = difflib.get_close_matches(str(kind), TARGET_KINDS, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            loc = (*loc, "kind")
        elif err["type"] == "union_tag_not_found":
            msg = f"missing 'kind'; one of: {', '.join(TARGET_KINDS)}"
        problems.append(_problem(file, loc, msg, lines))
    return problems


def _allowed_keys(parent: tuple, data: Any) -> list[str]:
    """Field names of the model at `parent`, for 'did you mean' hints."""
    model: Any = Recipe
    node = data
    for part in parent:
        node = node[part] if isinstance(node, (dict, list)) else None
        if isinstance(part, int):
            if model is _TARGETS_SENTINEL:
                kind = node.get("kind") if isinstance(node, dict) else None
                model = _TARGET_BY_KIND.get(kind)
            continue
        fields = getattr(model, "model_fields", {})
        if part == "targets":
            model = _TARGETS_SENTINEL
            continue
        ann = fields[part].annotation if part in fields else None
        model = _model_in(ann)
    return list(getattr(model, "model_fields", {}).keys()) if model is not None else []


_TARGETS_SENTINEL = object()
_TARGET_BY_KIND = {"gptq": GptqTarget, "awq": AwqTarget, "fp8": Fp8Target, "gguf": GgufTarget, "tensorrt": TensorRtTarget}


def _model_in(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def cross_field_problems(recipe: Recipe, file: str, lines) -> list[Problem]:
    """Checks that span fields: unique names, calibration present where needed."""
    problems = []
    seen: dict[str, int] = {}
    for i, t in enumerate(recipe.targets):
        if t.name in seen:
            problems.append(_problem(file, ("targets", i, "name"), f"duplicate target name {t.name!r} (also targets.{seen[t.name]})", lines))
        else:
            seen[t.name] = i
        if t.needs_calibration() and recipe.calibration is None:
            problems.append(_problem(file, ("targets", i, "kind"), f"target {t.name!r} ({t.kind}) needs calibration data: add a `calibration:` section (e.g. `calibration: {{dataset: builtin}}`)", lines))
        if isinstance(t, TensorRtTarget) and t.max_input_len > t.max_seq_len:
            problems.append(_problem(file, ("targets", i, "max_input_len"), f"max_input_len ({t.max_input_len}) exceeds max_seq_len ({t.max_seq_len})", lines))
    if recipe.gates.required_devices:
        for j, d in enumerate(recipe.gates.required_devices):
            if d not in recipe.evals.devices:
                problems.append(_problem(file, ("gates", "required_devices", j), f"device {d!r} is not in evals.devices {recipe.evals.devices}", lines))
    return problems


def source_problems(loaded: LoadedRecipe, file: str, lines) -> list[Problem]:
    """Checks that need the source model's config: existence, and group sizes that divide."""
    from pipeline.source import peek_source_config

    recipe = loaded.recipe
    try:
        config = peek_source_config(loaded)
    except InvalidInput as exc:
        return [_problem(file, ("source", "model"), str(exc), lines)]
    if config is None:  # a hub model we can't see offline: checked when it is downloaded
        return []
    return group_size_problems(recipe, config, file, lines)


def linear_in_features(config: dict) -> dict[str, int]:
    """Input width of each quantized Linear family of a decoder-only transformer."""
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size")
    out = {}
    if hidden:
        out["q_proj/k_proj/v_proj/gate_proj/up_proj"] = hidden
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if heads else None)
        if heads and head_dim:
            out["o_proj"] = heads * head_dim
    if inter:
        out["down_proj"] = inter
    return out


def group_size_problems(recipe: Recipe, config: dict, file: str, lines) -> list[Problem]:
    problems = []
    widths = linear_in_features(config)
    for i, t in enumerate(recipe.targets):
        gs = getattr(t, "group_size", None)
        if not isinstance(gs, int):
            continue
        bad = {layer: width for layer, width in widths.items() if width % gs}
        if bad:
            model = config.get("architectures", ["the model"])[0]
            layers = ", ".join(f"{layer} (input width {width})" for layer, width in bad.items())
            problems.append(_problem(file, ("targets", i, "group_size"), f"group size {gs} does not divide {layers} of {model}; use a common divisor or 'channel'", lines))
    return problems


def load_recipe(path: str | Path, check_source: bool = True) -> LoadedRecipe:
    """Read, validate and cross-check a recipe; raise InvalidInput with every problem."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise InvalidInput([Problem(file=file, path="", message="recipe file not found")])
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InvalidInput([Problem(file=file, path="", message=f"not valid YAML: {getattr(exc, 'problem', exc)}", line=mark.line + 1 if mark else None)]) from None
    if not isinstance(data, dict):
        raise InvalidInput([Problem(file=file, path="", message="a recipe is a YAML mapping (name:, source:, targets:, ...)")])
    lines = line_index(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_pydantic_problems(file, exc, data, lines)) from None
    loaded = LoadedRecipe(recipe=recipe, path=path.resolve())
    problems = cross_field_problems(recipe, file, lines)
    if check_source:
        problems += source_problems(loaded, file, lines)
    if problems:
        raise InvalidInput(problems)
    return loaded


def json_schema() -> dict:
    """JSON Schema of the recipe, for editor completion (yaml-language-server)."""
    return Recipe.model_json_schema()
