"""Calibration data: tokenized once with the source tokenizer, shared by every target.

Documents are joined with the tokenizer's EOS token into one stream and cut into
`seq_len` windows; `samples` windows are drawn with `seed`. Output folder:
`input_ids.npy` [samples, seq_len] and `texts.jsonl` (each window decoded, for
tools that tokenize themselves, such as llama.cpp's imatrix).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InvalidInput
from pipeline.recipe import LoadedRecipe
from pipeline.core.stage import Stage, StageContext, tool_versions
from pipeline.data.text import is_local, load_texts
from pipeline.core.store import sha256_file

IDS_FILE = "input_ids.npy"
TEXTS_FILE = "texts.jsonl"


@dataclass
class CalibrationSet:
    input_ids: "object"  # numpy int64 [samples, seq_len]
    texts: list[str]

    def as_dataset(self):
        """A `datasets.Dataset` with input_ids and attention_mask, as llm-compressor's oneshot takes."""
        import datasets

        ids = [row.tolist() for row in self.input_ids]
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def load_calibration(folder: Path) -> CalibrationSet:
    import numpy as np

    folder = Path(folder)
    ids = np.load(folder / IDS_FILE)
    texts = [json.loads(line)["text"] for line in (folder / TEXTS_FILE).read_text(encoding="utf-8").splitlines() if line]
    return CalibrationSet(input_ids=ids, texts=texts)


def dataset_fingerprint(loaded: LoadedRecipe) -> str:
    """What identifies the calibration text itself (a local file's hash, the corpus hash, or the hub id)."""
    spec = loaded.recipe.calibration
    assert spec is not None
    if spec.dataset == "builtin":
        from pipeline.data.corpus import corpus_sha256

        return "builtin:" + corpus_sha256()
    if is_local(spec.dataset):
        path = loaded.resolve(spec.dataset)
        if not path.is_file():
            raise InvalidInput(f"calibration.dataset: file not found: {path}")
        return "file:" + sha256_file(path)
    return "hub:" + spec.dataset  # a hub dataset's revision is not pinned by the recipe yet


def calibration_stage(loaded: LoadedRecipe, source_stage: str) -> Stage:
    spec = loaded.recipe.calibration
    assert spec is not None
    params = {**spec.model_dump(mode="json"), "dataset_fingerprint": dataset_fingerprint(loaded)}
    if is_local(spec.dataset):
        params["dataset"] = str(loaded.resolve(spec.dataset))
    base_dir = loaded.path.parent
    return Stage(
        name="calibration",
        kind="calibration",
        version="1",
        params=params,
        inputs={"source": source_stage},
        tools=tool_versions("transformers", "tokenizers"),
        run=lambda ctx: _build(ctx, base_dir),
        description=f"{spec.samples} x {spec.seq_len} tokens from {spec.dataset}",
    )


def _build(ctx: StageContext, base_dir: Path) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    p = ctx.stage.params
    texts = load_texts(p["dataset"], base_dir=base_dir, split=p["split"], column=p["column"])
    tokenizer = AutoTokenizer.from_pretrained(ctx.input("source").model_dir)
    if p["chat_template"]:
        if not tokenizer.chat_template:
            raise InvalidInput("calibration.chat_template: the source tokenizer has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        stream.extend(sep)
    samples, seq_len = p["samples"], p["seq_len"]
    windows = len(stream) // seq_len
    if windows < samples:
        raise InvalidInput(
            f"calibration: {p['dataset']} has {len(stream)} tokens, enough for {windows} samples of {seq_len}; "
            f"the recipe asks for {samples} samples ({samples * seq_len} tokens). Lower calibration.samples or seq_len, or add data."
        )
    rng = np.random.default_rng(p["seed"])
    picks = np.sort(rng.choice(windows, size=samples, replace=False))
    ids = np.stack([np.asarray(stream[i * seq_len : (i + 1) * seq_len], dtype=np.int64) for i in picks])
    np.save(ctx.out_dir / IDS_FILE, ids)
    with open(ctx.out_dir / TEXTS_FILE, "w", encoding="utf-8") as f:
        for row in ids:
            f.write(json.dumps({"text": tokenizer.decode(row.tolist())}) + "\n")
    fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()
    ctx.log(f"calibration: {samples} samples x {seq_len} tokens from {len(stream)} available")
    return {"samples": samples, "seq_len": seq_len, "tokens_available": len(stream), "fingerprint": fingerprint}
