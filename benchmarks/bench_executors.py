"""Wall time of one recipe, cold, with the local executor and with Ray on this machine.

    .venv/bin/python benchmarks/bench_executors.py [--recipe benchmarks/recipes/executors-mini.yaml]
        [--out DIR] [--work DIR] [--keep]

Runs ``quantforge run RECIPE --no-register`` twice, each into a fresh artifacts folder (nothing
cached: the source is made again too): first ``--executor local``, then ``--executor ray``
(a local Ray cluster with one CPU per core of this machine: each stage a task of 1 CPU, so
as many stages run at once as there are cores). One thread per stage in both
(``OMP_NUM_THREADS=1``, ``QUANTFORGE_THREADS=1``), so the difference is the overlap of
independent stages, minus Ray's start-up and task overhead.

For each run: the command's wall time, the build's span and the sum of its stages' own
seconds (from report.json's stage records, which carry each stage's start and end), the
most build stages that ran at once, when Ray's cluster was up, the load average around it
(other jobs on the machine slow both runs alike only when the load stays the same: read
it), and whether the two runs built byte-identical artifacts. Writes ``executors.json`` and
``executors.md`` under ``--out``. Exit 0 unless a command failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, child_env, host_info, markdown_table, quantforge_cli, run_measured  # noqa: E402


def _t(iso: str | None) -> float | None:
    return datetime.datetime.fromisoformat(iso).timestamp() if iso else None


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def one_run(executor: str, recipe: Path, work: Path, out: Path) -> dict:
    artifacts = work / executor
    shutil.rmtree(artifacts, ignore_errors=True)
    log = out / f"executors-{executor}.log"
    log.unlink(missing_ok=True)
    argv = quantforge_cli() + ["run", recipe, "--no-register", "--artifacts-dir", artifacts, "--executor", executor]
    load_before = os.getloadavg()
    run = run_measured(argv, env=child_env({"OMP_NUM_THREADS": "1"}, threads=1), cwd=REPO, log_file=log)
    load_after = os.getloadavg()
    wall = run.t1 - run.t0
    name = next(line for line in recipe.read_text().splitlines() if line.startswith("name:")).split(":", 1)[1].strip()
    report = json.loads((artifacts / name / "report.json").read_text()) if run.rc == 0 else {}
    built = [s for s in report.get("stages", []) if s.get("status") == "built" and s.get("started")]
    spans = [(_t(s["started"]), _t(s["ended"])) for s in built]
    ray_up = next((t - run.t0 for t, line in run.lines if line.startswith("[ray] ")), None)
    return {
        "executor": executor,
        "command": " ".join(str(a) for a in argv),
        "returncode": run.rc,
        "wall_s": round(wall, 1),
        "build_span_s": round(max(b for _, b in spans) - min(a for a, _ in spans), 1) if spans else None,
        "build_stage_seconds_sum": round(sum(s["seconds"] for s in built), 1),
        "build_stages_at_once": most_at_once(spans) if spans else None,
        "worker_pids": sorted({s["pid"] for s in built}),
        "ray_cluster_up_s": round(ray_up, 1) if ray_up is not None else None,
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "artifacts": {a["name"]: a.get("content_sha256") for a in report.get("artifacts", [])},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "benchmarks" / "recipes" / "executors-mini.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "executors")
    ap.add_argument("--work", type=Path, default=None, help="where the two artifacts folders go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts folders")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="qf-executors-"))
    runs = []
    try:
        for executor in ("local", "ray"):
            print(f"[bench] {executor}: quantforge run {args.recipe} --no-register --executor {executor}", file=sys.stderr, flush=True)
            runs.append(one_run(executor, args.recipe.resolve(), work, args.out))
            print(f"[bench] {executor}: {runs[-1]['wall_s']} s (exit {runs[-1]['returncode']})", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    local, ray = runs
    same = bool(local["artifacts"]) and local["artifacts"] == ray["artifacts"]
    result = {"host": host_info(), "recipe": str(args.recipe), "runs": runs,
              "speedup_wall": round(local["wall_s"] / ray["wall_s"], 2) if ray["wall_s"] else None,
              "identical_artifacts": same}
    (args.out / "executors.json").write_text(json.dumps(result, indent=2) + "\n")
    header = ["executor", "exit", "wall s", "build span s", "sum of build stages s", "build stages at once",
              "worker pids", "Ray up after s", "load 1 min before/after"]
    rows = [[r["executor"], r["returncode"], r["wall_s"], r["build_span_s"], r["build_stage_seconds_sum"],
             r["build_stages_at_once"], len(r["worker_pids"]), r["ray_cluster_up_s"],
             "/".join(map(str, r["loadavg_1min_before_after"]))] for r in runs]
    text = (markdown_table(header, rows) + f"\n\nlocal / ray wall time: {result['speedup_wall']}x; "
            f"artifacts byte-identical across executors: {'yes' if same else 'NO'} ({len(local['artifacts'])} artifacts)\n")
    (args.out / "executors.md").write_text(text)
    print(text)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
