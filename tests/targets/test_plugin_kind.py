"""A target kind from a package outside quantforge, found through its entry point, goes through
plan, build, eval and register with no edit to quantforge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "tests" / "plugin"  # a package and its .dist-info, as pip installs one


def quantforge(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=1200)


def test_a_plugin_kind_plans_builds_evaluates_and_registers(tmp_path, mini_model):
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(f"""
name: plugin
source: {{model: {mini_model}, dtype: bfloat16}}
targets:
  - {{name: copy, kind: copy}}
evals:
  devices: [cpu]
  context: 64
  max_windows: 2
  speed: {{prompt_lengths: [16], decode_tokens: 4, warmup: 0, min_iterations: 1, min_seconds: 0}}
registry: {{model_name: plugin}}
""")
    artifacts = tmp_path / "artifacts"
    plan = quantforge("plan", recipe, "--artifacts-dir", artifacts, "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "copy/copy" in plan.stdout
    run = quantforge("run", recipe, "--artifacts-dir", artifacts, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((artifacts / "plugin" / "report.json").read_text())
    (copy,) = report["artifacts"]
    assert copy["kind"] == "copy" and copy["status"] == "built"
    ev = copy["evals"]["cpu"]
    assert ev["status"] == "done" and ev["runtime"] == "transformers"
    assert abs(ev["metrics"]["delta_ppl_pct"]) < 1e-6  # the same weights as the source
    assert copy["registry"]["version"] == "1"
    # Without the plugin on the path, the same recipe names the kind as unknown (exit 2).
    bare = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "validate", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=300)
    assert bare.returncode == 2 and "copy" in bare.stdout + bare.stderr
