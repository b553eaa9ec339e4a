"""A/B of quantization settings at about equal bits: build, evaluate, tabulate.

    python benchmarks/quality_ab.py recipes/demo-search.yaml [--targets a,b,...] [--jobs N]
        [--samples N] [--artifacts-dir artifacts] [--out results.md]

Runs quantforge's own commands, so the numbers are those of `quantforge run`: each
selected target is built with `quantforge build --target` (up to --jobs at once, one
CPU thread each: QUANTFORGE_THREADS=1, OMP_NUM_THREADS=1), then `quantforge eval
--device cpu` evaluates the source and every artifact on the recipe's text. Builds
are cached by the store, so a rerun only evaluates. With --targets, the recipe is
rewritten with only those targets (same stage keys) into the artifacts folder; with
--samples, with that many calibration samples, under the name NAME-sN.

The table gives linear-layer bits per weight counted from the files (every quantized
Linear's stored bytes, scales and zero points included, over its weights; lm_head and
the embedding excluded), Δppl with its standard error, mean KL, top-1 agreement and
the build's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LINEAR_GGUF = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def quantforge(*args: str, env: dict | None = None, log: Path | None = None) -> tuple[int, float]:
    """Run one quantforge command; (exit code, CPU seconds of it and the processes it waited for)."""
    cmd = [sys.executable, "-m", "pipeline.cli.main", *args]
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out if log else None, stderr=subprocess.STDOUT if log else None)
        # wait4: this child's own CPU time (its verifier and converter children included), which
        # a loaded machine stretches far less than wall time.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_utime + usage.ru_stime


def linear_bpw_compressed(folder: Path) -> float | None:
    """Bits per weight of the quantized Linear layers of a compressed-tensors folder."""
    from safetensors import safe_open

    bits = weights = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for key in keys:
                if not key.endswith(".weight_packed"):
                    continue
                base = key.removesuffix(".weight_packed")
                shape = st.get_tensor(base + ".weight_shape").tolist()
                weights += shape[0] * shape[1]
                for part in (".weight_packed", ".weight_scale", ".weight_zero_point"):
                    if base + part in keys:
                        t = st.get_tensor(base + part)
                        bits += t.numel() * t.element_size() * 8
    return bits / weights if weights else None


def linear_bpw_gguf(path: Path) -> float | None:
    """Bits per weight of a GGUF's attention and MLP matrices (their stored bytes over their elements)."""
    from gguf import GGUFReader

    bits = weights = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and any(p in t.name for p in LINEAR_GGUF):
            bits += int(t.n_bytes) * 8
            weights += int(t.n_elements)
    return bits / weights if weights else None


def linear_bpw(artifact: dict) -> float | None:
    path = Path(artifact.get("path") or "")
    if not path.exists():
        return None
    if path.is_file() and path.suffix == ".gguf":
        return linear_bpw_gguf(path)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:
        return linear_bpw_gguf(ggufs[0])
    return linear_bpw_compressed(path) if path.is_dir() else None


def method(config: dict) -> str:
    """The target's levers in one line, from the recipe."""
    skip = {"name", "kind", "gates", "ignore", "bits", "quants", "imatrix"}
    levers = ", ".join(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in config.items() if k not in skip)
    return f"{config['kind']}" + (f" ({levers})" if levers else "")


def table(report: dict, configs: dict[str, dict], build_s: dict[str, float], cpu_s: dict[str, float]) -> str:
    base = report.get("baseline", {}).get("cpu", {}).get("metrics", {})
    lines = [
        f"source perplexity {base.get('perplexity', float('nan')):.3f} "
        f"({report.get('baseline', {}).get('cpu', {}).get('accuracy', {}).get('tokens_scored', '?')} scored tokens)",
        "",
        "| artifact | method | linear bpw | Δppl % (± s.e.) | KL mean | top-1 % | stage wall s | target build CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def wall(a: dict) -> str:  # the stage's own time, recorded by the store when it was built
        return "-" if a.get("build_seconds") is None else f"{a['build_seconds']:.0f}"

    def cpu(target: str) -> str:  # measured only when this invocation built it (a cache hit takes seconds)
        return f"{cpu_s[target]:.0f}" if build_s.get(target, 0) > 30 else "-"

    rows = []
    for a in report.get("artifacts", []):
        if a["target"] not in configs:
            continue
        m = a.get("evals", {}).get("cpu", {}).get("metrics", {})
        bpw = linear_bpw(a)
        err = m.get("ppl_ratio_err")
        d = m.get("delta_ppl_pct")
        dtxt = "-" if d is None else f"{d:+.1f}" + (f" (±{100 * err:.1f})" if err is not None else "")
        kl = m.get("kl_mean")
        top1 = m.get("top1_agreement_pct")
        rows.append((bpw or 99, f"| {a['name']} | {method(configs[a['target']])} | {bpw:.2f} |" if bpw else f"| {a['name']} | {method(configs[a['target']])} | - |",
                     f" {dtxt} | {'-' if kl is None else f'{kl:.3f}'} | {'-' if top1 is None else f'{top1:.1f}'} | "
                     f"{wall(a)} | {cpu(a['target'])} |"))
    for _, head, tail in sorted(rows, key=lambda r: r[0]):
        lines.append(head + tail)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="builds at once (each on one thread)")
    ap.add_argument("--artifacts-dir", type=Path, default=REPO / "artifacts")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--samples", type=int, help="override calibration.samples (the recipe is renamed NAME-sN)")
    ap.add_argument("--no-eval", action="store_true", help="build only")
    args = ap.parse_args(argv)

    recipe = yaml.safe_load(args.recipe.read_text())
    wanted = [t for t in args.targets.split(",") if t]
    names = [t["name"] for t in recipe["targets"]]
    unknown = [t for t in wanted if t not in names]
    if unknown:
        print(f"unknown target(s) {unknown}; the recipe has {names}", file=sys.stderr)
        return 2
    artifacts = args.artifacts_dir.resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    path = args.recipe.resolve()
    if args.samples:
        recipe["calibration"]["samples"] = args.samples
        recipe["name"] = f"{recipe['name']}-s{args.samples}"
    if wanted or args.samples:
        recipe["targets"] = [t for t in recipe["targets"] if not wanted or t["name"] in wanted]
        path = artifacts / f"ab-{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    configs = {t["name"]: t for t in recipe["targets"]}
    logs = artifacts / "ab-logs" / recipe["name"]
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QUANTFORGE_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    build_s: dict[str, float] = {}
    cpu_s: dict[str, float] = {}

    def build(name: str) -> tuple[str, int]:
        t = time.perf_counter()
        rc, cpu_s[name] = quantforge("build", str(path), "--target", name, "--artifacts-dir", str(artifacts), env=env, log=logs / f"{name}.log")
        build_s[name] = time.perf_counter() - t
        print(f"[ab] build {name}: rc {rc}, {build_s[name]:.0f} s wall, {cpu_s[name]:.0f} s CPU (a cached build: ~0)", flush=True)
        return name, rc

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        failed = [n for n, rc in pool.map(build, list(configs)) if rc != 0]
    if failed:
        print(f"[ab] builds failed: {failed} (logs in {logs})", flush=True)
    if args.no_eval:
        return 1 if failed else 0
    t = time.perf_counter()
    rc, _ = quantforge("eval", str(path), "--device", "cpu", "--artifacts-dir", str(artifacts), env=env, log=logs / "eval.log")
    print(f"[ab] eval: rc {rc} in {time.perf_counter() - t:.0f} s", flush=True)
    report = json.loads((artifacts / recipe["name"] / "report.json").read_text())
    text = table(report, configs, build_s, cpu_s)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if failed or rc not in (0, 3) else 0


if __name__ == "__main__":
    sys.exit(main())
