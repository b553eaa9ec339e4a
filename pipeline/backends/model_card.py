"""Model cards as the Hugging Face Hub reads them: ``huggingface_hub``'s ``ModelCard`` and
``ModelCardData``, and the source model as a card names it.

Shared by the target kinds' build-time cards (:mod:`pipeline.targets.cards` adds the serve and
download sections) and the sources (a dequantized GGUF gets a card of its own); imports
nothing of quantforge's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceIdentity:
    """The source model as a card names it."""

    name: str  # what it is: "SmolLM2-135M-Instruct (HuggingFaceTB)", "org/name", "builtin:tiny-llama-mini"
    revision: str  # exactly which weights, one phrase (markdown)
    upstream: str | None = None  # the hub repository of the original weights, when known
    license: str | None = None  # the source's license (Hub identifier, e.g. apache-2.0), when known

    def sentence(self) -> str:
        """How a card's first paragraph names it (the revision is in its "Source" section)."""
        return f"`{self.name}`"

    def lines(self) -> list[str]:
        """The card's "Source" list."""
        out = [f"- model: `{self.name}`"]
        if self.upstream and self.upstream != self.name:
            out.append(f"- original weights: [{self.upstream}](https://huggingface.co/{self.upstream})")
        out.append(f"- revision: {self.revision}")
        return out


def card_data(source: SourceIdentity, *, tags: list[str] | tuple[str, ...], library_name: str | None = None,
              license: str | None = None, measured: dict | None = None):
    """The card's front matter as huggingface_hub's ``ModelCardData``: what the Hub reads to file the model
    (license, the base model it quantizes, the task, tags) plus, when an evaluation has been run,
    ``quantforge`` with the measured numbers (:func:`measured_numbers`)."""
    from huggingface_hub import ModelCardData

    extra = {"quantforge": measured} if measured else {}
    return ModelCardData(
        license=license or source.license,
        base_model=source.upstream,
        base_model_relation="quantized" if source.upstream else None,
        pipeline_tag="text-generation",
        library_name=library_name,
        tags=sorted({"quantforge", *(t for t in tags if t)}),
        **extra,
    )


def hub_card(data, body: list[str] | str) -> str:
    """A model card (README.md text) through huggingface_hub's ``ModelCard``: its YAML front matter from `data`,
    then the markdown `body`. Parsed back by ModelCard, so a card that does not load on the Hub is never written."""
    from huggingface_hub import ModelCard

    text = body if isinstance(body, str) else "\n".join(body)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}")
    return str(card).rstrip("\n") + "\n"
