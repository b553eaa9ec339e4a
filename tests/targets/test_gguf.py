"""GGUF target: real conversions, imatrix and quantizations of the mini demo model, checked in llama.cpp.

Needs llama.cpp (`make setup`: the llama-cpp-python wheel and the llama-imatrix /
llama-quantize tools); without it the llama.cpp tests are skipped with that reason.
One build (module fixture) makes every artifact the tests look at.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.backends import llamacpp
from pipeline.errors import InvalidInput

NEEDS_LLAMA_CPP = llamacpp.missing(["llama-imatrix", "llama-quantize"])
needs_llama_cpp = pytest.mark.skipif(NEEDS_LLAMA_CPP is not None, reason=str(NEEDS_LLAMA_CPP))

RECIPE = """
name: mini-gguf
source: {{model: "{model}", license: mit}}
calibration: {{dataset: builtin, samples: 8, seq_len: 128}}
targets:
{targets}
"""
# Both targets convert to f32 with the same settings: one conversion (same cache key) serves both.
TARGETS = """\
  - {name: gguf, kind: gguf, base_type: f32, pre_tokenizer: gpt-2, imatrix: true, quants: [F32, F16, Q8_0, Q4_K_M, IQ2_XS]}
  - {name: plain, kind: gguf, base_type: f32, pre_tokenizer: gpt-2, quants: [Q4_K_M]}
"""


def _plan(tmp: Path, model: Path, targets: str):
    from pipeline.plan import make_plan
    from pipeline.validation import load_recipe

    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, targets=targets))
    return make_plan(load_recipe(recipe), tmp / "artifacts")


def _convert(tmp: Path, model: Path, target_line: str, name: str):
    """Only the source and the conversion of one GGUF target: its stage result."""
    from pipeline.core.runner import execute

    plan = _plan(tmp, model, target_line)
    stages = [s for s in plan.stages if s.name in ("source", f"{name}/convert")]
    return execute(stages, tmp / "artifacts", log=lambda m: None)[f"{name}/convert"]


@pytest.fixture(scope="module")
def built(mini_model, tmp_path_factory):
    from pipeline.core.runner import execute

    if NEEDS_LLAMA_CPP:
        pytest.skip(NEEDS_LLAMA_CPP)
    tmp = tmp_path_factory.mktemp("gguf")
    plan = _plan(tmp, mini_model, TARGETS)
    results = execute(plan.stages, tmp / "artifacts", log=lambda m: None)
    failed = {n: r.reason for n, r in results.items() if r.output is None}
    assert not failed, failed
    return {name: r.output for name, r in results.items()}


def _gguf(built, stage: str) -> Path:
    out = built[stage]
    return out.path / out.result["file"]


# ------------------------------------------------------------------ plan-time errors
def test_iq_quant_without_imatrix_is_a_plan_error(mini_model, tmp_path):
    with pytest.raises(InvalidInput) as err:
        _plan(tmp_path, mini_model, "  - {name: g, kind: gguf, pre_tokenizer: gpt-2, quants: [Q4_K_M, IQ2_XS]}\n")
    [problem] = err.value.problems
    assert problem.path == "targets.0.imatrix"
    assert "IQ2_XS" in problem.message and "Q4_K_M" not in problem.message
    assert problem.line == 6


def test_unknown_pre_tokenizer_is_a_plan_error_with_suggestion(mini_model, tmp_path):
    with pytest.raises(InvalidInput) as err:
        _plan(tmp_path, mini_model, "  - {name: g, kind: gguf, pre_tokenizer: gpt2, quants: [Q8_0]}\n")
    [problem] = err.value.problems
    assert problem.path == "targets.0.pre_tokenizer"
    assert "did you mean 'gpt-2'" in problem.message


def test_plan_shares_one_conversion_and_names_artifacts(mini_model, tmp_path):
    from pipeline.core.runner import stage_keys

    plan = _plan(tmp_path, mini_model, TARGETS)
    names = [s.name for s in plan.stages]
    assert names[2:] == ["gguf/convert", "gguf/imatrix", *(f"gguf/quantize/{q}" for q in ("F32", "F16", "Q8_0", "Q4_K_M", "IQ2_XS")),
                         "plain/convert", "plain/quantize/Q4_K_M"]
    keys = stage_keys(plan.stages)
    assert keys["gguf/convert"] == keys["plain/convert"]
    by_name = plan.by_name()
    assert "imatrix" in by_name["gguf/quantize/Q4_K_M"].inputs and "imatrix" not in by_name["gguf/quantize/Q8_0"].inputs
    art = by_name["gguf/quantize/IQ2_XS"].artifact
    assert (art.name, art.kind, art.variant, art.bits) == ("gguf-IQ2_XS", "gguf", "IQ2_XS", 2)


# ------------------------------------------------------------------ pre-tokenizer
@needs_llama_cpp
def test_unrecognized_pre_tokenizer_names_hash_and_recipe_key(mini_model, tmp_path):
    result = _convert(tmp_path, mini_model, "  - {name: mygguf, kind: gguf, quants: [Q8_0]}\n", "mygguf")
    assert result.status == "failed"
    # The names were tried: the mini model's byte-level BPE was trained with GPT-2's splitting, which comes first.
    assert "(chkhsh " in result.reason and ": set `targets[0].pre_tokenizer: gpt-2` (target 'mygguf'); with it llama.cpp " \
        "tokenizes held-out text exactly as the HF tokenizer does" in result.reason, result.reason
    chkhsh = result.reason.split("chkhsh ")[1].split(")")[0]
    assert len(chkhsh) == 64 and int(chkhsh, 16) >= 0


@needs_llama_cpp
def test_an_unrecognized_smollm_style_tokenizer_gets_the_name_that_works(tmp_path, heldout_text):
    """The case of a Qwen2-shaped model carrying a SmolLM-style tokenizer: 'gpt-2' would fail the tokenization
    check; the names are tried and the suggestion is the one that reproduces it."""
    from tests.sources.test_gguf_families import bpe_model

    from pipeline.targets.gguf.convert import suggest_pre_tokenizers
    from pipeline.targets.gguf.stages import tokenization_sample

    model = bpe_model(tmp_path / "smol-style", "smollm")
    result = _convert(tmp_path, model, "  - {name: g, kind: gguf, quants: [Q8_0]}\n", "g")
    assert result.status == "failed"
    working = suggest_pre_tokenizers(model, tokenization_sample(heldout_text), tmp_path, lambda m: None)
    # SmolLM's splitting reproduces it; splittings that cut "'s" or digit runs differently do not. (A vocabulary
    # this small may have no token that tells some families apart: those reproduce it as well, rightly.)
    assert "smollm" in working and not {"deepseek-llm", "deepseek-coder"} & set(working), working
    assert f"set `targets[0].pre_tokenizer: {working[0]}`" in result.reason, result.reason


@needs_llama_cpp
def test_override_is_written_and_llama_cpp_tokenizes_like_hf(built, mini_model, heldout_text):
    from transformers import AutoTokenizer

    conv = built["gguf/convert"].result
    assert conv["pre_tokenizer"] == "gpt-2" and conv["detected_pre_tokenizer"] is None
    assert conv["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
    assert conv["tokenization_check"]["equal"] and conv["tokenization_check"]["tokens"] > 500
    # A slice the stage did not check.
    text = heldout_text[20_000:23_000]
    tok = AutoTokenizer.from_pretrained(str(mini_model))
    assert llamacpp.tokenize(_gguf(built, "gguf/quantize/Q8_0"), text) == tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ quants
@needs_llama_cpp
@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_K_M", "IQ2_XS"])
def test_every_quant_builds_loads_and_decodes(built, quant):
    out = built[f"gguf/quantize/{quant}"]
    r = out.result
    # llama.cpp's naming convention, from the source model's name (gguf-py splits it: base name, size label)
    assert r["file"] == f"tiny-llama-mini-{quant}.gguf" and (out.path / r["file"]).is_file()
    assert r["file_type"] == quant
    assert r["decode"]["ids"] and all(isinstance(t, int) for t in r["decode"]["ids"])
    modelfile = (out.path / "Modelfile").read_text()
    assert f"FROM ./tiny-llama-mini-{quant}.gguf" in modelfile
    assert f"ollama create tiny-llama-mini-{quant.lower()} -f Modelfile" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert 'TEMPLATE """' in modelfile and "<|user|>" in modelfile


@needs_llama_cpp
def test_quant_tensor_types(built):
    assert set(built["gguf/quantize/F32"].result["tensor_types"]) == {"F32"}
    assert "Q8_0" in built["gguf/quantize/Q8_0"].result["tensor_types"]
    assert "Q4_K" in built["gguf/quantize/Q4_K_M"].result["tensor_types"]
    assert "IQ2_XS" in built["gguf/quantize/IQ2_XS"].result["tensor_types"]


@needs_llama_cpp
def test_imatrix_changes_q4_k_m(built):
    import gguf

    with_imatrix = built["gguf/quantize/Q4_K_M"]
    without = built["plain/quantize/Q4_K_M"]
    assert with_imatrix.result["imatrix"] and not without.result["imatrix"]
    assert with_imatrix.result["tensor_types"] == without.result["tensor_types"]
    a = gguf.GGUFReader(str(_gguf(built, "gguf/quantize/Q4_K_M")))
    b = gguf.GGUFReader(str(_gguf(built, "plain/quantize/Q4_K_M")))
    b_data = {t.name: bytes(t.data) for t in b.tensors}
    changed = [t.name for t in a.tensors if t.tensor_type.name == "Q4_K" and bytes(t.data) != b_data[t.name]]
    assert changed, "imatrix left every Q4_K tensor unchanged"
    assert "quantize.imatrix.file" in a.fields and "quantize.imatrix.file" not in b.fields
    assert built["gguf/imatrix"].result["chunks"] == 8  # 8 calibration samples of seq_len tokens, -c seq_len


@needs_llama_cpp
def test_metadata_round_trips(built, mini_model):
    import gguf

    from pipeline import __version__

    reader = gguf.GGUFReader(str(_gguf(built, "gguf/quantize/Q4_K_M")))

    def value(key):
        return reader.fields[key].contents()

    assert value("general.name") == "tiny-llama-mini"  # the source model's, named by llama.cpp's convention
    assert value("general.basename") == "tiny-llama" and value("general.size_label") == "mini"
    assert value("general.quantized_by") == f"quantforge {__version__}"
    assert value("general.license") == "mit"
    assert value("quantforge.source") == "builtin:tiny-llama-mini"  # the model the local folder holds, not its path
    # Lineage names what made the file, never the whole recipe: the stage's key and its inputs' content.
    stage = built["gguf/quantize/Q4_K_M"]
    assert value("quantforge.stage_key") == stage.key
    assert value("quantforge.base_sha256") == built["gguf/convert"].manifest["content_sha256"]
    assert value("quantforge.imatrix_sha256") == built["gguf/imatrix"].manifest["content_sha256"]
    assert "quantforge.recipe_sha256" not in reader.fields
    assert value("tokenizer.ggml.pre") == "gpt-2"
    # The manifest records what the file says.
    assert built["gguf/quantize/Q4_K_M"].result["metadata"]["quantforge.stage_key"] == value("quantforge.stage_key")


# ------------------------------------------------------------------ accuracy
def _windows(ids: list[int], size: int, count: int) -> list[list[int]]:
    return [ids[i * size:(i + 1) * size] for i in range(count) if len(ids) >= (i + 1) * size]


def _nll_hf(model_dir: Path, windows) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].double()
            target = torch.tensor(w[1:])
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            n += len(w) - 1
    return total / n


def _nll_llama(gguf_file: Path, windows) -> float:
    import numpy as np

    from pipeline.backends.llamacpp import binding

    Llama = binding().Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=len(windows[0]), n_batch=len(windows[0]), n_threads=1, n_threads_batch=1,
                logits_all=True, verbose=False)
    total, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return total / n


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_float_gguf_perplexity_equals_hf(built, mini_model, heldout_text, quant):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(mini_model)).encode(heldout_text[:40_000], add_special_tokens=False)
    windows = _windows(ids, 128, 8)
    ppl_hf = math.exp(_nll_hf(mini_model, windows))
    ppl_gguf = math.exp(_nll_llama(_gguf(built, f"gguf/quantize/{quant}"), windows))
    print(f"{quant}: perplexity HF {ppl_hf:.4f} llama.cpp {ppl_gguf:.4f} ({(ppl_gguf / ppl_hf - 1) * 100:+.4f}%)")
    assert abs(ppl_gguf / ppl_hf - 1) < 1e-3


# ------------------------------------------------------------------ errors
@needs_llama_cpp
def test_wrong_pre_tokenizer_fails_at_first_differing_token(mini_model, tmp_path):
    # 'default' splits "'s" off differently from GPT-2's regex: llama.cpp then disagrees with HF.
    result = _convert(tmp_path, mini_model, "  - {name: g, kind: gguf, pre_tokenizer: default, quants: [Q8_0]}\n", "g")
    assert result.status == "failed"
    assert "tokenizes differently from the HF tokenizer at token " in result.reason
    assert "'default' does not reproduce this tokenizer" in result.reason


def test_unsupported_architecture_says_so(tmp_path):
    from pipeline.targets.gguf.convert import UnsupportedArchitecture, convert

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["QuantforgeToyForCausalLM"], "model_type": "qf-toy"}')
    with pytest.raises(UnsupportedArchitecture) as err:
        convert(model, tmp_path / "out.gguf", "f16", log=lambda m: None)
    assert "QuantforgeToyForCausalLM" in str(err.value) and "the converter says" in str(err.value)


def test_disk_space_is_checked_before_writing(tmp_path):
    from pipeline.errors import StageFailed
    from pipeline.targets.gguf.stages import check_disk, estimate_bytes

    check_disk(tmp_path, 1024, "a small file")
    with pytest.raises(StageFailed, match="not enough disk space for the converted GGUF"):
        check_disk(tmp_path, 1 << 60, "the converted GGUF")
    # A 4-bit file from a 16-bit base is estimated above its real size (4.5-5 bpw) yet below the base.
    base = 10 << 30
    assert 5 / 16 * base < estimate_bytes(base, "F16", "Q4_K_M") < base


# ------------------------------------------------------------------ reproducible bytes
@needs_llama_cpp
def test_same_recipe_in_two_folders_gives_the_same_gguf_bytes(mini_model, tmp_path):
    """No path of the build machine in the file: the same recipe and inputs, built under two different
    artifact folders, give byte-identical GGUFs (imatrix included: it recorded the temp paths)."""
    from pipeline.backends.gguf_header import read_header
    from pipeline.core.runner import execute
    from pipeline.core.store import sha256_file

    target = "  - {name: g, kind: gguf, base_type: f32, pre_tokenizer: gpt-2, imatrix: true, quants: [Q4_K_M]}\n"
    files, imatrices = [], []
    for build in ("first", "second"):
        folder = tmp_path / build
        folder.mkdir()
        plan = _plan(folder, mini_model, target)
        results = execute(plan.stages, folder / "artifacts", log=lambda m: None)
        out = results["g/quantize/Q4_K_M"].output
        assert out is not None, results["g/quantize/Q4_K_M"].reason
        files.append(out.path / out.result["file"])
        imatrices.append(results["g/imatrix"].output.path / "imatrix.gguf")
    import gguf

    datasets = gguf.GGUFReader(str(imatrices[0])).fields["imatrix.datasets"].contents()
    assert datasets == ["calibration.txt"]
    assert sha256_file(imatrices[0]) == sha256_file(imatrices[1])
    meta = read_header(files[0]).metadata
    assert meta["quantize.imatrix.file"] == "imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == "calibration.txt"
    strings = [v for v in meta.values() if isinstance(v, str)]
    assert not [s for s in strings if str(tmp_path) in s or s.startswith("/")], strings
    assert sha256_file(files[0]) == sha256_file(files[1])


# ------------------------------------------------------------------ Modelfile
def test_default_system_prompt_becomes_the_modelfile_system():
    """SmolLM2's own chat template (read from its GGUF) inserts a system prompt when a conversation has none:
    it is measured into SYSTEM, and the template plus SYSTEM reproduce the Jinja rendering (checked inside)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from pipeline.backends.gguf_header import read_header
    from pipeline.sources.builtin import PACKAGED
    from pipeline.targets.gguf.modelfile import OllamaSpec, measure, modelfile_text

    template = read_header(PACKAGED["smollm2-135m"].locate()).metadata["tokenizer.chat_template"]
    jinja = ImmutableSandboxedEnvironment().from_string(template)
    fmt = measure(lambda msgs, gen: jinja.render(messages=msgs, add_generation_prompt=gen), None)
    assert fmt.system_default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile_text("SmolLM2-135M-Instruct-Q4_K_M.gguf", OllamaSpec(fmt.go_template(), ["<|im_end|>"], "n", fmt.system_default))
    assert f'SYSTEM """{fmt.system_default}"""' in text and 'TEMPLATE """' in text
    assert "ollama create smollm2-135m-instruct-q4_k_m -f Modelfile" in text
    user = [{"role": "user", "content": "Hi"}]
    assert fmt.render(user, True) == jinja.render(messages=user, add_generation_prompt=True)
