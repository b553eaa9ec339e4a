"""A Hugging Face Hub model at a revision (resolved to a commit, so the key is exact)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import Stage, StageContext
from pipeline.errors import InvalidInput, StageFailed
from pipeline.sources.local import check_local_dir, fingerprint_dir


def is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")) and not model.endswith(".gguf")


def cached_config(model: str, revision: str) -> dict | None:
    """config.json from the local hub cache, or None when it is not there (offline: checked at download)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - no cache, no hub library: nothing known yet
        cached = None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def resolve_hub_commit(model: str, revision: str) -> str:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(model, revision=revision).sha
    except Exception as exc:
        raise InvalidInput(
            f"source.model: cannot resolve hub model {model!r} at revision {revision!r}: {type(exc).__name__}: {str(exc)[:200]}. "
            "Offline? Download it elsewhere and point `source.model` at the local folder."
        ) from None


def hub_stage(model: str, revision: str, allow_pickle: bool) -> Stage:
    commit = resolve_hub_commit(model, revision)
    return Stage(
        name="source",
        kind="source-hub",
        version="1",
        params={"model": model, "commit": commit},
        external_key=commit,
        run=lambda ctx: _download(ctx, model, commit, allow_pickle),
        description=f"{model}@{commit[:12]} from the hub",
    )


def _download(ctx: StageContext, model: str, commit: str, allow_pickle: bool) -> dict:
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
