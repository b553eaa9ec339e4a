"""Loaders lm-eval calls for the shipped kjv_* tasks (``custom_dataset: !function kjv_data.<task>``).

They read the JSONL next to this file into in-memory ``datasets.Dataset`` objects: no
hub, no HF datasets cache written, and the task folder works wherever it is installed.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def kjv_cloze(**_ignored):  # lm-eval passes metadata and dataset_kwargs as keyword arguments
    return _load("kjv_cloze.jsonl")


def kjv_next4(**_ignored):
    return _load("kjv_next4.jsonl")


def kjv_word4(**_ignored):
    return _load("kjv_word4.jsonl")
