"""Text for calibration and evaluation: the built-in corpus, a local file, or a hub dataset.

One loader serves both, so a recipe names data the same way in `calibration`
and `evals.suite`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InvalidInput

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_local(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("./", "../", "/", "~"))


def load_texts(dataset: str, *, base_dir: Path, split: str = "train", column: str = "text", what: str = "calibration.dataset") -> list[str]:
    """Documents (non-empty strings) from `dataset`.

    `builtin` is the demo corpus (`split` train or heldout); a path is read
    locally (.txt: paragraphs split on blank lines; .jsonl/.parquet: `column`);
    anything else is a hub dataset id, optionally with a config as
    `org/name:config`.
    """
    if dataset == "builtin":
        from pipeline.data.corpus import corpus_text

        if split not in ("train", "heldout"):
            raise InvalidInput(f"{what}: the builtin corpus has splits 'train' and 'heldout', not {split!r}")
        return _paragraphs(corpus_text(split))
    if is_local(dataset):
        path = Path(dataset).expanduser()
        path = path if path.is_absolute() else base_dir / path
        return _local(path, column, what)
    return _hub(dataset, split, column, what)


def text_source_problem(dataset: str, *, base_dir: Path, split: str = "train") -> str | None:
    """Why `dataset` cannot be read here, without reading it (None when it looks readable).

    A hub dataset is not checked (that needs the network); it fails, clearly, when loaded.
    """
    if dataset == "builtin":
        return None if split in ("train", "heldout") else f"the builtin corpus has splits 'train' and 'heldout', not {split!r}"
    if is_local(dataset):
        path = Path(dataset).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            return f"file not found: {path}"
        if path.suffix not in LOCAL_SUFFIXES:
            return f"unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
    return None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _local(path: Path, column: str, what: str) -> list[str]:
    if not path.is_file():
        raise InvalidInput(f"{what}: file not found: {path}")
    suffix = path.suffix
    if suffix == ".txt":
        return _paragraphs(path.read_text(encoding="utf-8"))
    if suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{what}: {path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or column not in row:
                raise InvalidInput(f"{what}: {path}:{n}: no {column!r} field (set `column:` to the field that holds the text)")
            if str(row[column]).strip():
                texts.append(str(row[column]))
        return texts
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise InvalidInput(f"{what}: {path}: no column {column!r}; columns: {', '.join(table.column_names)}")
        return [str(t) for t in table.column(column).to_pylist() if t and str(t).strip()]
    raise InvalidInput(f"{what}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _hub(dataset: str, split: str, column: str, what: str) -> list[str]:
    name, _, config = dataset.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except ConnectionError as exc:  # offline, DNS, HF_HUB_OFFLINE: the recipe may be fine, the network is not
        from pipeline.errors import HubUnreachable

        raise HubUnreachable(f"{what}: cannot reach the hub for dataset {dataset!r} (split {split!r}): {str(exc)[:200]}. "
                             "If this machine is offline, use `builtin` or a local .txt/.jsonl/.parquet file.") from None
    except Exception as exc:  # auth, missing dataset: all end the same way for the user
        raise InvalidInput(
            f"{what}: could not load hub dataset {dataset!r} (split {split!r}): {type(exc).__name__}: {str(exc)[:300]}. "
            "If this machine is offline, use `builtin` or a local .txt/.jsonl/.parquet file."
        ) from None
    if column not in ds.column_names:
        raise InvalidInput(f"{what}: hub dataset {dataset!r} has no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [t for t in ds[column] if t and t.strip()]
