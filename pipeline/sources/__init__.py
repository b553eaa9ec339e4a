"""The source model: a built-in demo model, a local folder, or a hub id at a revision.

Whatever the origin, the source stage's output names an HF folder
(`result.model_dir`) and a fingerprint (hash of the model's file hashes) that
enters every downstream cache key, so lineage is exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import InvalidInput, StageFailed
from pipeline.recipe import LoadedRecipe
from pipeline.core.stage import Stage, StageContext, tool_versions
from pipeline.core.store import sha256_file

# Files that make up a checkpoint; README, images and the like don't change the model.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".bin", ".py", ".tiktoken")
TRAINER_VERSION = "1"


def builtin_variant(model: str) -> str:
    return model.removeprefix("builtin:")


def _builtin_variants():
    from pipeline.sources.tiny import VARIANTS

    return VARIANTS


def is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def local_dir(loaded: LoadedRecipe) -> Path | None:
    """The local folder the recipe names, or None for builtin/hub sources."""
    model = loaded.recipe.source.model
    if loaded.recipe.source.is_builtin:
        return None
    candidate = loaded.resolve(model)
    if candidate.exists() or not is_hub_id(model):
        return candidate
    return None


def check_local_dir(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
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


def peek_source_config(loaded: LoadedRecipe) -> dict | None:
    """The model's config.json as a dict, without downloading or training anything.

    Returns None when it can't be known offline (a hub model not in the local cache).
    """
    src = loaded.recipe.source
    if src.is_builtin:
        variants = _builtin_variants()
        name = builtin_variant(src.model)
        if name not in variants:
            import difflib

            close = difflib.get_close_matches(name, variants, n=1)
            hint = f" (did you mean 'builtin:{close[0]}'?)" if close else ""
            raise InvalidInput(f"unknown built-in model {src.model!r}{hint}; built-in: {', '.join('builtin:' + v for v in variants)}")
        v = variants[name]
        return {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_heads,
            "num_key_value_heads": v.num_kv_heads,
            "num_hidden_layers": v.num_layers,
            "vocab_size": v.vocab_size,
            "max_position_embeddings": v.max_position,
        }
    path = local_dir(loaded)
    if path is not None:
        check_local_dir(path, src.allow_pickle)
        return json.loads((path / "config.json").read_text())
    if not is_hub_id(src.model):
        raise InvalidInput(f"{src.model!r} is neither builtin:<name>, an existing folder, nor a hub id org/name")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src.model, "config.json", revision=src.revision)
    except Exception:
        cached = None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def fingerprint_dir(path: Path) -> str:
    """Hash of the model files' hashes: same files, same fingerprint, wherever they live."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and ".cache" not in p.parts:
            h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def resolve_hub_commit(model: str, revision: str) -> str:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(model, revision=revision).sha
    except Exception as exc:
        raise InvalidInput(
            f"source.model: cannot resolve hub model {model!r} at revision {revision!r}: {type(exc).__name__}: {str(exc)[:200]}. "
            "Offline? Download it elsewhere and point `source.model` at the local folder."
        ) from None


def source_stage(loaded: LoadedRecipe) -> Stage:
    src = loaded.recipe.source
    if src.is_builtin:
        from pipeline.data.corpus import corpus_sha256

        variant = builtin_variant(src.model)
        peek_source_config(loaded)  # validates the variant name
        return Stage(
            name="source",
            kind="demo-model",
            version=TRAINER_VERSION,
            # The trainer's own hash: a change to how the model is trained is a different model.
            params={"variant": variant, "seed": 0, "corpus_sha256": corpus_sha256(), "trainer_sha256": _trainer_sha256()},
            tools=tool_versions("torch", "transformers", "tokenizers"),
            run=_train_builtin,
            description=f"train the built-in {variant} on the bundled corpus",
        )
    path = local_dir(loaded)
    if path is not None:
        check_local_dir(path, src.allow_pickle)
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
    commit = resolve_hub_commit(src.model, src.revision)
    return Stage(
        name="source",
        kind="source-hub",
        version="1",
        params={"model": src.model, "commit": commit},
        external_key=commit,
        run=lambda ctx: _download_hub(ctx, src.model, commit, src.allow_pickle),
        description=f"{src.model}@{commit[:12]} from the hub",
    )


def _trainer_sha256() -> str:
    from pipeline.sources import tiny as train

    return sha256_file(Path(train.__file__))


def _train_builtin(ctx: StageContext) -> dict:
    from pipeline.sources.tiny import train_demo_model

    facts = train_demo_model(ctx.stage.params["variant"], ctx.out_dir, seed=ctx.stage.params["seed"], log=ctx.log)
    return {**facts, "fingerprint": fingerprint_dir(ctx.out_dir)}


def _download_hub(ctx: StageContext, model: str, commit: str, allow_pickle: bool) -> dict:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if allow_pickle:
        patterns += ["*.bin"]
    try:
        path = Path(snapshot_download(model, revision=commit, allow_patterns=patterns))
    except Exception as exc:
        raise StageFailed(f"downloading {model}@{commit}: {type(exc).__name__}: {exc}") from None
    check_local_dir(path, allow_pickle)
    return {"model_dir": str(path), "fingerprint": fingerprint_dir(path), "revision": commit}
