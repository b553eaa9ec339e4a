"""Recipe fuzzing: generated and mutated recipes never crash `validate`, and `plan` refuses
exactly what `validate` refuses.

Starting from every shipped recipe and every broken test recipe (plus one written with
anchors, aliases and merge keys), hypothesis mutates the data (wrong types, unknown
keys, removed keys, huge, negative and non-finite numbers, long strings), the YAML text
(duplicated lines and so duplicate keys, anchors, aliases, merges, tags such as
``!!python/object``, directives, very deep nesting, bad indentation) and the bytes
(UTF-16/32, latin-1, a BOM, CR line ends, NUL and other binary bytes, truncation,
oversize files). The properties:

* ``quantforge validate`` ends with exit 0 or 2 and no traceback, within a bound;
* ``quantforge plan`` ends with the same exit code, the same problems when it refuses,
  and writes no file.

Strings never contain ``/``: ``org/name`` is a Hugging Face hub id, which `validate`
leaves to the download (offline it is only refused by `plan`, by design) and which
would make the test reach for the network.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

#: the slowest check (an unknown lm-eval task name lists lm-eval's tasks) takes ~5 s on a
#: loaded 2-core machine: this bounds a hang, not slowness
BOUND_S = 60.0
#: ~25 s on an idle 2-core machine; QUANTFORGE_FUZZ_EXAMPLES=20000 QUANTFORGE_FUZZ_RANDOM=1 explores further
EXAMPLES = int(os.environ.get("QUANTFORGE_FUZZ_EXAMPLES", "1000"))
DERANDOMIZE = not os.environ.get("QUANTFORGE_FUZZ_RANDOM")

ANCHORS = """\
name: anchors
source: &src {model: builtin:tiny-llama-mini, dtype: bfloat16}
calibration: &cal {dataset: builtin, samples: 16, seq_len: 128}
targets:
  - &gptq {name: a, kind: gptq, bits: 4, group_size: 32}
  - <<: *gptq
    name: b
    group_size: 64
  - {<<: [*gptq], name: c, kind: awq}
  - &g {name: g, kind: gguf, quants: [Q8_0], pre_tokenizer: gpt-2}
evals: &ev
  devices: [cpu]
  context: 128
  speed: {prompt_lengths: [32], decode_tokens: 4}
gates: {max_perplexity_increase_pct: 5.0, required_devices: [cpu]}
"""


def _seeds() -> list[tuple[str, str]]:
    files = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "tests" / "recipes" / "broken").glob("*.yaml"))
    # builtin:smollm2-135m costs ~5 s to validate and ~15 s to plan (the real model's
    # checks): tests/test_validation.py runs the shipped recipes as they are; here the
    # small builtin keeps a few hundred examples within a minute.
    seeds = [(p.name, p.read_text().replace("builtin:smollm2-135m", "builtin:tiny-llama-mini")) for p in files]
    return seeds + [("anchors.yaml", ANCHORS)]


SEEDS = _seeds()
SHIPPED = {p.name for p in (REPO / "recipes").glob("*.yaml")} | {"anchors.yaml"}
# Half the examples start from a recipe that validates, so mutations reach the checks
# that only run on well-typed recipes (the kinds' own checks, the model's sizes).
GOOD = [s for s in SEEDS if s[0] in SHIPPED]

KEYS = ["name", "description", "source", "model", "revision", "dtype", "calibration", "dataset", "samples", "seq_len",
        "targets", "kind", "bits", "group_size", "quants", "imatrix", "pre_tokenizer", "scheme", "ignore", "mappings",
        "quant", "output", "tp_size", "max_seq_len", "evals", "devices", "context", "max_windows", "speed",
        "prompt_lengths", "decode_tokens", "batch_sizes", "min_seconds", "tasks", "suite", "gates", "required_devices",
        "max_perplexity_increase_pct", "max_kl_divergence", "registry", "model_name", "tags", "<<"]
WORDS = ["builtin", "builtin:tiny-llama", "builtin:tiny-llama-mini", "builtin:nope", "cpu", "cuda", "h100", "fp8",
         "gptq", "awq", "gguf", "tensorrt", "Q8_0", "Q4_K_M", "IQ2_XS", "F16", "gpt-2", "dynamic", "static", "block",
         "channel", "checkpoint", "engine", "int4_awq", "nvfp4", "lm_head", "re:.*q_proj$", "re:[", "heldout", "train",
         "text", "no-such-file.jsonl", "no-such-file.txt", "~", "null", "yes", "no", "on", "0x1F", "0o17", "1_000",
         "1e400", ".nan", "-.inf", "", " ", "é", "名前", "\u202e", "\x85", "${HOME}", "{{x}}", "%s", "bfloat16"]
INTS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, -1, 1, 2, 3, 7, 8, 16, 32, 64, 96, 128, 256, 511, 512, 513, 4096, 100_000, 100_001, 131_072,
                     2**31 - 1, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30)]),
)
NUMBERS = st.one_of(INTS, st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), max_size=12)
# Names around and far beyond the 64-character limit (they become file and MLflow names).
LONG = st.builds(lambda c, n: c * n, st.sampled_from("a0_-"), st.sampled_from([64, 65, 255, 256, 4096]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.sampled_from(WORDS), LONG)
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), TEXT), inner, max_size=4)),
    max_leaves=8,
)
SNIPPETS = [
    "x: &a [1, 2]\ny: *a", "<<: {name: merged}", "<<: [{a: 1}, {b: 2}]", "<<: *undefined", "a: &r [*r]",
    "name: !!python/object/apply:os.system ['true']", "x: !!python/name:os.system", "x: !!python/tuple [1, 2]",
    "description: !!binary aGVsbG8=", "devices: !!set {cpu, cuda}", "evals: !!omap [{devices: [cpu]}]",
    "name: !!timestamp 2001-12-14", "samples: !!float 1", "samples: !!int '0x10'", "name: !!str 1", "x: !custom y",
    "? [a, b]\n: c", "? {a: b}\n: c", "1: one", "~: none", "true: yes", ".nan: x", "%YAML 1.1\n---", "%TAG !e! tag:e,2000:\n---",
    "---", "...", "'unterminated", '"\\ud800"', '"\\0"', "\tname: tab", "  bad: indent", "- item", "&anchor", "*alias",
    "name: a\nname: b", "targets: []", "targets: [{kind: fp8}]", "source: {model: ''}", "calibration: {samples: 100000, seq_len: 100000}",
    "evals: {context: 100000}", "gates: {max_kl_divergence: .inf}", "speed: {min_seconds: .nan}",
]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"]


# ------------------------------------------------------------------ mutations
def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(data, path, value):
    if not path:
        return value
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def mutate_data(draw, data):
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["tweak", "tweak", "set", "unknown", "delete"]))
        parent = path[:-1]
        node = data
        for part in parent:
            node = node[part]
        leaf = node[path[-1]] if path else data
        if op == "tweak":  # the same type, another value: reaches the checks past the types
            if isinstance(leaf, bool):
                value = draw(st.booleans())
            elif isinstance(leaf, int):
                value = draw(st.one_of(st.integers(1, 1024), INTS))
            elif isinstance(leaf, float):
                value = draw(st.floats(allow_nan=True, allow_infinity=True))
            elif isinstance(leaf, str):
                value = draw(st.one_of(st.sampled_from(WORDS), TEXT, LONG))
            elif isinstance(leaf, list):
                value = leaf + leaf[:1] if leaf and draw(st.booleans()) else leaf[1:]
            else:
                value = draw(VALUES)
            data = _set(data, path, value)
        elif op == "set":
            data = _set(data, path, draw(VALUES))
        elif op == "unknown":
            target = node if isinstance(node, dict) else data if isinstance(data, dict) else None
            if target is not None:
                target[draw(st.one_of(st.sampled_from(KEYS), TEXT))] = draw(VALUES)
        elif op == "delete" and path and isinstance(node, (dict, list)):
            del node[path[-1]]
    return data


def mutate_text(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 2))):
        lines = text.split("\n")
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["dup", "drop", "indent", "snippet", "snippet", "value", "deep"]))
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "drop" and lines:
            del lines[i]
        elif op == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", ""])) + lines[i].lstrip(" ")
        elif op == "snippet":
            indent = re.match(r"\s*(- )?", lines[i]).group(0).replace("-", " ") if lines else ""
            lines[i:i] = [indent + s for s in draw(st.sampled_from(SNIPPETS)).split("\n")]
        elif op == "value":
            value = draw(st.sampled_from(SNIPPETS + WORDS)).split("\n")[0]
            lines[i] = re.sub(r":\s.*$", lambda m: ": " + value, lines[i], count=1)
        else:
            n = draw(st.sampled_from([30, 200, 1000, 5000]))
            deep = draw(st.sampled_from(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "&a [" * 1 + "*a, " * 3 + "1]"]))
            lines[i] = re.sub(r":\s.*$", lambda m: ": " + deep, lines[i], count=1) if ":" in lines[i] else f"deep: {deep}"
        text = "\n".join(lines)
    return text


def to_bytes(draw, text: str) -> bytes:
    encoding = draw(st.sampled_from(ENCODINGS + ["utf-8"] * 8))
    if encoding in ("latin-1", "cp1252") and text.isascii():
        text = text.replace("name:", "# café\nname:", 1)
    raw = text.encode(encoding, errors="replace")
    op = draw(st.sampled_from(["none", "crlf", "cr", "bytes", "nul", "truncate", "oversize", "random"]))
    if op == "crlf":
        raw = raw.replace(b"\n", b"\r\n")
    elif op == "cr":
        raw = raw.replace(b"\n", b"\r")
    elif op in ("bytes", "nul"):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + (b"\0" if op == "nul" else draw(st.binary(min_size=1, max_size=8))) + raw[at:]
    elif op == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif op == "oversize":
        raw = raw + b"\n# " + b"x" * (1 << 20)
    elif op == "random":
        raw = draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    return raw


@st.composite
def recipes(draw) -> tuple[str, bytes]:
    name, text = draw(st.one_of(st.sampled_from(GOOD), st.sampled_from(SEEDS)))
    layers = draw(st.sampled_from(["data", "data", "data", "text", "bytes", "all"]))
    if layers in ("data", "all"):
        data = yaml.safe_load(text)
        data = mutate_data(draw, data)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=draw(st.booleans()),
                              default_flow_style=draw(st.sampled_from([None, False, True])), width=10**6)
    if layers in ("text", "all"):
        text = mutate_text(draw, text)
    if layers in ("bytes", "all"):
        return name, to_bytes(draw, text)
    return name, text.encode("utf-8")


# ------------------------------------------------------------------ the property
class Hang(BaseException):
    """Raised by the alarm: not an Exception, so CliRunner does not swallow it."""


def _invoke(args: list[str]):
    def alarm(signum, frame):
        raise Hang(f"`quantforge {' '.join(args)}` ran for more than {BOUND_S:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, BOUND_S)
    start = time.perf_counter()
    try:
        result = runner.invoke(app, args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return result, time.perf_counter() - start


def _problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("invalid input:")]


def _crash(result) -> str | None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        return "".join(traceback.format_exception(*result.exc_info))
    if "Traceback" in result.output:
        return result.output
    return None


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="qf-fuzz-") as d:
        yield Path(d)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=recipes())
def test_validate_never_crashes_and_plan_agrees(workdir, case):
    seed, raw = case
    folder = Path(tempfile.mkdtemp(dir=workdir))
    path = folder / "recipe.yaml"
    path.write_bytes(raw)
    context = f"mutated from {seed}; file bytes: {raw[:3000]!r}"

    validate, seconds = _invoke(["validate", str(path)])
    crash = _crash(validate)
    assert crash is None, f"validate crashed ({context}):\n{crash}"
    assert validate.exit_code in (0, 2), f"validate exit {validate.exit_code} ({context}):\n{validate.output}"
    event(f"validate exit {validate.exit_code}")
    if validate.exit_code == 2:
        assert _problems(validate.output), f"exit 2 without a problem named ({context}):\n{validate.output}"

    artifacts = folder / "artifacts"
    plan, _ = _invoke(["plan", str(path), "--artifacts-dir", str(artifacts)])
    crash = _crash(plan)
    assert crash is None, f"plan crashed on a recipe validate {'accepted' if validate.exit_code == 0 else 'refused'} ({context}):\n{crash}"
    assert plan.exit_code == validate.exit_code, f"validate exit {validate.exit_code}, plan exit {plan.exit_code} ({context}):\n{validate.output}\n{plan.output}"
    if validate.exit_code == 2:
        assert _problems(plan.output) == _problems(validate.output), context
    written = [p for p in artifacts.rglob("*") if p.is_file()] if artifacts.exists() else []
    assert written == [], f"plan wrote {written} ({context})"


def test_seeds_cover_both_outcomes():
    """The seeds themselves: the shipped recipes and the anchors one validate, every broken one does not."""
    outcomes = {}
    with tempfile.TemporaryDirectory() as d:
        for name, text in SEEDS:
            p = Path(d) / name
            p.write_text(text)
            outcomes[name] = runner.invoke(app, ["validate", str(p)]).exit_code
    assert {n: c for n, c in outcomes.items() if n in SHIPPED} == {n: 0 for n in SHIPPED}
    assert {c for n, c in outcomes.items() if n not in SHIPPED} == {2}


def test_a_long_recipe_name_is_refused_by_validate(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(f"name: {'a' * 300}\nsource: {{model: builtin:tiny-llama-mini}}\ntargets: [{{name: f, kind: fp8}}]\n")
    validate = runner.invoke(app, ["validate", str(path)])
    plan = runner.invoke(app, ["plan", str(path), "--artifacts-dir", str(tmp_path / "artifacts")])
    assert _crash(plan) is None, _crash(plan)
    assert validate.exit_code == plan.exit_code == 2, (validate.output, plan.output)
