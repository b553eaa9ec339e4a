"""Task accuracy with lm-evaluation-harness, offline, for every format on the same items.

``evals.tasks`` in a recipe names tasks. Each is one of

* a task shipped in this folder (``kjv_cloze``, ``kjv_word4``, ``kjv_next4``: made by
  ``python -m evals.tasks.generate`` from the held-out split of the bundled public-domain
  corpus; lm-eval YAML + JSONL, loaded in memory, no hub);
* a path to a task YAML of your own (relative to the recipe), loaded like lm-eval's
  ``--include_path``;
* the name of one of lm-eval's own tasks (``hellaswag``, ``arc_easy``, ...): those fetch their
  data from the Hugging Face hub, so they work where the hub is reachable.

The source and every artifact are scored on the same items, ``evals.task_limit`` of each
task (the first N: the shipped files are pre-shuffled with a seed). The model is the one the
eval runtime loads: transformers (compressed-tensors decompressed, ModelOpt checkpoints
dequantized by their layout) through lm-eval's ``hf`` model, GGUF files through
quantforge's llama.cpp adapter (:mod:`evals.runtimes.lmeval_llamacpp`). Per-item
correctness is kept, so an artifact's delta to the source comes with a paired standard
error (much smaller than either accuracy's own).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent
INSTALL_HINT = "lm-evaluation-harness is not installed: `make setup` installs it (or `pip install 'quantforge[tasks]'`)"


def shipped() -> dict[str, Path]:
    """Task name -> YAML of the tasks shipped here."""
    out = {}
    for p in sorted(TASKS_DIR.glob("*.yaml")):
        m = re.search(r"^task:\s*(\S+)\s*$", p.read_text(encoding="utf-8"), re.M)
        if m:
            out[m.group(1)] = p
    return out


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _is_file_entry(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def _read_task_yaml(path: Path) -> dict:
    """A task YAML read leniently (lm-eval's ``!function`` tags are kept as strings)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        raise ValueError("not an lm-eval task YAML (no `task:` name)")
    return data


def problems(names: list[str], base_dir: Path) -> list[tuple[int | None, str]]:
    """(index in evals.tasks or None, message) for every task that cannot run."""
    out: list[tuple[int | None, str]] = []
    if not names:
        return out
    if not lm_eval_installed():
        return [(None, INSTALL_HINT)]
    if len(set(names)) != len(names):
        out.append((None, "tasks repeat"))
    local = shipped()
    unknown = []
    for i, name in enumerate(names):
        if _is_file_entry(name):
            path = (base_dir / name) if not Path(name).is_absolute() else Path(name)
            if not path.is_file():
                out.append((i, f"task file not found: {path}"))
                continue
            try:
                data = _read_task_yaml(path)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the same problem
                out.append((i, f"{path} is not a valid lm-eval task: {exc}"))
                continue
            files = ((data.get("dataset_kwargs") or {}).get("data_files") or {})
            for split, f in (files.items() if isinstance(files, dict) else []):
                fp = Path(f) if Path(f).is_absolute() else path.parent / f
                if not fp.is_file():
                    out.append((i, f"{path}: data file for split {split!r} not found: {fp}"))
        elif name not in local:
            unknown.append((i, name))
    if unknown:
        known = _lm_eval_task_names()
        for i, name in unknown:
            if name in known:
                continue
            close = difflib.get_close_matches(name, [*local, *known], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append((i, f"unknown task {name!r}{hint}; shipped: {', '.join(local)}, or a path to a task YAML, or one of lm-eval's tasks"))
    return out


def _lm_eval_task_names() -> set[str]:
    """Every task lm-eval knows (indexing them takes seconds: only asked for names not shipped here)."""
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return set(TaskManager().all_tasks)


def resolve(names: list[str], base_dir: Path) -> tuple[list[str], list[str]]:
    """(include paths for lm-eval's TaskManager, task names to run)."""
    includes, tasks = [str(TASKS_DIR)], []
    for name in names:
        if _is_file_entry(name):
            path = (base_dir / name) if not Path(name).is_absolute() else Path(name)
            includes.append(str(path.parent.resolve()))
            tasks.append(_read_task_yaml(path)["task"])
        else:
            tasks.append(name)
    return list(dict.fromkeys(includes)), tasks


def fingerprint(names: list[str], base_dir: Path) -> str:
    """What task results depend on: the task definitions and data files, and lm-eval's version."""
    from importlib.metadata import version

    h = hashlib.sha256(f"lm-eval {version('lm-eval') if lm_eval_installed() else '-'}".encode())
    local = shipped()
    for name in names:
        paths: list[Path] = []
        if _is_file_entry(name):
            path = (base_dir / name) if not Path(name).is_absolute() else Path(name)
            paths = [path, *sorted(p for p in path.parent.iterdir() if p.suffix in (".jsonl", ".json", ".py"))]
        elif name in local:
            paths = [local[name], *sorted(TASKS_DIR.glob(f"{name}.jsonl")), TASKS_DIR / "kjv_data.py"]
        h.update(name.encode() + b"\0")
        for p in paths:
            if p.is_file():
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ running (in the eval worker)
def run(lm, include_paths: list[str], tasks: list[str], limit: int | None,
        native: dict | None = None) -> dict[str, dict[str, Any]]:
    """Score `lm` on `tasks`: task -> {metric, value, stderr, samples, items: {doc id: 0/1}}.

    `native`, when given, receives lm-eval's own results block (``results``, ``versions``,
    ``n-shot``, ``n-samples``, ``higher_is_better``, as its ``--output_path`` JSON holds them), so
    numbers can sit beside published ones."""
    import logging
    import os
    import random

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap otherwise starts a process pool
    import lm_eval.evaluator
    import numpy as np
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=include_paths, include_defaults=any(t not in shipped() for t in tasks))
    # lm-eval's evaluate() on tasks loaded as simple_evaluate loads them (zero-shot unless the task
    # says otherwise, fixed few-shot seed), not simple_evaluate itself: that one imports torch (to
    # seed it and to collect environment info), and a CUDA build of llama.cpp aborted when torch
    # loaded after it (seen on an H200). Log-likelihood scoring draws nothing random from torch.
    random.seed(0)
    np.random.seed(1234)
    loaded = manager.load(tasks)
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=1234)
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=1000, log_samples=True)
    if native is not None:
        import json

        from lm_eval.utils import handle_non_serializable

        keep = {k: res[k] for k in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
                if k in res}
        native.update(json.loads(json.dumps(keep, default=handle_non_serializable)))
        native["config"] = {"model": type(lm).__name__, "limit": limit, "bootstrap_iters": 1000, "lm_eval_version": _lm_eval_version()}
    out: dict[str, dict[str, Any]] = {}
    for task, r in res["results"].items():
        if task not in tasks:
            continue
        value, stderr = r.get("acc,none"), r.get("acc_stderr,none")
        items = {}
        for s in res.get("samples", {}).get(task, []):
            doc = s.get("doc") or {}
            items[str(doc.get("id", s.get("doc_id")))] = float(s.get("acc", 0.0))
        out[task] = {"metric": "acc", "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                     "samples": len(items), "items": items,
                     **({"perplexity": r["perplexity,none"]} if "perplexity,none" in r else {})}
    return out


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def hf_lm(model, path: Path):
    """lm-eval's own ``hf`` model around a model the runtime loaded (its tokenizer read from `path`)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    # batch 8: measured fastest on one CPU thread (4 and 16 equal, 64 10-15 % slower); never "auto",
    # which probes upward from 64.
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(path)), batch_size=8)


# ------------------------------------------------------------------ scores against the source
def attach_scores(raw_by_model: dict[str, dict], baseline, entries: dict) -> None:
    """Typed TaskScores on the source's and each artifact's entry, with paired deltas to the source.

    ``raw_by_model``: "source" or artifact name -> the worker's task results.
    """
    from pipeline.core.report import TaskScore

    base_raw = raw_by_model.get("source") or {}
    targets = {"source": baseline, **entries}
    for name, entry in targets.items():
        raw = raw_by_model.get(name)
        if not raw or entry is None:
            continue
        scores = {}
        for task, r in raw.items():
            if r.get("value") is None:
                continue
            score = TaskScore(task=task, metric=r["metric"], value=float(r["value"]), stderr=r.get("stderr"), samples=r.get("samples"))
            b = base_raw.get(task)
            if name != "source" and b and b.get("value") is not None:
                score.delta = score.value - float(b["value"])
                score.recovery_pct = 100.0 * score.value / float(b["value"]) if b["value"] else None
                common = sorted(set(r["items"]) & set(b["items"]))
                if len(common) > 1:
                    diffs = [r["items"][i] - b["items"][i] for i in common]
                    mean = sum(diffs) / len(diffs)
                    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
                    score.delta_stderr = math.sqrt(var / len(diffs))
                    score.flipped = sum(1 for d in diffs if d != 0)
            scores[task] = score
        entry.tasks = scores
        if scores:
            entry.metrics.task_accuracy = sum(s.value for s in scores.values()) / len(scores)
            base_scores = [float(base_raw[t]["value"]) for t in scores if t in base_raw and base_raw[t].get("value")]
            if name != "source" and len(base_scores) == len(scores):
                entry.metrics.task_recovery_pct = 100.0 * entry.metrics.task_accuracy / (sum(base_scores) / len(base_scores))
