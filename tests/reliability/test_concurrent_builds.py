"""Two `quantforge build` processes of one recipe into one store at the same time: both
succeed, every stage is built once (the other process waits on the stage's lock and
then finds the output), every manifest verifies, and report.json holds both jobs' view."""

from __future__ import annotations

import re

from tests.reliability.helpers import check_report, check_store, cli, kill_group, recipe_text, start

STAGES = ("source", "fp8/quantize", "gguf/convert", "gguf/quantize/Q8_0")


def test_two_builds_of_one_recipe_at_once(tmp_path, mini_model):
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(mini_model, "fp8 gguf"))
    artifacts = (tmp_path / "artifacts").resolve()
    logs = [tmp_path / f"build{i}.log" for i in (1, 2)]
    procs = [start(cli("build", recipe, "--artifacts-dir", artifacts), log) for log in logs]
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            kill_group(p)
    outputs = [log.read_text(errors="replace") for log in logs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]

    runs = {s: sum(o.count(f"[{s}] done in") for o in outputs) for s in STAGES}
    assert runs == {s: 1 for s in STAGES}, f"each stage runs in exactly one of the two processes: {runs}"
    totals = [re.search(r"stages: (.*?)\s+report:", o).group(1) for o in outputs]
    built = sum(int(m) for t in totals for m in re.findall(r"(\d+) built", t))
    hit = sum(int(m) for t in totals for m in re.findall(r"(\d+) hit", t))
    assert (built, hit) == (len(STAGES), len(STAGES)), totals  # what one built, the other found

    stored = check_store(artifacts)
    assert {k: len(v) for k, v in stored.items()} == {"source-local": 1, "llmc-fp8": 1, "gguf-convert": 1, "gguf-quantize": 1}
    check_report(artifacts)
