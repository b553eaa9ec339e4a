"""The demo as a user runs it: each stage's time and peak memory, the total, and a warm rerun.

    .venv/bin/python benchmarks/bench_demo.py [--recipe recipes/demo.yaml] [--artifacts-dir DIR]
        [--no-register] [--json OUT.json] [--md OUT.md] [--keep]

Runs, into a fresh artifacts folder, one process each (as ``make demo`` does, split):
``quantforge build RECIPE``, ``quantforge eval RECIPE`` and ``quantforge register RECIPE``
(a local SQLite MLflow store under the artifacts folder; ``--no-register`` leaves it out).
Then the same commands again: the warm rerun, where every stage must be a cache hit.

Per stage (build and eval stages alike):
* seconds: the store manifest's ``seconds`` (what the runner measured around the stage's
  run function; the manifest hashing and rename that follow are not in it), with the
  breakdown a stage records (llm-compressor: load/quantize/save/verify; evals: model load,
  accuracy, lm-eval tasks);
* peak RSS of the command's own process while the stage ran (stages run one after the other
  in that process, so this includes whatever earlier stages left allocated: read it as
  "the process reached X during this stage");
* each child process the stage started (verifier, converter, llama.cpp tools, eval workers),
  with its own peak RSS, attributed by the store temp folder in its arguments.
Memory is sampled from /proc every 0.2 s (short spikes can be missed); ``maxrss`` is the
kernel's exact high-water mark of the largest single process of the command.

Prints the table and totals; PASS/FAIL lines for issue 12's goals (the demo in at most
15 minutes with setup done, a warm rerun under 5 s). Exit 0 unless a command failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (REPO, child_env, host_info, markdown_table, quantforge_cli, run_measured,  # noqa: E402
                     stage_of_process, stage_windows, store_manifests)

DEMO_LIMIT_S = 15 * 60
WARM_LIMIT_S = 5.0


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def breakdown(manifest: dict) -> str:
    """The parts a stage recorded of its own time."""
    r = manifest.get("result") or {}
    parts = []
    for k in ("load_s", "quantize_s", "save_s", "verify_s", "quantize_seconds", "export_seconds", "verify_seconds"):
        if isinstance(r.get(k), (int, float)):
            parts.append(f"{k.removesuffix('_s').removesuffix('_seconds')} {_num(r[k])}")
    if "speed" in r or "accuracy" in r:
        spd, acc, tasks = r.get("speed") or {}, r.get("accuracy") or {}, r.get("tasks") or {}
        if spd.get("load_seconds") is not None:
            parts.append(f"load {_num(spd['load_seconds'])}")
        if acc.get("eval_seconds") is not None:
            parts.append(f"accuracy {_num(acc['eval_seconds'])}")
        if tasks.get("seconds") is not None:
            parts.append(f"tasks {_num(tasks['seconds'])}")
        if spd.get("runtime"):
            parts.append(f"speed: {spd['runtime']}")
    if r.get("build_seconds") is not None:
        parts.append(f"engine {r['build_seconds']}")
    return ", ".join(parts)


def report_stages(artifacts: Path, recipe_name: str) -> dict:
    """report.json's stage records (build stages; a rerun rewrites them as hits with 0 s: read after the cold build)."""
    report = artifacts / recipe_name / "report.json"
    return {s["name"]: s for s in json.loads(report.read_text()).get("stages", [])} if report.is_file() else {}


def analyse(runs: dict, artifacts: Path, recorded: dict) -> tuple[list[dict], dict]:
    """Per-stage rows from the manifests and the cold runs' lines and memory samples."""
    manifests = store_manifests(artifacts)
    key_to_stage = {m["key"][:12]: m.get("stage", m["kind"]) for m in manifests}
    rows, attributed = [], set()
    for cmd in ("build", "eval", "register"):
        run = runs.get(cmd)
        if run is None:
            continue
        windows = stage_windows(run)
        children: dict[str, list] = {}
        for p in run.children():
            stage = stage_of_process(p, key_to_stage, windows)
            if stage is not None:
                children.setdefault(stage, []).append(p)
                attributed.add((cmd, p.pid))
        for name, (start, end) in windows.items():
            m = next((m for m in manifests if m.get("stage") == name), None)
            kids = children.get(name, [])
            rows.append({
                "command": cmd,
                "stage": name,
                "kind": m["kind"] if m else None,
                "status": "built" if m else (recorded.get(name) or {}).get("status", "failed"),
                "seconds": m.get("seconds") if m else round(end - start, 1),
                "report_seconds": (recorded.get(name) or {}).get("seconds"),  # report.json's stages[] (build stages)
                "window_s": round(end - start, 2),
                "breakdown": breakdown(m) if m else "",
                "main_rss_peak_mib": round(run.window_peak(start, end, which=2)),
                "tree_rss_peak_mib": round(run.window_peak(start, end, which=1)),
                "children": [{"what": p.label(), "peak_rss_mib": round(p.peak_mib), "seconds": round(p.last - p.first, 1)} for p in kids],
                "bytes": m.get("bytes") if m else None,
            })
    other = {cmd: [p.as_dict(run.t0) for p in run.children() if (cmd, p.pid) not in attributed]
             for cmd, run in runs.items()}
    return rows, other


def children_text(children: list[dict]) -> str:
    """Children summarized by kind: `2x python -m evals.worker (max 812 MiB)`."""
    groups: dict[str, list[dict]] = {}
    for c in children:
        groups.setdefault(c["what"], []).append(c)
    out = []
    for what, cs in groups.items():
        peak = max(c["peak_rss_mib"] for c in cs)
        out.append(f"{len(cs)}x {what} ({peak} MiB)" if len(cs) > 1 else f"{what} ({peak} MiB, {cs[0]['seconds']} s)")
    return "; ".join(out)


def all_hits(run) -> list[str]:
    """Stages the warm run did run (should be none)."""
    return [name for name in stage_windows(run)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    ap.add_argument("--artifacts-dir", type=Path, help="a fresh (empty or absent) folder; default: a temp folder, removed unless --keep")
    ap.add_argument("--device", default="auto", help="quantforge eval --device (default auto, as make demo)")
    ap.add_argument("--no-register", action="store_true", help="leave out `quantforge register`")
    ap.add_argument("--no-warm", action="store_true", help="leave out the warm rerun")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts folder")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path, help="also write the tables as markdown")
    ap.add_argument("--logs", type=Path, help="folder for each command's full output (default: beside --json, else none)")
    ap.add_argument("--echo", action="store_true", help="stream the commands' output to stderr")
    a = ap.parse_args(argv)

    artifacts = a.artifacts_dir or Path(tempfile.mkdtemp(prefix="qf-bench-demo-"))
    if artifacts.exists() and any(artifacts.iterdir()):
        print(f"{artifacts} is not empty: the demo must start from a fresh artifacts folder", file=sys.stderr)
        return 2
    artifacts.mkdir(parents=True, exist_ok=True)
    artifacts = artifacts.resolve()
    logs = a.logs or (a.json.parent if a.json else None)
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # register into the local store under the artifacts folder
    qf = quantforge_cli()
    recipe = str(a.recipe.resolve())
    commands = {
        "build": [*qf, "build", recipe, "--artifacts-dir", artifacts],
        "eval": [*qf, "eval", recipe, "--artifacts-dir", artifacts, "--device", a.device],
    }
    if not a.no_register:
        commands["register"] = [*qf, "register", recipe, "--artifacts-dir", artifacts]
    host = host_info()
    import yaml

    recipe_name = yaml.safe_load(a.recipe.read_text())["name"]
    runs, warm, failed, recorded = {}, {}, [], {}
    for phase, store in (("cold", runs), ("warm", warm)):
        if phase == "warm":
            recorded = report_stages(artifacts, recipe_name)
            if a.no_warm:
                break
        for cmd, argv in commands.items():
            print(f"== {phase} {cmd}: {' '.join(map(str, argv))}", file=sys.stderr, flush=True)
            log_file = logs / f"demo-{phase}-{cmd}.log" if logs else None
            if log_file:
                log_file.unlink(missing_ok=True)
            run = run_measured(argv, env=env, cwd=REPO, echo=a.echo, log_file=log_file)
            store[cmd] = run
            print(f"   {run.wall_s:.1f} s, exit {run.rc}", file=sys.stderr, flush=True)
            if run.rc != 0:
                failed.append(f"{phase} {cmd} (exit {run.rc})")
                print("\n".join(line for _, line in run.lines[-15:]), file=sys.stderr)

    rows, unattributed = analyse(runs, artifacts, recorded)
    cold_total = sum(r.wall_s for r in runs.values())
    warm_total = sum(r.wall_s for r in warm.values()) if warm else None
    warm_ran = {cmd: all_hits(r) for cmd, r in warm.items()}
    stage_sum = {cmd: round(sum(r["seconds"] or 0 for r in rows if r["command"] == cmd), 1) for cmd in runs}

    print(f"\nrecipe {a.recipe} | artifacts {artifacts} | host {host.get('cpu')}, {host.get('cores')} cores, "
          f"{host.get('memory_gib')} GiB | threads {host.get('threads_env') or 'default'}\n")
    header = ["command", "stage", "seconds", "breakdown (s)", "main RSS peak MiB", "child processes (peak RSS)"]
    table = [[r["command"], r["stage"], r["seconds"], r["breakdown"], r["main_rss_peak_mib"], children_text(r["children"])]
             for r in rows]
    stage_md = markdown_table(header, table)
    print(stage_md)
    cmd_rows = []
    for phase, store in (("cold", runs), ("warm", warm)):
        for cmd, run in store.items():
            outside = round(run.wall_s - stage_sum[cmd], 1) if phase == "cold" else None
            cmd_rows.append([phase, cmd, round(run.wall_s, 1), stage_sum.get(cmd) if phase == "cold" else None, outside,
                             round(run.peak_tree_mib), round(run.peak_root_mib), round(run.maxrss_mib), run.rc])
    cmd_md = markdown_table(["phase", "command", "wall s", "sum of stage s", "outside stages s", "peak tree RSS MiB",
                             "peak main RSS MiB", "maxrss MiB", "exit"], cmd_rows)
    print()
    print(cmd_md)
    verdicts = [f"demo (cold, {' + '.join(runs)}): {cold_total:.1f} s, goal <= {DEMO_LIMIT_S} s: "
                f"{'PASS' if cold_total <= DEMO_LIMIT_S else 'FAIL'}"]
    if warm:
        reran = [f"{cmd}: {', '.join(names)}" for cmd, names in warm_ran.items() if names]
        verdicts.append(f"warm rerun ({' + '.join(warm)}): {warm_total:.1f} s, {warm_total / WARM_LIMIT_S:.1f}x the 5 s goal: "
                        f"{'PASS' if warm_total < WARM_LIMIT_S else 'FAIL'}"
                        + (f"; stages that ran again: {'; '.join(reran)}" if reran else "; every stage a hit"))
        if "build" in warm and "eval" in warm:
            be = warm["build"].wall_s + warm["eval"].wall_s
            verdicts.append(f"warm build + eval alone: {be:.1f} s ({'PASS' if be < WARM_LIMIT_S else 'FAIL'} against 5 s)")
    print()
    for v in verdicts:
        print(v)
    if failed:
        print(f"commands that failed: {', '.join(failed)}")
    print("\n'outside stages' is the command's wall time not spent in stages that ran: interpreter start, imports, "
          "planning (recipe checks, cache keys), store lookups and manifest hashing, report, plots and HTML.")

    result = {
        "recipe": str(a.recipe), "artifacts_dir": str(artifacts), "host": host, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": rows,
        "commands": {phase: {cmd: run.summary() for cmd, run in store.items()} for phase, store in (("cold", runs), ("warm", warm))},
        "unattributed_children": unattributed,
        "cold_total_s": round(cold_total, 1), "warm_total_s": round(warm_total, 1) if warm_total is not None else None,
        "warm_stages_that_ran": warm_ran, "verdicts": verdicts, "failed": failed,
    }
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    if a.md:
        a.md.write_text(f"# Demo stages: {a.recipe}\n\n{stage_md}\n\n{cmd_md}\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    if not a.keep and not a.artifacts_dir:
        shutil.rmtree(artifacts, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
