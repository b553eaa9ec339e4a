"""The built-in demo model ("builtin:tiny-llama"), trained here from a shipped corpus.

Importing this package is cheap: torch, transformers and tokenizers load only when
``train_demo_model`` runs. The training names resolve lazily (PEP 562), so that
``python -m pipeline.demo.train`` does not import the module twice.
"""

from pipeline.demo.corpus import corpus_path, corpus_sha256, corpus_text

__all__ = [
    "VARIANTS",
    "DemoVariant",
    "corpus_path",
    "corpus_sha256",
    "corpus_text",
    "train_demo_model",
]


def __getattr__(name: str):
    if name in ("VARIANTS", "DemoVariant", "train_demo_model"):
        from pipeline.demo import train

        return getattr(train, name)
    raise AttributeError(f"module 'pipeline.demo' has no attribute {name!r}")
