"""The shipped demo corpus (public-domain KJV narrative books; see kjv/SOURCE.md).

The file holds one paragraph per Bible chapter, paragraphs separated by one blank
line. The split is deterministic and by whole paragraphs: every 20th paragraph
(0-based index ``i`` with ``i % 20 == 19``) is held out, the rest is training text.
Interleaving (rather than taking the tail) keeps the held-out text in-distribution
across all books. The held-out split is the project's default accuracy-eval text.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 20


def corpus_path() -> Path:
    """Path of the shipped corpus file (UTF-8 plain text)."""
    return Path(__file__).resolve().parent / "kjv" / "corpus.txt"


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    text = corpus_path().read_text(encoding="utf-8")
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


def corpus_paragraphs(split: str) -> list[str]:
    """The paragraphs of one split, in corpus order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    heldout = split == "heldout"
    return [
        p
        for i, p in enumerate(_paragraphs())
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout
    ]


def corpus_text(split: str) -> str:
    """The text of one split: its paragraphs joined by a blank line (no trailing newline)."""
    return "\n\n".join(corpus_paragraphs(split))


@lru_cache(maxsize=1)
def corpus_sha256() -> str:
    """SHA-256 (hex) of the corpus file's bytes."""
    return hashlib.sha256(corpus_path().read_bytes()).hexdigest()
