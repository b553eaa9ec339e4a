"""Task accuracy offline: shipped task files, recipe checks, the llama.cpp adapter, scores against the source."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.backends import llamacpp

runner = CliRunner()
needs_llama_cpp = pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))


def test_shipped_task_files_are_what_the_generator_makes():
    from evals.tasks import generate

    files = generate.generate()
    for name, data in files.items():
        assert (generate.HERE / name).read_bytes() == data, f"{name} is stale: run python -m evals.tasks.generate"


def test_shipped_tasks_come_from_held_out_text_only():
    import json

    from evals.tasks import TASKS_DIR
    from pipeline.data.corpus import corpus_text

    train = corpus_text("train")
    for line in (TASKS_DIR / "kjv_cloze.jsonl").read_text().splitlines()[:50]:
        item = json.loads(line)
        assert item["context"] not in train  # every context comes from a held-out chapter


@pytest.mark.parametrize("tasks, message", [
    ("[kjv_word5]", "unknown task 'kjv_word5' (did you mean 'kjv_word4'?)"),
    ("[./no/such/task.yaml]", "task file not found"),
    ("[kjv_word4, kjv_word4]", "tasks repeat"),
])
def test_bad_tasks_exit_2_before_anything_is_built(write_recipe, tasks, message, tmp_path):
    path = write_recipe(f"name: t\nsource: {{model: builtin:tiny-llama-mini}}\ntargets:\n  - {{name: fp8, kind: fp8}}\nevals: {{tasks: {tasks}}}\n")
    result = runner.invoke(app, ["build", str(path), "--artifacts-dir", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "evals.tasks" in result.output
    assert not (tmp_path / "a").exists()


def test_a_malformed_local_task_file_is_refused(write_recipe, tmp_path):
    (tmp_path / "mine.yaml").write_text("just: [a list\n")
    path = write_recipe("name: t\nsource: {model: builtin:tiny-llama-mini}\ntargets:\n  - {name: fp8, kind: fp8}\nevals: {tasks: [mine.yaml]}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "evals.tasks.0" in result.output and "is not a valid lm-eval task" in result.output


def test_without_lm_eval_tasks_are_an_input_error(write_recipe, monkeypatch):
    import evals.tasks

    monkeypatch.setattr(evals.tasks, "lm_eval_installed", lambda: False)
    path = write_recipe("name: t\nsource: {model: builtin:tiny-llama-mini}\ntargets:\n  - {name: fp8, kind: fp8}\nevals: {tasks: [kjv_word4]}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "lm-evaluation-harness is not installed: `make setup` installs it" in result.output


@needs_llama_cpp
def test_llama_cpp_adapter_scores_like_lm_evals_hf_model_on_the_same_weights(mini_model, tmp_path):
    """An F32 GGUF and the same weights in transformers (float32): the same per-item log-likelihoods."""
    import torch
    from transformers import AutoModelForCausalLM

    from evals import tasks
    from evals.runtimes.lmeval_llamacpp import LlamaCppLM
    from pipeline.targets.gguf.convert import convert

    convert(Path(mini_model), tmp_path / "f32.gguf", "f32", log=lambda m: None, pre_tokenizer="gpt-2")
    names = ["kjv_word4", "kjv_cloze"]
    include = [str(tasks.TASKS_DIR)]
    ours = tasks.run(LlamaCppLM(model_path=str(tmp_path / "f32.gguf"), kv_type="f32"), include, names, 25)
    model = AutoModelForCausalLM.from_pretrained(mini_model, dtype=torch.float32).eval()
    hf = tasks.run(tasks.hf_lm(model, Path(mini_model)), include, names, 25)
    for name in names:
        assert ours[name]["samples"] == hf[name]["samples"] == 25
        assert ours[name]["items"] == hf[name]["items"], name  # the same item correct or wrong, item by item
        assert ours[name]["value"] == pytest.approx(hf[name]["value"])
