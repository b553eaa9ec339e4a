"""The budget kind: the best candidate within a bit budget, built, scored and chosen for real.

On the trained mini model: GPTQ W4A16 group 32 (4.5 linear-layer bpw), GGUF Q4_0 (4.5) and
Q8_0 (8.5) under a 5-bit budget. What is asserted is what the kind promises, read from what
it wrote: the winner is within budget and has the lowest score of those scored, over-budget
candidates are not scored, the artifact is the winner's files, selection text is disjoint
from the final eval's, a rerun builds nothing, and an impossible budget fails with the
smallest candidate named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.store import sha256_file


def _recipe(mini_model: Path, budget: str = "max_bpw: 5.0") -> str:
    return f"""
name: budget
source: {{model: {mini_model}, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 16, seq_len: 128}}
targets:
  - name: best
    kind: budget
    {budget}
    selection_windows: 6
    candidates:
      - {{kind: gptq, group_size: 32}}
      - {{kind: gguf, quants: [Q4_0, Q8_0], imatrix: true, pre_tokenizer: gpt-2}}
evals: {{devices: [cpu], max_windows: 4, context: 128,
         speed: {{prompt_lengths: [16], decode_tokens: 4, warmup: 0, min_iterations: 1, min_seconds: 0}}}}
"""


def _build(recipe: Path, artifacts: Path, log: list | None = None):
    from pipeline.build import build
    from pipeline.validation import load_recipe

    lines = [] if log is None else log
    return build(load_recipe(recipe), artifacts, log=lines.append)


@pytest.fixture(scope="module")
def built(mini_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    recipe = tmp / "budget.yaml"
    recipe.write_text(_recipe(mini_model))
    report, results = _build(recipe, tmp / "artifacts")
    return tmp, recipe, report, results


def test_winner_is_within_budget_and_best_of_those_scored(built):
    _, _, report, results = built
    (art,) = report.artifacts  # candidates are not artifacts of their own
    assert art.name == "best" and art.status == "built", art.reason
    pick = results["best/pick"].output
    selection = json.loads((pick.path / "selection.json").read_text())
    rows = {r["label"]: r for r in selection["candidates"]}
    assert set(rows) == {"0", "1-Q4_0", "1-Q8_0"}
    # Q8_0 is counted from its file as over budget and never scored.
    assert rows["1-Q8_0"]["within_budget"] is False and rows["1-Q8_0"]["kl_mean"] is None
    assert rows["1-Q8_0"]["bpw_linear"] > 5.0
    scored = [r for r in rows.values() if r["within_budget"]]
    assert len(scored) == 2 and all(r["kl_mean"] is not None and r["bpw_linear"] <= 5.0 for r in scored)
    chosen = rows[selection["chosen"]]
    assert chosen["kl_mean"] == min(r["kl_mean"] for r in scored)
    assert chosen["result"] == "chosen" and selection["why"]
    # The report entry is the winner's format, with the bits counted from the files it holds.
    assert art.kind == chosen["kind"] and art.variant == chosen["variant"]
    assert art.bpw_linear == pytest.approx(chosen["bpw_linear"])


def test_artifact_holds_the_winners_files(built):
    _, _, report, results = built
    selection = json.loads((Path(report.artifacts[0].path) / "selection.json").read_text())
    label = selection["chosen"]
    cand_stage = "best/candidates/0/quantize" if label == "0" else f"best/candidates/1/quantize/{label.split('-', 1)[1]}"
    cand = results[cand_stage].output.path
    art = Path(report.artifacts[0].path)
    files = sorted(p.relative_to(cand) for p in cand.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files
    for rel in files:
        assert sha256_file(art / rel) == sha256_file(cand / rel), rel


def test_selection_text_is_disjoint_from_the_final_eval(built):
    _, _, _, results = built
    import numpy as np

    ref = results["best/select/cpu/source"].output
    acc = ref.result["accuracy"]
    assert acc["windows"] == 6
    # The reference holds the whole suite's ids; the scored windows start after the eval's 4.
    ids = np.load(ref.path / "ids.npy")
    assert len(ids) >= (4 + 6) * 128
    assert results["best/select/cpu/source"].stage.params["skip_windows"] == 4


def test_a_rerun_builds_nothing(built):
    tmp, recipe, _, _ = built
    _, results = _build(recipe, tmp / "artifacts")
    assert {r.status for r in results.values()} == {"hit"}, {n: r.status for n, r in results.items() if r.status != "hit"}


def test_an_impossible_budget_names_the_smallest_candidate(built, mini_model):
    tmp, _, _, _ = built
    recipe = tmp / "tight.yaml"
    recipe.write_text(_recipe(mini_model, budget="max_bpw: 2.0").replace("name: budget", "name: tight"))
    report, results = _build(recipe, tmp / "artifacts")
    pick = results["best/pick"]
    assert pick.status == "failed"
    assert "no candidate is within 2.0 linear-layer bpw" in pick.reason and "the smallest is" in pick.reason
    assert report.artifacts[0].status == "failed"
    # Every candidate and its bit count came from the cache: only the choice ran again.
    assert all(results[n].status == "hit" for n in results if "/candidates/" in n)


def test_eval_treats_the_winner_as_its_own_format(built):
    from pipeline.validation import load_recipe
    from evals.run import evaluate

    tmp, recipe, _, _ = built
    report = evaluate(load_recipe(recipe), tmp / "artifacts", device="cpu", log=lambda m: None)
    (art,) = report.artifacts
    ev = art.evals["cpu"]
    assert ev.status == "done", ev.reason
    assert ev.runtime == ("llama_cpp" if art.kind == "gguf" else "transformers")


@pytest.mark.parametrize("candidate, where, says", [
    ("{kind: gguff, quants: [Q4_0]}", "targets.0.candidates.0.kind", "did you mean 'gguf'"),
    ("{kind: gptq, observer: msee}", "targets.0.candidates.0.observer", "did you mean 'mse'"),
    ("{name: x, kind: gptq}", "targets.0.candidates.0.name", "take no `name:`"),
    ("{group_size: 64}", "targets.0.candidates.0.kind", "needs a `kind:`"),
    ("{kind: gguf, quants: [IQ2_XS]}", "targets.0.candidates.0.imatrix", "targets.0.candidates.0.imatrix: true"),
])
def test_bad_candidates_are_located(write_recipe, candidate, where, says):
    from pipeline.errors import InvalidInput
    from pipeline.validation import load_recipe

    path = write_recipe(f"""
name: bad
source: {{model: builtin:tiny-llama, dtype: bfloat16}}
calibration: {{dataset: builtin}}
targets:
  - {{name: best, kind: budget, max_bpw: 4.5, candidates: [{candidate}]}}
""")
    with pytest.raises(InvalidInput) as exc:
        load_recipe(path, check_source=False)
    problems = {p.path: p.message for p in exc.value.problems}
    assert where in problems and says in problems[where], problems


def test_one_budget_exactly(write_recipe):
    from pipeline.errors import InvalidInput
    from pipeline.validation import load_recipe

    path = write_recipe("""
name: bad
source: {model: builtin:tiny-llama, dtype: bfloat16}
targets:
  - {name: best, kind: budget, max_bpw: 4.5, max_size_mib: 10, candidates: [{kind: fp8}]}
""")
    with pytest.raises(InvalidInput) as exc:
        load_recipe(path, check_source=False)
    assert "exactly one budget" in str(exc.value)
