"""The Ray executor on small stages of the real runner and store (a local Ray cluster of 2 CPUs):
independent stages run at once in different worker processes, a failure skips only its
dependents, a stored output is answered without a task; and what each stage asks Ray for."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.executors import ExecutorChoice, choose, task_resources, using
from pipeline.executors import execute
from pipeline.core.stage import ArtifactInfo, Stage
from pipeline.errors import InvalidInput

ray = pytest.importorskip("ray")


def write_after_pause(ctx) -> dict:
    for i in range(3):  # log lines travel to the driver while the stage runs
        ctx.log(f"pausing {i}")
        time.sleep(0.5)
    (ctx.out_dir / "out.txt").write_text(ctx.stage.name)
    return {"wrote": ctx.stage.name}


def fail(ctx) -> dict:
    raise RuntimeError("this stage is broken on purpose")


def read_input(ctx) -> dict:
    return {"read": (ctx.input("up").path / "out.txt").read_text()}


def _stage(name: str, run, inputs=None) -> Stage:
    return Stage(name=name, kind=f"test-{name.replace('/', '-')}", version="1", params={}, run=run, inputs=inputs or {},
                 artifact=ArtifactInfo(name=name, target=name.split("/")[0], kind="test"))


@pytest.fixture(scope="module")
def cluster():
    from pipeline.executors.ray_executor import shutdown

    choice = ExecutorChoice(executor="ray", workers=2, max_retries=0)
    yield choice
    shutdown()


def _loaded(path):
    from pipeline.validation import load_recipe

    return load_recipe(path, check_source=False).recipe


def test_independent_stages_overlap_and_a_failure_skips_only_its_dependents(cluster, tmp_path):
    stages = [
        _stage("a/build", write_after_pause),
        _stage("b/build", write_after_pause),
        _stage("d/build", write_after_pause),
        _stage("a/use", read_input, {"up": "a/build"}),
        _stage("c/build", fail),
        _stage("c/use", read_input, {"up": "c/build"}),
    ]
    from pipeline.core.runner import set_verbosity

    lines: list[str] = []
    set_verbosity(1)  # -v: a stage's own lines reach the terminal too (by default only its log file)
    try:
        with using(cluster):
            results = execute(stages, tmp_path, log=lines.append, logs_dir=tmp_path / "logs")
    finally:
        set_verbosity(0)
    assert list(results) == [s.name for s in stages], "results come back in plan order"
    status = {n: r.status for n, r in results.items()}
    assert status == {"a/build": "built", "b/build": "built", "d/build": "built", "a/use": "built", "c/build": "failed",
                      "c/use": "skipped"}
    assert "broken on purpose" in results["c/build"].reason
    assert "needs c/build" in results["c/use"].reason
    assert results["a/use"].output.result == {"read": "a/build"}
    a, b = results["a/build"], results["b/build"]
    assert a.pid != b.pid, "two workers ran the two independent stages"
    assert a.started < b.ended and b.started < a.ended, "and at the same time"
    spans = [(r.started, r.ended) for r in results.values() if r.status != "skipped"]
    assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) == 2, "never more stages than the 2 CPUs"
    assert all(r.node == results["a/build"].node and len(r.node) > 20 for r in (a, b)), "a Ray node id"
    assert any(line.startswith("[a/build] started on ") for line in lines), lines
    assert "[a/build] running (test-a-build)" in lines, "the stage's own log lines reach the driver"
    assert [m for m in lines if m.startswith("[b/build] pausing")] == [f"[b/build] pausing {i}" for i in range(3)], "in order"
    assert (tmp_path / "logs" / "c__build.log").read_text().count("broken on purpose") >= 1

    with using(cluster):
        again = execute(stages[:3], tmp_path, log=lines.append)
    assert {r.status for r in again.values()} == {"hit"}
    assert {r.node for r in again.values()} == {"driver"}, "stored outputs are answered without a task"


def count_and_write(ctx) -> dict:
    with open(ctx.artifacts_dir / "runs.txt", "a") as f:  # outside the store: every run leaves a line
        f.write(f"{ctx.stage.name}\n")
    time.sleep(1.5)
    (ctx.out_dir / "out.txt").write_text("once")
    return {}


def test_two_runs_that_reach_for_the_same_stage_build_it_once(cluster, tmp_path):
    import threading

    from pipeline.executors.ray_executor import connect

    connect(cluster, lambda m: None)  # once, before two threads use the session
    stage = _stage("shared/build", count_and_write)
    results: list = []

    def one_driver() -> None:
        with using(cluster):
            results.append(execute([stage], tmp_path, log=lambda m: None)["shared/build"])

    threads = [threading.Thread(target=one_driver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["built", "hit"], [(r.status, r.reason) for r in results]
    assert results[0].pid != results[1].pid, "two workers reached for it at once"
    assert (tmp_path / "runs.txt").read_text() == "shared/build\n", "the second waited on the key's lock, then found it"


def _recipe(tmp_path: Path, execution: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: r
source: {{model: builtin:tiny-llama-mini}}
calibration: {{samples: 8, seq_len: 64}}
targets:
  - {{name: q, kind: gptq, bits: 4, group_size: 128}}
  - {{name: g, kind: gguf, quants: [Q8_0]}}
{execution}
""")
    return recipe


def test_resources_follow_the_kinds_declarations_and_the_recipe(tmp_path):
    choice = choose(_loaded(_recipe(tmp_path, "execution: {executor: ray, resources: {q: {num_gpus: 0.5, memory_gb: 2}}}")), None, None)
    assert choice.executor == "ray" and choice.target_kinds == {"q": "gptq", "g": "gguf"}
    plain = ExecutorChoice(executor="ray", target_kinds=choice.target_kinds)
    gptq = Stage(name="q/quantize", kind="llmc-gptq", version="1", params={}, run=None, target="q")
    gguf = Stage(name="g/convert", kind="gguf-convert", version="1", params={}, run=None, target="g")
    eval_cuda = Stage(name="eval/cuda/q", kind="eval-artifact", version="1", params={}, run=None, target="q")
    eval_cpu = Stage(name="eval/cpu/q", kind="eval-artifact", version="1", params={}, run=None, target="q")
    assert task_resources(gptq, plain, cluster_gpus=2) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert task_resources(gptq, plain, cluster_gpus=0)["num_gpus"] == 0, "no GPU in the cluster: on CPU, as locally"
    assert task_resources(gguf, plain, cluster_gpus=2)["num_gpus"] == 0, "GGUF quantization is CPU work"
    assert task_resources(eval_cuda, plain, cluster_gpus=1)["num_gpus"] == 1
    assert task_resources(eval_cpu, plain, cluster_gpus=1)["num_gpus"] == 0
    assert task_resources(gptq, choice, cluster_gpus=1) == {"num_cpus": 1.0, "num_gpus": 0.5, "memory": 2 * 2**30}
    with pytest.raises(InvalidInput, match="asks for 0.5 GPU"):
        task_resources(gptq, choice, cluster_gpus=0)


def test_bad_execution_settings_are_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="'qq', which is not a target"):
        choose(_loaded(_recipe(tmp_path, "execution: {executor: ray, resources: {qq: {num_gpus: 1}}}")), None, None)
    with pytest.raises(InvalidInput, match="needs --executor ray"):
        choose(_loaded(_recipe(tmp_path)), None, "127.0.0.1:6379")
    with pytest.raises(InvalidInput, match="choose one of local, ray"):
        choose(_loaded(_recipe(tmp_path)), "dask", None)
    assert choose(_loaded(_recipe(tmp_path)), None, None).executor == "local"


def test_execution_is_not_part_of_what_a_recipe_builds(tmp_path):
    from pipeline.validation import load_recipe

    plain = load_recipe(_recipe(tmp_path), check_source=False).recipe
    on_ray = load_recipe(_recipe(tmp_path, "execution: {executor: ray, workers: 2}"), check_source=False).recipe
    assert on_ray.execution.workers == 2 and plain.execution is None
    assert plain.sha256() == on_ray.sha256(), "switching executors keeps the report and the stage keys"
    assert "execution" not in on_ray.model_dump(mode="json")


def test_cli_refuses_bad_executor_flags_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    recipe = _recipe(tmp_path)
    artifacts = tmp_path / "artifacts"
    for args, says in ((["build", str(recipe), "--executor", "dask"], "choose one of local, ray"),
                       (["eval", str(recipe), "--address", "10.0.0.1:6379"], "needs --executor ray")):
        result = CliRunner().invoke(app, args + ["--artifacts-dir", str(artifacts)])
        assert result.exit_code == 2, result.output
        assert says in result.output
    assert not artifacts.exists(), "nothing written"
