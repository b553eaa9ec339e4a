"""One model, one process: speed first (so peak memory is the model's own), then accuracy.

Run by :mod:`evals.run` as ``python -m evals.worker JOB.json OUT.json``. One
process per model rather than one per measurement halves the interpreter and
torch start-ups (tens of seconds each on a loaded 2-core machine) while keeping
what isolation is for: a runtime that crashes takes down only this model's
evaluation, and memory is returned to the system between models. An exception
in one part is recorded as that part's failure; the other part still runs.
"""

from __future__ import annotations

import json
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
                Path(a["write_reference"]) if a.get("write_reference") else None)
        except Exception as exc:
            out["accuracy"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    if job.get("tasks"):
        try:
            out["tasks"] = {"status": "done", **run_tasks(job)}
        except Exception as exc:
            out["tasks"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    return out


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
        session = None
    else:
        from evals.runtimes import get_runtime

        session = get_runtime(runtime).open(path, device, threads, logits=True)
        lm = tasks.hf_lm(session.model, path)
    try:
        scores = tasks.run(lm, t["include"], t["names"], t["limit"])
    finally:
        if session is not None:
            session.close()
    return {"scores": scores, "runtime": runtime, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.proc import die_with_parent

    die_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m evals.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    if job.get("runtime") == "llama_cpp":
        from pipeline.backends.llamacpp import binding

        binding()  # before numpy: a CUDA build loaded after it crashed (see llamacpp.binding)
    Path(argv[1]).write_text(json.dumps(run_job(job), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
