"""A local Hugging Face folder as the source, and the fingerprint every source has."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.core.store import sha256_file
from pipeline.errors import InvalidInput

# Files that make up a checkpoint; README, images and the like don't change the model.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".bin", ".py", ".tiktoken")


def fingerprint_dir(path: Path) -> str:
    """Hash of the model files' hashes: same files, same fingerprint, wherever they live."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and ".cache" not in p.parts and p.name != "manifest.json":
            h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def check_local_dir(path: Path, allow_pickle: bool) -> None:
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InvalidInput(f"source folder {str(path)[:120]}...: {exc.strerror}") from None
    if not is_dir:
        raise InvalidInput(f"source folder not found: {path}")
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} has no config.json: not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            if not allow_pickle:
                raise InvalidInput(
                    f"{path} holds only pickle weights (*.bin/*.pt), which can run code when loaded; "
                    "convert them to safetensors, or set `source.allow_pickle: true` if you trust the file"
                )
        else:
            raise InvalidInput(f"{path} holds no weights (*.safetensors)")


def local_config(path: Path, allow_pickle: bool) -> dict:
    check_local_dir(path, allow_pickle)
    try:
        return json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise InvalidInput(f"{path / 'config.json'} is not valid JSON: {exc}") from None


def local_stage(path: Path, allow_pickle: bool) -> Stage:
    check_local_dir(path, allow_pickle)
    fingerprint = fingerprint_dir(path)
    return Stage(
        name="source",
        kind="source-local",
        version="1",
        params={"path": str(path)},
        external_key=fingerprint,
        run=lambda ctx: {"model_dir": str(path), "fingerprint": fingerprint, "revision": None},
        description=f"local model {path}",
    )
