"""Task accuracy (e.g. hellaswag, arc_easy) through EleutherAI's lm-evaluation-harness.

Optional: when ``lm_eval`` does not import, or the artifact kind has no
lm-eval backend here, or the task data cannot be loaded (offline), the result
is a skip with the reason, never a failure of the eval.
"""

from __future__ import annotations

from pathlib import Path

HF_KINDS = ("source", "gptq", "awq", "fp8")


def run_tasks(kind: str, path: Path, device: str, tasks: list[str], limit: int | None = None) -> dict:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed"}
    if kind not in HF_KINDS:
        return {"status": "skipped", "reason": f"no lm-eval backend for {kind!r} artifacts here "
                "(lm-eval's gguf model needs a running llama.cpp server)"}
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={path},dtype=auto",
            tasks=list(tasks),
            device="cpu" if device == "cpu" else "cuda",
            batch_size=1,
            limit=limit,
        )
    except Exception as exc:  # most often: task data not downloadable offline
        return {"status": "skipped", "reason": f"lm-eval could not run {tasks}: {type(exc).__name__}: {str(exc)[:300]}"}
    results = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in out.get("results", {}).items()}
    return {"status": "done", "results": results, "lm_eval_version": getattr(lm_eval, "__version__", "")}
