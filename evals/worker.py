"""One model, one process: speed first (so peak memory is the model's own), then accuracy, then tasks.

A child of :func:`pipeline.core.proc.call` (from :mod:`evals.stages`): the request is the
job, the result its parts' results. One process per model rather than one per measurement halves the interpreter and
torch start-ups (tens of seconds each on a loaded 2-core machine) while keeping
what isolation is for: a runtime that crashes takes down only this model's
evaluation, and memory is returned to the system between models. An exception
in one part is recorded as that part's failure; the other part still runs.

A GGUF worker holds llama.cpp, so it imports nothing that cannot share a process with it
(:func:`pipeline.backends.llamacpp.isolate` refuses torch, transformers, pyarrow, pandas and
datasets there, on every build). Its tasks therefore run in a child of their own: lm-eval
(which imports datasets -> pyarrow) with quantforge's llama.cpp adapter, whose model lives in
a third process made for llama.cpp (:mod:`evals.runtimes.llamacpp_scorer`).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path


def run_job(job: dict) -> dict:
    out: dict = {}
    if job.get("speed"):
        from evals.speed import measure

        try:
            out["speed"] = measure(job["runtime"], Path(job["path"]), job["device"], job["threads"], **job["speed"])
        except Exception as exc:  # reported, not raised: accuracy may still work
            out["speed"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    if job.get("accuracy"):
        import numpy as np

        from evals.accuracy import run_accuracy

        a = job["accuracy"]
        try:
            out["accuracy"] = run_accuracy(
                job["runtime"], Path(job["path"]), job["device"], job["threads"], np.load(a["ids"]).tolist() if a.get("ids") else None,
                Path(a["text"]).read_text(encoding="utf-8"), a["context"], a["max_windows"], a["bos"],
                Path(a["reference"]) if a.get("reference") else None,
                Path(a["write_reference"]) if a.get("write_reference") else None, a.get("skip_windows", 0))
        except Exception as exc:
            out["accuracy"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    if job.get("tasks"):
        try:
            isolated = job.get("runtime") == "llama_cpp" and (job.get("speed") or job.get("accuracy"))
            out["tasks"] = tasks_in_child(job) if isolated else {"status": "done", **run_tasks(job)}
        except Exception as exc:
            out["tasks"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    return out


def tasks_in_child(job: dict) -> dict:
    """The job's tasks in a fresh worker (this process holds llama.cpp; lm-eval cannot join it)."""
    from pipeline.core.proc import ChildFailed, call

    try:
        return call("evals.worker", {k: v for k, v in job.items() if k not in ("speed", "accuracy")},
                    what="the tasks worker", threads=job.get("threads"), tag="tasks-job")["tasks"]
    except ChildFailed as exc:  # the tasks' failure, not the worker's: speed and accuracy stand
        return {"status": "failed", "reason": str(exc)}


def run_tasks(job: dict) -> dict:
    """lm-evaluation-harness tasks on the model this runtime loads (evals.tasks)."""
    import time

    from evals import tasks

    t = job["tasks"]
    runtime, path, device, threads = job["runtime"], Path(job["path"]), job["device"], job["threads"]
    t0 = time.perf_counter()
    if runtime == "llama_cpp":
        from evals.runtimes.lmeval_llamacpp import LlamaCppLM
        from evals.runtimes.llama_cpp_rt import gguf_file

        lm = LlamaCppLM(model_path=str(gguf_file(path)), n_threads=threads, n_gpu_layers=0 if device == "cpu" else -1)
        session = lm
    else:
        from evals.runtimes import get_runtime

        session = get_runtime(runtime).open(path, device, threads, logits=True)
        lm = tasks.hf_lm(session.model, path)
    native: dict = {}
    try:
        scores = tasks.run(lm, t["include"], t["names"], t["limit"], native=native)
    finally:
        if session is not None:
            session.close()
    out = {"scores": scores, "runtime": runtime, "seconds": round(time.perf_counter() - t0, 2), "lm_eval": native}
    if runtime == "llama_cpp":  # what the scorer process held beside llama.cpp ([] unless isolation failed)
        out["modules_beside_llama_cpp"] = lm.scorer_info["modules_beside_llama_cpp"]
    return out


def handle(job: dict) -> dict:
    holds_llama_cpp = job.get("runtime") == "llama_cpp" and bool(job.get("speed") or job.get("accuracy"))
    if holds_llama_cpp:
        from pipeline.backends.llamacpp import isolate

        isolate()  # llama.cpp first, and nothing after it that cannot share its process
    result = run_job(job)
    if holds_llama_cpp:
        from pipeline.backends.llamacpp import loaded_forbidden

        result["modules_beside_llama_cpp"] = loaded_forbidden()  # [] unless isolation failed
    return result


if __name__ == "__main__":
    from pipeline.core.proc import serve

    sys.exit(serve(handle))
