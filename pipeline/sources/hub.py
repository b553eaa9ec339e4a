"""A Hugging Face Hub model at a revision (resolved to a commit, so the key is exact)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.core.stage import Stage, StageContext
from pipeline.errors import HubUnreachable, InvalidInput, StageFailed
from pipeline.sources.local import check_local_dir, fingerprint_dir

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")) and not model.endswith(".gguf")


def is_commit(revision: str) -> bool:
    """A full commit hash: the files it names never change, so a cached copy is the truth."""
    return bool(COMMIT.match(revision))


def fetch_config(model: str, revision: str) -> dict:
    """The model's config.json alone (a few KB), so ``validate`` can check a recipe against the
    model's shape before anyone downloads its weights.

    A cached copy is used without asking the hub when ``revision`` is a commit (immutable) or
    ``HF_HUB_OFFLINE`` is set; otherwise ``huggingface_hub`` fetches it into its usual cache.
    Raises :class:`InvalidInput` when the hub answers that the model, revision or file does not
    exist, :class:`HubUnreachable` when it cannot answer (offline, DNS, timeout) or will not
    without credentials (a gated model).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError, HFValidationError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{model}@{revision}"
    cached = _cached(model, revision)
    if cached is not None and (is_commit(revision) or constants.HF_HUB_OFFLINE):
        return _read_config(cached, where)
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(f"config.json of {where} is not in the local hub cache and HF_HUB_OFFLINE is set")
    try:
        # One HEAD request without retries first: offline, hf_hub_download alone retries for ~25 s.
        meta = get_hf_file_metadata(hf_hub_url(model, "config.json", revision=revision), timeout=10)
        path = hf_hub_download(model, "config.json", revision=meta.commit_hash or revision)
    except GatedRepoError:
        raise HubUnreachable(f"{model} is gated: accept its license on the hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InvalidInput(f"no hub model {model!r} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InvalidInput(f"hub model {model!r} has no revision {revision!r}") from None
    except RemoteEntryNotFoundError:
        raise InvalidInput(f"hub model {where} has no config.json: not a transformers model") from None
    except HFValidationError as exc:
        raise InvalidInput(f"{model!r} is not a hub id: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - connection, DNS, timeout, 5xx: the hub did not answer
        if cached is not None:
            return _read_config(cached, where)
        first = (str(exc).splitlines() or [""])[0][:160]
        raise HubUnreachable(f"cannot fetch config.json of {where}: {type(exc).__name__}: {first}") from None
    return _read_config(path, where)


def _cached(model: str, revision: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except HFValidationError:
        return None
    return found if isinstance(found, str) else None


def _read_config(path: str, where: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"config.json of {where} ({path}) is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"config.json of {where} ({path}) is not a JSON object")
    return data


def resolve_hub_commit(model: str, revision: str) -> str:
    if is_commit(revision):
        return revision  # already exact: no need to ask the hub (a pinned recipe plans offline)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().model_info(model, revision=revision).sha
    except GatedRepoError:
        raise HubUnreachable(f"source.model: {model} is gated: accept its license on the hub, then set HF_TOKEN") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InvalidInput(f"source.model: no hub model {model!r} at revision {revision!r} (private? set HF_TOKEN)") from None
    except Exception as exc:  # noqa: BLE001 - the hub did not answer
        raise HubUnreachable(
            f"source.model: cannot resolve hub model {model!r} at revision {revision!r}: {type(exc).__name__}: {str(exc)[:200]}. "
            "Offline? Pin `source.revision` to a commit, or point `source.model` at a local folder."
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
