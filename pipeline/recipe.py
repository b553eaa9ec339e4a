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
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from pipeline.errors import InvalidInput, Problem
from pipeline.spec import NAME_MAX, NAME_PATTERN, GateSpec, Strict
from pipeline.targets import declaration, registered, settings_classes, unknown_kind_message


# --------------------------------------------------------------------- source
class SourceSpec(Strict):
    """Where the unquantized model comes from.

    ``model`` is ``builtin:<name>`` (a model shipped with or trained by quantforge),
    a local Hugging Face folder or a local ``.gguf`` file (absolute, or relative to
    the recipe file), or a hub id ``org/name`` at ``revision``.
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
    """Text used to calibrate quantizers; tokenized once and shared by every target.

    ``chat_template: true`` wraps each text as a user turn of the source's chat
    template (what an instruct model sees when served).
    """

    dataset: str = "builtin"
    split: str = "train"
    column: str = "text"
    samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(256, ge=8, le=131_072)
    seed: int = 0
    chat_template: bool = False


# ------------------------------------------------------------------ targets
def _target_union():
    """The discriminated union of every registered kind's settings class."""
    classes = tuple(settings_classes())
    return Annotated[Union[classes], Field(discriminator="kind")]  # type: ignore[valid-type]


Target = _target_union()
TARGET_KINDS = tuple(registered())


# -------------------------------------------------------------------- evals
class SpeedSpec(Strict):
    """How speed is measured: warm-up, then at least `min_iterations` and `min_seconds`."""

    prompt_lengths: list[Annotated[int, Field(ge=1, le=1_048_576)]] = Field([64, 256], min_length=1)
    decode_tokens: int = Field(32, ge=1, le=65_536)
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field([1], min_length=1)
    warmup: int = Field(1, ge=0, le=100)
    min_iterations: int = Field(3, ge=1, le=1000)
    min_seconds: float = Field(1.0, ge=0, le=600)
    threads: int | None = Field(None, ge=1)


def _device_name(name: str) -> str:
    """A known device (cpu, cuda, a GPU class): an unknown one would leave its eval job waiting
    for a runner that never comes, and its gate pending forever."""
    from pipeline.backends.devices import Device

    if not re.match(NAME_PATTERN, name) or len(name) > NAME_MAX:
        Device.parse(name)  # a clearer message where it has one (cuda:0, did-you-mean)
        raise ValueError(f"device {name!r} must match {NAME_PATTERN} (cpu, cuda, or a GPU class such as h100)")
    return Device.parse(name).name


#: Checked one by one, so every bad entry of a list is reported at its own index.
DeviceName = Annotated[str, AfterValidator(_device_name)]


class EvalSpec(Strict):
    """Which devices evaluate the artifacts, and on what text."""

    devices: list[DeviceName] = Field(["cpu"], min_length=1)
    suite: str = "builtin"
    column: str = "text"
    context: int = Field(256, ge=16, le=1_048_576)
    max_windows: int = Field(32, ge=1, le=100_000)
    speed: SpeedSpec = SpeedSpec()
    #: lm-evaluation-harness tasks: shipped (kjv_cloze, kjv_word4, kjv_next4), a task YAML path, or lm-eval's own
    tasks: list[str] = []
    #: items of each task scored for every model (the same items for all)
    task_limit: int | None = Field(100, ge=1)

    @field_validator("devices")
    @classmethod
    def _devices_once(cls, devices: list[str]) -> list[str]:
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
class ExecutionSpec(Strict):
    """Where the stages run; `--executor`/`--address` override it. Kept out of the recipe's hash
    (and its report): how a recipe runs does not change what it builds.

    ```yaml
    execution:
      executor: ray            # local (default: this process) | ray
      address: auto            # a running Ray cluster; unset: RAY_ADDRESS, else a local one
      resources:               # per target name (or source, calibration, eval)
        w4a16-gptq: {num_gpus: 0.5, memory_gb: 40}   # two such stages may share one GPU
    ```
    """

    executor: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int | None = Field(None, ge=1)  # CPUs of a local Ray cluster (default: this machine's)
    max_retries: int = Field(3, ge=0, le=100)  # re-runs of a stage whose worker died
    resources: dict[str, dict[Literal["num_gpus", "num_cpus", "memory_gb"], Annotated[float, Field(ge=0)]]] = {}


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    description: str = ""
    source: SourceSpec
    calibration: CalibrationSpec | None = None
    targets: list[Target] = Field(min_length=1)
    evals: EvalSpec = EvalSpec()
    gates: GateSpec = GateSpec()
    registry: RegistrySpec = RegistrySpec()
    execution: ExecutionSpec | None = Field(None, exclude=True)

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
    #: YAML path -> line, so later checks can locate what they find
    lines: dict[tuple, int] = {}
    #: the path as the user gave it, for messages
    file: str = ""
    #: checks that could not run, and why (the hub was unreachable for the model's config.json)
    skipped: tuple[str, ...] = ()
    #: set only on the partial recipe of a file whose schema check failed (see SchemaInvalid):
    #: the sections that did not validate, and the YAML index of each target that did
    invalid_sections: frozenset[str] = frozenset()
    target_indices: tuple[int, ...] | None = None

    def target_index(self, i: int) -> int:
        """The YAML index of ``recipe.targets[i]`` (they differ only in a partial recipe)."""
        return self.target_indices[i] if self.target_indices is not None else i

    def problem(self, loc: tuple, message: str) -> Problem:
        return locate(self.file or str(self.path), loc, message, self.lines)

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


# ------------------------------------------------------------------ parsing
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a megabyte is surely not one


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error.

    PyYAML (like the YAML 1.1 spec's loaders) silently keeps the last value, so a
    second ``targets:`` list would make the first disappear without a word.
    """


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"a mapping key must be a scalar, not {type(key).__name__}", key_node.start_mark) from None
        if key in seen:
            raise DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"key {key!r} is given twice (lines {first} and {second}); a recipe states each key once")


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_NODES = 100_000


def _expanded_size(node, memo: dict | None = None, depth: int = 0) -> int:
    """Nodes of the document with every alias expanded (what pydantic would walk), counted
    without expanding it: a few nested aliases ("billion laughs") expand exponentially."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if depth > 200:
        raise RecursionError
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(v, memo, depth + 1) for v in node.value)
    memo[id(node)] = size
    return size


def line_index(text: str) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys/indices) to its 1-based line number."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node, path, depth=0):
        if depth > 64:  # a hostile, very deep document: enough for locating real recipe keys
            return
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = (*path, key.value)
                walk(value, k, depth + 1)
                index[k] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i), depth + 1)

    if root is not None:
        walk(root, ())
    return index


def locate(file: str, loc: tuple, message: str, lines: dict[tuple, int]) -> Problem:
    """A Problem at the line of `loc`, or of its nearest located parent."""
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
            allowed = _allowed_keys(loc[:-1], data)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif err["type"] == "union_tag_invalid":
            kind = err["input"].get("kind") if isinstance(err["input"], dict) else err["input"]
            msg = unknown_kind_message(kind)
            loc = (*loc, "kind")
        elif err["type"] == "union_tag_not_found":
            msg = f"missing 'kind'; one of: {', '.join(TARGET_KINDS)}"
        problems.append(locate(file, loc, msg, lines))
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
                model = declaration(kind).settings if kind in TARGET_KINDS else None
            continue
        fields = getattr(model, "model_fields", {})
        if part == "targets":
            model = _TARGETS_SENTINEL
            continue
        ann = fields[part].annotation if part in fields else None
        model = _model_in(ann)
    return list(getattr(model, "model_fields", {}).keys()) if model is not None else []


_TARGETS_SENTINEL = object()


def _model_in(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def read_recipe_text(path: Path) -> str:
    """The recipe file's text; InvalidInput (exit 2) for what is not a readable UTF-8 text file."""
    file = str(path)
    if not path.is_file():
        raise InvalidInput([Problem(file=file, path="", message="recipe file not found" if not path.exists() else "not a file")])
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise InvalidInput([Problem(file=file, path="", message=f"{size} bytes is not a recipe (recipes are small YAML files; limit {MAX_RECIPE_BYTES} bytes)")])
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput([Problem(file=file, path="", message=f"cannot read it: {exc.strerror or exc}")]) from None
    if b"\0" in raw:
        raise InvalidInput([Problem(file=file, path="", message="holds binary data (NUL bytes): a recipe is a UTF-8 YAML text file")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInput([Problem(file=file, path="", line=line, message=f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): save the recipe as UTF-8")]) from None


def parse_recipe(path: str | Path) -> LoadedRecipe:
    """Read and type-check a recipe: YAML syntax, duplicate keys, every field. No cross-checks.

    :func:`pipeline.validation.load_recipe` adds the checks that span fields, the
    kinds' own checks and the source's; use that one.
    """
    path = Path(path)
    file = str(path)
    text = read_recipe_text(path)
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node) > MAX_NODES:
                raise InvalidInput([Problem(file=file, path="", message=f"expands to more than {MAX_NODES} YAML nodes (aliases?): too large to be a recipe")])
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except DuplicateKey as exc:
        where = next((loc for loc, line in line_index(text).items() if line == exc.second and loc and loc[-1] == exc.key), ())
        raise InvalidInput([Problem(file=file, path=".".join(map(str, where)), message=str(exc), line=exc.second)]) from None
    except RecursionError:
        raise InvalidInput([Problem(file=file, path="", message="nested too deeply to be a recipe")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InvalidInput([Problem(file=file, path="", message=f"not valid YAML: {getattr(exc, 'problem', None) or exc}", line=mark.line + 1 if mark else None)]) from None
    if not isinstance(data, dict):
        raise InvalidInput([Problem(file=file, path="", message="a recipe is a YAML mapping (name:, source:, targets:, ...)")])
    lines = line_index(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise SchemaInvalid(_pydantic_problems(file, exc, data, lines), _partial(path, file, data, lines)) from None
    except RecursionError:
        raise InvalidInput([Problem(file=file, path="", message="nested too deeply to be a recipe")]) from None
    return LoadedRecipe(recipe=recipe, path=path.resolve(), lines=lines, file=file)


class SchemaInvalid(InvalidInput):
    """The schema check failed; ``partial`` holds the sections that are valid on their own, so the
    checks that only read those can still run and every problem is reported in one go."""

    def __init__(self, problems: list[Problem], partial: LoadedRecipe | None):
        super().__init__(problems)
        self.partial = partial


_SECTIONS = {"source": SourceSpec, "calibration": CalibrationSpec, "evals": EvalSpec, "gates": GateSpec, "registry": RegistrySpec}


def _partial(path: Path, file: str, data: dict, lines: dict) -> LoadedRecipe | None:
    """A recipe of the sections (and targets) that validate on their own; defaults elsewhere,
    and the invalid ones named, so no later check reads a default as if the user had written it."""
    try:
        parts, bad = {}, set()
        for key, model in _SECTIONS.items():
            if key not in data or (key == "calibration" and data[key] is None):  # absent (or null where that is allowed)
                if key == "source":
                    bad.add(key)
                continue
            try:
                parts[key] = model.model_validate(data[key])
            except ValidationError:
                bad.add(key)
        targets, at = [], []
        if isinstance(data.get("targets"), list):
            adapter = TypeAdapter(Target)
            for i, raw in enumerate(data["targets"]):
                try:
                    targets.append(adapter.validate_python(raw))
                    at.append(i)
                except ValidationError:
                    pass
        recipe = Recipe.model_construct(
            name=str(data.get("name")), description="",
            source=parts.get("source") or SourceSpec.model_construct(model=""),
            calibration=parts.get("calibration"), targets=targets,
            evals=parts.get("evals") or EvalSpec(), gates=parts.get("gates") or GateSpec(),
            registry=parts.get("registry") or RegistrySpec(),
        )
        return LoadedRecipe(recipe=recipe, path=path.resolve(), lines=lines, file=file,
                            invalid_sections=frozenset(bad), target_indices=tuple(at))
    except Exception:  # noqa: BLE001 - a hostile document: its schema problems are report enough
        return None


def json_schema() -> dict:
    """JSON Schema of the recipe, for editor completion (yaml-language-server)."""
    return Recipe.model_json_schema()
