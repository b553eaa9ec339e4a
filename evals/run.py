"""`quantforge eval`: evaluate the source and every built artifact on each device here.

Reads ``<artifacts>/<recipe>/report.json`` (written by build), and for each
requested device that is present:

1. the source model's accuracy in transformers, keeping its per-token
   distributions as the reference (:mod:`evals.accuracy`), and its speed;
2. each built artifact's accuracy against that reference and its speed, in the
   runtime users serve it with (:mod:`evals.runtimes`), one subprocess per model
   (:mod:`evals.worker`: a runtime that crashes fails that model only; peak
   memory is its own);
3. decode speed as a share of the device's memory-bandwidth roofline.

Devices of the recipe that are not here are recorded as pending; gates are
computed from whatever devices have results; the report is merged back under
its lock (other devices' jobs may write the same report), and plots are
written next to it.

Every result is a store entry keyed by what it depends on (artifact content
hash or source fingerprint, suite fingerprint, eval parameters, device
fingerprint, runtime versions), so running eval again is instant and a result
is never reused across fingerprints. Failures are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import InvalidInput
from pipeline.recipe import LoadedRecipe
from pipeline.report import Report, read_report, report_path, updating
from pipeline.store import Store

EVAL_VERSION = "1"
SUBPROCESS_TIMEOUT = 3 * 3600
REPO_ROOT = Path(__file__).resolve().parent.parent


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _dir_bytes(path: Path) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


class DeviceEval:
    """Evaluations on one device, sharing the suite's tokens and the source's reference."""

    def __init__(self, loaded: LoadedRecipe, artifacts_dir: Path, device: str, source_path: Path,
                 source_fp: str, suite, log: Callable[[str], None]):
        from evals.devices import cpu_threads_default, fingerprint, fingerprint_hash

        self.recipe = loaded.recipe
        self.spec = loaded.recipe.evals
        self.store = Store(artifacts_dir)
        self.artifacts_dir = Path(artifacts_dir)
        self.device = device
        self.source_path = source_path
        self.source_fp = source_fp
        self.suite = suite
        self.log = log
        self.fingerprint = fingerprint(device)
        self.fp_hash = fingerprint_hash(self.fingerprint)
        self.threads = self.spec.speed.threads or cpu_threads_default()
        self._work = Path(tempfile.mkdtemp(prefix="quantforge-eval-"))

    # ---------------------------------------------------------------- inputs
    @cached_property
    def text_file(self) -> Path:
        p = self._work / "suite.txt"
        p.write_text(self.suite.text, encoding="utf-8")
        return p

    def token_ids(self, for_reference: bool) -> tuple[Path | None, int | None]:
        """(.npy of the suite's token ids, BOS id or None) for an accuracy job.

        The source's worker tokenizes (None here) and stores the ids with the reference;
        artifacts then read those. Only when no reference exists does this process tokenize.
        """
        if for_reference:
            return None, None
        ref = self.reference_file()
        if ref is not None and (ref.parent / "ids.npy").is_file():
            found = self.store.get("eval-reference", self.reference_key)
            return ref.parent / "ids.npy", found["result"].get("bos_id")
        import numpy as np

        from evals.accuracy import bos_for_windows, tokenize_source

        ids_file = self._work / "ids.npy"
        if not ids_file.is_file():
            np.save(ids_file, np.asarray(tokenize_source(self.source_path, self.suite.text), dtype=np.int64))
        return ids_file, bos_for_windows(self.source_path)

    def _runtime_versions(self, runtime: str) -> dict:
        from evals.runtimes import get_runtime

        return get_runtime(runtime).versions()

    def _run_worker(self, name: str, job: dict) -> dict:
        """One subprocess (evals.worker) for one model; a crash fails only the parts it was asked for."""
        from evals.speed import thread_env

        job_file, out = self._work / f"{name}-job.json", self._work / f"{name}-out.json"
        job_file.write_text(json.dumps(job, default=str))
        env = thread_env(job["threads"])
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        parts = [k for k in ("speed", "accuracy") if job.get(k)]
        try:
            proc = subprocess.run([sys.executable, "-m", "evals.worker", str(job_file), str(out)], env=env,
                                  capture_output=True, text=True, errors="replace", timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            return {k: {"status": "failed", "reason": f"worker timed out after {SUBPROCESS_TIMEOUT} s"} for k in parts}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            why = f"{job['runtime']} worker ended with {how}: " + " | ".join(tail)[-1200:]
            return {k: {"status": "failed", "reason": why} for k in parts}
        return json.loads(out.read_text())

    def _found(self, kind: str, key: str) -> dict | None:
        found = self.store.get(kind, key)
        return {**found["result"], "cached": True} if found else None

    def _commit(self, kind: str, key: str, result: dict, tmp: Path | None = None) -> dict:
        tmp = tmp or self.store.new_tmp(kind, key)
        clean = {k: v for k, v in result.items() if k != "trace"}
        (tmp / "result.json").write_text(json.dumps(clean, indent=2))
        self.store.commit(tmp, kind, key, {"stage": kind, "device_fingerprint": self.fp_hash, "result": clean})
        return {**clean, "cached": False}

    def measure(self, name: str, runtime: str, path: Path, acc_kind: str, acc_key: str, speed_key: str,
                reference: Path | None) -> tuple[dict, dict]:
        """(accuracy, speed) of one model: from the store, else measured in one worker and stored.
        Failures are returned, never stored, so the next eval tries again."""
        import contextlib
        import shutil

        with contextlib.ExitStack() as stack:
            for k in sorted({acc_key, speed_key}):
                stack.enter_context(self.store.lock(k))
            acc, spd = self._found(acc_kind, acc_key), self._found("eval-speed", speed_key)
            if acc and spd:
                self.log(f"[eval {self.device}] {name}: cached")
                return acc, spd
            job: dict[str, Any] = {"runtime": runtime, "path": str(path), "device": self.device, "threads": self.threads}
            ref_tmp = None
            if spd is None:
                s = self.spec.speed
                job["speed"] = {"prompt_lengths": s.prompt_lengths, "decode_tokens": s.decode_tokens,
                                "batch_sizes": s.batch_sizes, "warmup": s.warmup,
                                "min_iterations": s.min_iterations, "min_seconds": s.min_seconds}
            if acc is None:
                ids_file, bos = self.token_ids(acc_kind == "eval-reference")
                job["accuracy"] = {"ids": str(ids_file) if ids_file else None, "text": str(self.text_file),
                                   "context": self.spec.context,
                                   "max_windows": self.spec.max_windows, "bos": bos,
                                   "reference": str(reference) if reference else None}
                if acc_kind == "eval-reference":
                    ref_tmp = self.store.new_tmp(acc_kind, acc_key)
                    job["accuracy"]["write_reference"] = str(ref_tmp / "reference.npz")
            t0 = time.perf_counter()
            self.log(f"[eval {self.device}] {name}: measuring {' and '.join(k for k in ('speed', 'accuracy') if k in job)} with {runtime}")
            out = self._run_worker(name, job)
            if "speed" in job:
                spd = out.get("speed") or {"status": "failed", "reason": "no speed result"}
                spd = self._commit("eval-speed", speed_key, spd) if spd.get("status") == "done" else spd
            if "accuracy" in job:
                acc = out.get("accuracy") or {"status": "failed", "reason": "no accuracy result"}
                if acc.get("status") == "done":
                    acc = self._commit(acc_kind, acc_key, acc, ref_tmp)
                elif ref_tmp is not None:
                    shutil.rmtree(ref_tmp, ignore_errors=True)
            for part, res in (("speed", spd), ("accuracy", acc)):
                if res.get("status") != "done":
                    self.log(f"[eval {self.device}] {name}: {part} {res.get('status')}: {res.get('reason')}")
            self.log(f"[eval {self.device}] {name}: {time.perf_counter() - t0:.1f} s")
            return acc, spd

    # ------------------------------------------------------------------ keys
    @cached_property
    def reference_key(self) -> str:
        return _key(v=EVAL_VERSION, what="reference", source=self.source_fp, suite=self.suite.fingerprint,
                    context=self.spec.context, max_windows=self.spec.max_windows, device=self.fp_hash,
                    runtime=self._runtime_versions("transformers"))

    def reference_file(self) -> Path | None:
        p = self.store.path_for("eval-reference", self.reference_key) / "reference.npz"
        return p if p.is_file() and self.store.get("eval-reference", self.reference_key) else None

    def accuracy_key(self, identity: str, runtime: str, with_reference: bool) -> str:
        return _key(v=EVAL_VERSION, what="accuracy", artifact=identity, reference=self.reference_key,
                    with_reference=with_reference, runtime=runtime, versions=self._runtime_versions(runtime))

    def speed_key(self, identity: str, runtime: str) -> str:
        return _key(v=EVAL_VERSION, what="speed", artifact=identity, device=self.fp_hash, runtime=runtime,
                    versions=self._runtime_versions(runtime), spec=self.spec.speed.model_dump(), threads=self.threads)

    # ------------------------------------------------------------ one model
    def evaluate_model(self, name: str, kind: str, path: Path, identity: str, size: int | None,
                       baseline: dict | None) -> dict:
        from evals.roofline import roofline
        from evals.runtimes import get_runtime, runtime_for
        from evals.speed import headline

        runtime, why = runtime_for(kind)
        entry: dict[str, Any] = {"fingerprint": self.fp_hash, "threads": self.threads}
        if runtime is None:
            return {**entry, "status": "skipped", "reason": why}
        reason = get_runtime(runtime).unavailable(self.device)
        if reason:
            return {**entry, "status": "skipped", "runtime": runtime, "reason": reason}
        entry["runtime"] = runtime
        if kind == "source":
            acc, spd = self.measure(name, runtime, path, "eval-reference", self.reference_key,
                                    self.speed_key(identity, runtime), None)
        else:
            ref = self.reference_file()
            acc, spd = self.measure(name, runtime, path, "eval-accuracy", self.accuracy_key(identity, runtime, ref is not None),
                                    self.speed_key(identity, runtime), ref)
        entry["accuracy"] = acc
        entry["speed"] = spd
        if acc.get("status") != "done":
            entry.update(status="failed", reason=f"accuracy: {acc.get('reason')}")
        else:
            entry["status"] = "done"
        entry["dequantized"] = acc.get("dequantized", spd.get("dequantized"))
        head = headline(spd) if spd.get("status") == "done" else {}
        bw = self.bandwidth.get("bandwidth_gbs")
        entry["roofline"] = roofline(head.get("decode_tps"), spd.get("weight_bytes_per_token"), bw)
        m: dict[str, Any] = {
            "size_bytes": size if size is not None else _dir_bytes(path),
            "perplexity": acc.get("perplexity"),
            "kl_mean": acc.get("kl_mean"),
            "top1_agreement_pct": acc.get("top1_agreement_pct"),
            "prefill_tps": head.get("prefill_tps"),
            "decode_tps": head.get("decode_tps"),
            "ttft_s": head.get("ttft_s"),
            "roofline_pct": entry["roofline"].get("pct"),
            "peak_rss_mib": spd.get("peak_rss_mib"),
        }
        base_m = (baseline or {}).get("metrics", {})
        if m["perplexity"] and base_m.get("perplexity"):
            m["delta_ppl_pct"] = 100.0 * (m["perplexity"] / base_m["perplexity"] - 1.0)
        if m["decode_tps"] and base_m.get("decode_tps"):
            m["decode_speedup"] = m["decode_tps"] / base_m["decode_tps"]
        entry["metrics"] = {k: v for k, v in m.items() if v is not None}
        if spd.get("status") != "done":
            entry["speed_reason"] = spd.get("reason")
        return entry

    @cached_property
    def bandwidth(self) -> dict:
        from evals.roofline import device_bandwidth

        try:
            return device_bandwidth(self.artifacts_dir, self.device, self.fp_hash, self.log)
        except Exception as exc:  # a roofline is a nicety: never fail the eval over it
            return {"error": f"{type(exc).__name__}: {exc}"}

    def run(self, report: Report) -> dict:
        baseline = self.evaluate_model("source", "source", self.source_path, self.source_fp, None, None)
        out = {"baseline": baseline, "artifacts": {}}
        for a in report.artifacts:
            if a.status != "built" or not a.path:
                continue
            out["artifacts"][a.name] = self.evaluate_model(a.name, a.kind, Path(a.path), a.content_sha256 or a.stage_key or a.path,
                                                           a.bytes or _dir_bytes(Path(a.path)), baseline)
        return out

    def close(self):
        import shutil

        shutil.rmtree(self._work, ignore_errors=True)


def evaluate(loaded: LoadedRecipe, artifacts_dir: Path, device: str = "auto", log=print) -> Report:
    """Evaluate the source and every built artifact on the requested devices; merge into report.json."""
    from evals.devices import fingerprint, fingerprint_hash, resolve_devices
    from evals.gates import evaluate_gates, required_devices
    from evals.suites import load_suite

    recipe = loaded.recipe
    rpath = report_path(artifacts_dir, recipe.name)
    report = read_report(rpath)
    if report is None or report.source is None or not report.source.path:
        raise InvalidInput(f"no build report with a source model at {rpath}: run `quantforge build` first")
    source_path = Path(report.source.path)
    if not source_path.is_dir():
        raise InvalidInput(f"the source model folder {source_path} named in {rpath} is missing: run `quantforge build` again")
    now, pending = resolve_devices(device, recipe.evals.devices)
    suite = load_suite(recipe.evals.suite, base_dir=loaded.path.parent, column=recipe.evals.column)
    source_fp = report.source.fingerprint or report.source.path
    results: dict[str, dict] = {}
    for d in now:
        log(f"[eval {d}] suite {suite.spec.name!r}, context {recipe.evals.context}, up to {recipe.evals.max_windows} windows")
        de = DeviceEval(loaded, Path(artifacts_dir), d, source_path, source_fp, suite, log)
        try:
            results[d] = de.run(report)
            results[d]["bandwidth"] = de.bandwidth
        finally:
            de.close()
    tasks = _tasks(recipe, report, now, log)
    with updating(rpath, recipe.name) as rep:
        for d, res in results.items():
            fp = fingerprint(d)
            rep.devices[d] = {"status": "done", "fingerprint": fp, "fingerprint_hash": fingerprint_hash(fp),
                              "bandwidth": res["bandwidth"], "suite": suite.spec.name,
                              "suite_fingerprint": suite.fingerprint[:16]}
            rep.baseline[d] = res["baseline"]
            for a in rep.artifacts:
                if a.name in res["artifacts"]:
                    a.evals[d] = res["artifacts"][a.name]
                    if tasks.get(a.name, {}).get(d):
                        a.evals[d]["tasks"] = tasks[a.name][d]
        for d in pending:
            if rep.devices.get(d, {}).get("status") != "done":
                rep.devices[d] = {"status": "pending", "reason": "no such device on this machine; evaluate it on one that has it"}
                rep.baseline[d] = {"status": "pending"}
            for a in rep.artifacts:
                if a.status == "built" and a.evals.get(d, {}).get("status") in (None, "pending"):
                    a.evals[d] = {"status": "pending"}
        required = required_devices(recipe)
        for a in rep.artifacts:
            if a.status != "built":
                continue
            try:
                spec = recipe.gates_for(a.target)
            except KeyError:  # an artifact of a target since removed from the recipe
                spec = recipe.gates
            a.gates = evaluate_gates(spec, required, a.evals)
        final = rep.model_copy(deep=True)
    try:
        from evals.plots import write_plots

        for p in write_plots(final, rpath.parent):
            log(f"[eval] plot {p}")
    except Exception as exc:  # plots are for people; a plotting problem never fails an eval
        log(f"[eval] plots not written: {type(exc).__name__}: {exc}")
    return final


def _tasks(recipe, report: Report, devices: list[str], log) -> dict:
    """Task accuracy through lm-evaluation-harness, when the recipe asks for tasks."""
    if not recipe.evals.tasks:
        return {}
    from evals.tasks import run_tasks

    out: dict[str, dict] = {}
    for a in report.artifacts:
        if a.status != "built":
            continue
        for d in devices:
            out.setdefault(a.name, {})[d] = run_tasks(a.kind, Path(a.path), d, recipe.evals.tasks)
            if out[a.name][d].get("status") == "skipped":
                log(f"[eval {d}] {a.name} tasks skipped: {out[a.name][d]['reason']}")
    return out
