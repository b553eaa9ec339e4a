"""The CI workflow and its scripts: static checks, matrices, summaries, the local rehearsal.

* .github/workflows/build.yml validates against GitHub's workflow schema
  (check-jsonschema) and has no zizmor findings (offline);
* security habits hold: actions pinned to commit SHAs, no credentials persisted,
  least-privilege permissions, no ${{ }} inside run: scripts, secrets only where used;
* scripts/ci_matrix.py puts targets and devices on the runners of .github/runners.yml,
  and picks recipes from GitHub events the way the workflow expects;
* scripts/ci_summary.py renders a real report.json;
* scripts/ci_local.sh runs the workflow's quantforge commands in the workflow's order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.targets import ci_runner_classes

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "build.yml"
CI_RECIPE = "tests/recipes/ci-smol.yaml"
RUNNERS = REPO / ".github" / "runners.yml"
BIN = Path(sys.executable).parent
SHA_PIN = re.compile(r"^\s*(?:-\s+)?uses:\s+([\w.-]+/[\w./-]+)@([0-9a-f]{40}) # v\d+\.\d+\.\d+\s*$")

sys.path.insert(0, str(REPO / "scripts"))
import ci_matrix  # noqa: E402
import ci_summary  # noqa: E402

MINI = """
name: {name}
source: {{model: builtin:tiny-llama-mini, dtype: bfloat16}}
calibration: {{dataset: builtin, samples: 16, seq_len: 128}}
targets:
  - {{name: fp8, kind: fp8, scheme: dynamic}}
  - {{name: gguf, kind: gguf, quants: [Q8_0]}}
evals: {{devices: {devices}}}
"""


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps_of(job: str) -> list[dict]:
    return workflow()["jobs"][job]["steps"]


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: install the dev extra (pip install -e '.[dev]'), which `make setup` does")
    return str(path)


# ------------------------------------------------------------ static checks
def test_workflow_matches_github_schema():
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_zizmor_has_no_findings():
    out = subprocess.run([tool("zizmor"), "--offline", "--no-progress", str(WORKFLOW)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No findings" in out.stdout, out.stdout + out.stderr


def test_zizmor_auditor_persona_only_the_documented_exception():
    """The strictest persona flags one thing: the validate job reads whether a secret is set
    without an environment (deliberate: validation must run for every pull request)."""
    out = subprocess.run([tool("zizmor"), "--offline", "--no-progress", "--persona", "auditor", "--format", "json", str(WORKFLOW)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    findings = json.loads(out.stdout)
    idents = [f["ident"] for f in findings]
    assert idents == ["secrets-outside-env"], idents
    primary = next(loc for loc in findings[0]["locations"] if loc["symbolic"]["kind"] == "Primary")
    assert primary["symbolic"]["route"]["route"] == [{"Key": "jobs"}, {"Key": "validate"}]
    assert primary["concrete"]["feature"] == "secrets.MLFLOW_TRACKING_URI"
    line = WORKFLOW.read_text().splitlines()[primary["concrete"]["location"]["start_point"]["row"]]
    assert line.strip() == "QF_CI_HAVE_TRACKING: ${{ secrets.MLFLOW_TRACKING_URI != '' }}"


def test_every_action_is_pinned_to_a_commit_with_a_version_comment():
    uses = [line for line in WORKFLOW.read_text().splitlines() if re.match(r"^\s*(-\s+)?uses:", line)]
    assert uses
    for line in uses:
        assert SHA_PIN.match(line), f"not pinned to a full SHA with '# vX.Y.Z': {line.strip()}"


def test_permissions_are_least_privilege_and_checkout_keeps_no_credentials():
    wf = workflow()
    assert wf["permissions"] == {}
    for name, job in wf["jobs"].items():
        assert job.get("permissions") == {"contents": "read"}, name
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name
    assert "github.ref" in wf["concurrency"]["group"]


def test_no_expressions_inside_run_scripts():
    for name, job in workflow()["jobs"].items():
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), f"{name}: {step.get('name')}: pass values through env:"


def test_secrets_reach_only_the_steps_that_talk_to_the_tracking_server():
    for name, job in workflow()["jobs"].items():
        assert "secrets." not in json.dumps(job.get("env", {})), f"{name}: job-wide secrets"
        for step in job["steps"]:
            env = json.dumps(step.get("env", {}))
            if "secrets." not in env:
                continue
            run = step.get("run", "")
            if name == "validate":
                assert step["env"] == {"QF_CI_HAVE_TRACKING": "${{ secrets.MLFLOW_TRACKING_URI != '' }}"}
            else:
                assert re.search(r"\$QF (pull|register) ", run), f"{name}: {step.get('name')} gets secrets it does not need"


def test_triggers_and_jobs():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # PyYAML reads the bare key `on` as True
    assert {"push", "pull_request", "schedule", "workflow_dispatch"} <= set(on)
    jobs = wf["jobs"]
    assert "quantforge validate recipes/*.yaml" in " ".join(s.get("run", "") for s in jobs["validate"]["steps"]).replace("$QF", "quantforge")
    assert "ci_matrix.py --github-event" in json.dumps(jobs["validate"]["steps"])
    for name in ("build", "eval", "finalize"):
        assert jobs[name]["runs-on"] == "${{ matrix.runs_on }}"
        assert jobs[name]["strategy"]["fail-fast"] is False
        assert jobs[name]["environment"] == {"name": "mlflow", "deployment": False}
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.validate.outputs.build) }}"
    assert jobs["eval"]["strategy"]["matrix"] == "${{ fromJSON(needs.validate.outputs.eval) }}"
    assert '$QF build "$RECIPE" --target "$TARGET"' in json.dumps(jobs["build"]["steps"]).replace('\\"', '"')


def _quantforge_verbs(text: str, marker: str) -> list[str]:
    return re.findall(re.escape(marker) + r" (validate|build|register|pull|eval)\b(?! --help)", text)


def test_eval_job_registers_before_failing_on_a_gate():
    steps = steps_of("eval")
    runs = [s.get("run", "") for s in steps]
    order = [v for r in runs for v in _quantforge_verbs(r, "$QF")]
    assert order == ["pull", "eval", "register"]
    ev = next(s for s in steps if s.get("id") == "eval")
    assert "--fail-on-gate" in ev["run"] and '"$rc" -eq 3' in ev["run"]
    names = [s.get("name", "") for s in steps]
    i_reg = next(i for i, r in enumerate(runs) if "$QF register" in r)
    i_sum = next(i for i, r in enumerate(runs) if "ci_summary.py" in r)
    i_fail = names.index("Fail on a failed gate")
    assert i_reg < i_sum < i_fail == len(steps) - 1
    assert steps[i_fail]["if"] == "${{ !cancelled() && steps.eval.outputs.rc == '3' }}"
    assert "GITHUB_STEP_SUMMARY" in runs[i_sum]


def test_ci_local_runs_the_workflows_commands_in_the_same_order():
    wf_text = WORKFLOW.read_text()
    jobs = workflow()["jobs"]
    wf_order = [v for job in ("validate", "build", "eval", "finalize") for s in jobs[job]["steps"] for v in _quantforge_verbs(s.get("run", ""), "$QF")]
    local = (REPO / "scripts" / "ci_local.sh").read_text()
    local_order = _quantforge_verbs(local, '"$qf"')
    assert wf_order == local_order == ["validate", "build", "register", "pull", "eval", "register", "pull", "register"]
    assert "ci_matrix.py" in local and "ci_summary.py" in local and "ci_matrix.py" in wf_text
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "ci_local.sh")]).returncode == 0


# --------------------------------------------------------------- ci_matrix
def test_matrix_of_the_shipped_recipes_splits_targets_by_kind():
    from pipeline.validation import load_recipe

    runners = yaml.safe_load(RUNNERS.read_text())
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "ci_matrix.py"), "--all"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert [r["recipe"] for r in result["recipes"]] == [f"recipes/{p.name}" for p in recipes]
    for path in recipes:
        recipe = load_recipe(path, check_source=False).recipe
        builds = [e for e in result["build"]["include"] if e["name"] == recipe.name]
        assert [(e["target"], e["kind"]) for e in builds] == [(t.name, t.kind) for t in recipe.targets]
        for e in builds:
            assert e["runs_on"] == runners["build"]["classes"][ci_runner_classes()[e["kind"]]]
            assert e["recipe"] == f"recipes/{path.name}"
        evals = [e for e in result["eval"]["include"] if e["name"] == recipe.name]
        assert [e["device"] for e in evals] == list(recipe.evals.devices)
    demo = {e["kind"]: e["runs_on"] for e in result["build"]["include"] if e["name"] == "demo"}
    assert demo["gguf"] == "ubuntu-latest"
    for kind in ("gptq", "awq", "fp8", "tensorrt"):
        assert demo[kind] == ["self-hosted", "linux", "gpu"], kind
    assert [(e["device"], e["runs_on"]) for e in result["eval"]["include"] if e["name"] == "demo"] == [("cpu", "ubuntu-latest")]
    assert result["has_builds"] is True
    assert result["finalize"] == {"include": []}  # demo's gates need only cpu


def test_every_target_kind_has_a_build_runner():
    """Kinds declare a runner class; runners.yml maps every class that a kind declares to labels."""
    runners = ci_matrix.load_runners(RUNNERS)
    assert set(ci_runner_classes().values()) <= set(runners["build"]["classes"])
    for kind in ci_runner_classes():
        assert ci_matrix.build_labels(runners, kind)
    assert ci_matrix.eval_labels(runners, "cpu") == "ubuntu-latest"


def test_matrix_devices_go_to_eval_runners_and_several_need_finalize(tmp_path):
    p = tmp_path / "multi.yaml"
    p.write_text(MINI.format(name="multi", devices="[cpu, cuda, h100, a10g]"))
    result = ci_matrix.make_matrices([p], ci_matrix.load_runners(RUNNERS))
    assert [(e["device"], e["runs_on"]) for e in result["eval"]["include"]] == [
        ("cpu", "ubuntu-latest"),
        ("cuda", ["self-hosted", "linux", "gpu"]),
        ("h100", ["self-hosted", "linux", "gpu", "h100"]),
        ("a10g", ["self-hosted", "linux", "gpu", "a10g"]),  # not listed: gpu_class_default
    ]
    assert result["finalize"]["include"] == [{"recipe": str(p), "name": "multi", "runs_on": "ubuntu-latest"}]
    assert result["has_finalize"] is True


def test_matrix_errors_unknown_kind_and_duplicate_names(tmp_path, capsys):
    runners = tmp_path / "runners.yml"
    runners.write_text("build: {classes: {gpu: ubuntu-latest}}\neval: {devices: {cpu: ubuntu-latest}}\n")
    a = tmp_path / "a.yaml"
    a.write_text(MINI.format(name="same", devices="[cpu]"))
    b = tmp_path / "b.yaml"
    b.write_text(MINI.format(name="same", devices="[cpu]"))
    assert ci_matrix.main([str(a), str(b), "--runners", str(runners)]) == 2
    err = capsys.readouterr().err
    assert "target kind 'gguf' builds on runner class 'cpu', which .github/runners.yml build.classes lacks" in err
    assert "recipe name 'same' is also used by" in err
    assert "no runner for eval device 'h100'" in _main_err([str(_write(tmp_path, "c.yaml", MINI.format(name="c", devices="[h100]")).resolve()),
                                                              "--runners", str(runners)], capsys)


def _write(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name


def _main_err(argv, capsys) -> str:
    assert ci_matrix.main(argv) == 2
    return capsys.readouterr().err


def test_github_output_lines_are_single_line_json(tmp_path):
    out_file = tmp_path / "out"
    assert ci_matrix.main(["--all", "--github-output", str(out_file), "--recipes-dir", str(REPO / "recipes")]) == 0
    values = dict(line.split("=", 1) for line in out_file.read_text().splitlines())
    assert set(values) == {"recipes", "build", "eval", "finalize", "has_builds", "has_finalize", "reason", "promote"}
    assert json.loads(values["build"])["include"]
    assert values["has_builds"] == "true"


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    """A repository with two recipes; the second commit changes only b.yaml."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text(MINI.format(name="a", devices="[cpu]"))
    (tmp_path / "recipes" / "b.yaml").write_text(MINI.format(name="b", devices="[cpu]"))
    (tmp_path / "README.md").write_text("x\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    first = git("rev-parse", "HEAD")
    (tmp_path / "recipes" / "b.yaml").write_text(MINI.format(name="b", devices="[cpu, cuda]"))
    (tmp_path / "README.md").write_text("y\n")
    git("commit", "-q", "-am", "two")
    second = git("rev-parse", "HEAD")
    monkeypatch.chdir(tmp_path)
    return tmp_path, first, second


def _event(tmp_path: Path, name: str, payload: dict, tracking: bool = True) -> dict[str, str]:
    path = tmp_path / f"event-{name}.json"
    path.write_text(json.dumps(payload))
    return {"GITHUB_EVENT_NAME": name, "GITHUB_EVENT_PATH": str(path), "QF_CI_HAVE_TRACKING": "true" if tracking else "false"}


REPO_PAYLOAD = {"full_name": "org/quantforge", "default_branch": "main"}


def test_github_events_pick_recipes(git_repo):
    root, first, second = git_repo
    rdir = Path("recipes")
    all_ = [Path("recipes/a.yaml"), Path("recipes/b.yaml")]

    def pick(name, payload, tracking=True):
        paths, reason, promote = ci_matrix.from_github_event(rdir, _event(root, name, payload, tracking))
        return [Path(p) for p in paths], reason, promote

    pr = {"repository": REPO_PAYLOAD, "pull_request": {"base": {"sha": first}, "head": {"sha": second, "repo": {"full_name": "org/quantforge"}}}}
    assert pick("pull_request", pr)[0] == [Path("recipes/b.yaml")]
    assert pick("pull_request", pr)[2] is False  # pull requests never promote
    fork = json.loads(json.dumps(pr))
    fork["pull_request"]["head"]["repo"]["full_name"] = "someone/quantforge"
    paths, reason, _ = pick("pull_request", fork)
    assert paths == [] and "someone/quantforge" in reason

    push = {"repository": REPO_PAYLOAD, "ref": "refs/heads/main", "before": first, "after": second}
    assert pick("push", push) == ([Path("recipes/b.yaml")], f"push: recipes changed in {first[:12]}..{second[:12]}", True)
    assert pick("push", {**push, "before": "0" * 40})[0] == all_
    assert pick("push", {**push, "before": "f" * 40})[0] == all_  # not in the history: everything
    assert pick("push", {**push, "ref": "refs/heads/feature"})[0] == []

    assert pick("schedule", {"schedule": "23 3 * * *"}) == (all_, "schedule: every recipe", True)
    assert pick("workflow_dispatch", {"repository": REPO_PAYLOAD, "ref": "refs/heads/main", "inputs": {"recipes": ""}})[0] == all_
    assert pick("workflow_dispatch", {"repository": REPO_PAYLOAD, "ref": "refs/heads/x", "inputs": {"recipes": "recipes/a.yaml"}})[0:3:2] == ([Path("recipes/a.yaml")], False)
    with pytest.raises(ci_matrix.MatrixError, match="no such file recipes/zz.yaml"):
        pick("workflow_dispatch", {"repository": REPO_PAYLOAD, "inputs": {"recipes": "recipes/zz.yaml"}})

    paths, reason, _ = pick("schedule", {}, tracking=False)
    assert paths == [] and "MLFLOW_TRACKING_URI" in reason


def test_changed_files_ignore_deleted_and_non_recipe_paths(git_repo, tmp_path):
    root, _, _ = git_repo
    listing = root / "changed.txt"
    listing.write_text("README.md\nrecipes/b.yaml\nrecipes/deleted.yaml\nrecipes/sub/x.yaml\n")
    assert ci_matrix.main(["--changed-files", str(listing), "--github-output", str(root / "o")]) == 0
    values = dict(line.split("=", 1) for line in (root / "o").read_text().splitlines())
    assert [r["recipe"] for r in json.loads(values["recipes"])] == ["recipes/b.yaml"]


# -------------------------------------------------------------- ci_summary
@pytest.fixture
def report_file(tmp_path) -> Path:
    """A small real report: what build + eval on cpu write, with cuda still pending."""
    from evals.policy import evaluate_gates
    from pipeline.spec import GateSpec
    from pipeline.core.report import ArtifactReport, Report, SourceReport, write_report

    spec = GateSpec(max_perplexity_increase_pct=5.0)

    def ev(ppl: float, tps: float) -> dict:
        return {"status": "done", "runtime": "transformers", "dequantized": True,
                "metrics": {"perplexity": ppl, "delta_ppl_pct": 100 * (ppl / 50 - 1), "kl_mean": 0.012,
                            "top1_agreement_pct": 96.5, "decode_tps": tps, "decode_speedup": tps / 100, "size_bytes": 3 * 2**20}}

    fp8 = ArtifactReport(name="fp8", target="fp8", kind="fp8", status="built", bytes=3 * 2**20, content_sha256="a" * 64,
                         format="compressed-tensors", build_seconds=2.5, evals={"cpu": ev(50.4, 95.0), "cuda": {"status": "pending"}},
                         registry={"name": "demo-fp8", "version": "2", "aliases": ["candidate"]})
    fp8.gates = evaluate_gates(spec, ["cpu", "cuda"], fp8.evals)
    q4 = ArtifactReport(name="gguf-Q4_K_M", target="gguf", kind="gguf", variant="Q4_K_M", status="built", bytes=2**20,
                        content_sha256="b" * 64, evals={"cpu": {**ev(61.0, 180.0), "runtime": "llama_cpp", "dequantized": False},
                                                        "cuda": {"status": "pending"}})
    q4.gates = evaluate_gates(spec, ["cpu", "cuda"], q4.evals)
    trt = ArtifactReport(name="trt-fp8", target="trt-fp8", kind="tensorrt", status="skipped", reason="needs | a GPU\nand tensorrt-llm")
    report = Report(recipe="demo", recipe_sha256="e" * 64, git_commit="c" * 40, quantforge_version="0.1.0",
                    source=SourceReport(model="builtin:tiny-llama", fingerprint="f" * 64),
                    baseline={"cpu": {"status": "done", "runtime": "transformers", "metrics": {"perplexity": 50.0, "decode_tps": 100.0}}},
                    devices={"cpu": {"status": "done"}, "cuda": {"status": "pending", "reason": "no such device on this machine"}},
                    artifacts=[fp8, q4, trt])
    path = tmp_path / "demo" / "report.json"
    path.parent.mkdir()
    write_report(path, report)
    return path


def _summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "ci_summary.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_summary_renders_a_real_report(report_file):
    out = _summary(str(report_file), "--title", "eval demo on cpu")
    assert out.returncode == 0, out.stderr
    md = out.stdout
    assert md.startswith("## eval demo on cpu\n")
    assert "| `fp8` | fp8 | compressed-tensors | ✅ built | 3.0 MiB | 2.5 | `demo-fp8` v2 (@candidate) |" in md
    assert "| `trt-fp8` | tensorrt | – | ⏭️ skipped | – | – | – |" in md
    assert "### Eval on `cpu` (done)" in md and "### Eval on `cuda` (pending)" in md
    # Each device's table is the one `quantforge report` prints (evals.table), names as code spans.
    from evals.table import for_device
    from pipeline.core.report import read_report

    report = read_report(report_file)
    for device in ("cpu", "cuda"):
        assert "\n".join(for_device(report, device).markdown(code=("artifact",))) in md
    assert "| `source` | transformers |  |  | - | 50.000 |" in md
    assert "| `gguf-Q4_K_M` | llama.cpp |  |  | 3.0 MiB | 61.000 | +22.00 | 0.0120 |" in md
    assert "| `fp8` | - |  |  | 3.0 MiB | pending |" in md  # pending on cuda
    assert "| `fp8` | ⏳ pending | – | cuda |" in md
    assert "| `gguf-Q4_K_M` | ❌ failed | perplexity_increase_pct on cpu: 22 vs 5 | cuda |" in md
    assert "needs \\| a GPU and tensorrt-llm" in md  # pipes escaped, newlines folded
    for line in md.splitlines():
        if line.startswith("|"):
            assert len(re.split(r"(?<!\\)\|", line)) in (9, 18, 6), line  # every row has its table's columns


def test_summary_one_device_and_missing_report(report_file, tmp_path):
    md = _summary(str(report_file), "--device", "cpu").stdout
    assert "Eval on `cpu`" in md and "Eval on `cuda`" not in md
    missing = _summary(str(tmp_path / "nope" / "report.json"))
    assert missing.returncode == 0 and "no report at" in missing.stdout


def test_summary_of_the_plan(tmp_path):
    result = ci_matrix.make_matrices([REPO / "recipes" / "demo.yaml"], ci_matrix.load_runners(RUNNERS))
    result.update(reason="schedule: every recipe", promote=True)
    (tmp_path / "m.json").write_text(json.dumps(result))
    md = _summary("--matrix", str(tmp_path / "m.json")).stdout
    assert "schedule: every recipe · promotion on" in md
    assert "`gguf` | gguf | `ubuntu-latest` |" in md
    assert "`w4a16-gptq` | gptq | `self-hosted, linux, gpu` |" in md


# --------------------------------------------------------------- ci_local
@pytest.mark.slow
def test_ci_local_starts_and_stops_its_server(tmp_path):
    """Up to the plan step (server start, validate, matrix), then the server is gone."""
    env = {**os.environ, "CI_LOCAL_DIR": str(tmp_path / "ci"), "CI_LOCAL_STOP_AFTER": "validate"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "ci_local.sh"), CI_RECIPE, str(BIN)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^ok: \S*ci-smol.yaml ", out.stdout, re.M), out.stdout
    matrix = json.loads((tmp_path / "ci" / "matrix.json").read_text())
    assert len(matrix["build"]["include"]) == 3
    pid_file = tmp_path / "ci" / "server" / "server.pid"
    assert not pid_file.exists(), "the server's pid file is removed when it stops"
    log = (tmp_path / "ci" / "server" / "server.log").read_text()
    m = re.search(r"pid (\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert not Path(f"/proc/{m.group(1)}").exists(), "the mlflow server outlived the rehearsal"
    assert log  # it did run


def test_ci_local_usage_errors(tmp_path):
    script = str(REPO / "scripts" / "ci_local.sh")
    assert subprocess.run(["bash", script], capture_output=True).returncode == 2
    assert subprocess.run(["bash", script, str(tmp_path / "none.yaml"), str(BIN)], capture_output=True).returncode == 2
    bad = subprocess.run(["bash", script, "recipes/demo.yaml", str(BIN)], capture_output=True, text=True,
                         env={**os.environ, "CI_LOCAL_STOP_AFTER": "nope"})
    assert bad.returncode == 2 and "CI_LOCAL_STOP_AFTER" in bad.stderr


@pytest.mark.slow
def test_make_ci_local_registers_cpu_results(tmp_path):
    """The whole rehearsal on the real default model: builds, pull, eval on cpu, register to a real server."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "ci"
    env = {**os.environ, "CI_LOCAL_DIR": str(work), "CI_LOCAL_KEEP": "1"}
    out = subprocess.run(["make", "ci-local", f"RECIPE={CI_RECIPE}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    # Read what the (now stopped) server recorded, straight from its backend store.
    client = MlflowClient(f"sqlite:///{work / 'server' / 'mlflow.db'}")
    report = json.loads((work / "eval-cpu" / "ci-smol" / "report.json").read_text())
    built = [a for a in report["artifacts"] if a["status"] == "built"]
    assert {a["kind"] for a in built} == {"gptq", "fp8", "gguf"}
    for a in built:
        assert a["evals"]["cpu"]["status"] == "done", a["name"]
        mv = client.get_model_version(a["registry"]["name"], a["registry"]["version"])
        assert mv.tags["cpu.perplexity"], a["name"]
        # Registered either way; only artifacts that pass their gates get @production.
        assert ("production" in mv.aliases) == (a["gates"]["passed"] is True), a["name"]
    # As the workflow's eval job: a failed gate fails the job with exit 3, after registering.
    if any(a["gates"]["passed"] is False for a in built):
        assert out.returncode != 0 and "ci-local: a gate failed on cpu" in out.stderr and "Error 3" in out.stderr, log
    else:
        assert out.returncode == 0, log
