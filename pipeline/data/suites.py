"""Declarative eval suites: which text accuracy is measured on (definitions in ``evals/suites/``).

``evals.suite`` in a recipe is one of

* the name of a YAML file in this folder (``builtin``, ``wikitext2``),
* a path to such a YAML file (relative to the recipe),
* or a dataset directly, as ``calibration.dataset`` names one (a local
  .txt/.jsonl/.parquet file, or a hub id ``org/name[:config]``); then
  ``evals.column`` names the text column and the split is ``test``.

A suite YAML has ``name``, ``dataset``, ``split``, ``column`` and optional
``description``; unknown keys are errors. Texts are loaded with
:func:`pipeline.data.text.load_texts` and joined by a blank line, the way
llama.cpp's perplexity tool reads one text file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InvalidInput

# The suite definitions are data shipped in the evals folder (evals/suites/*.yaml).
SUITES_DIR = Path(__file__).resolve().parents[2] / "evals" / "suites"
JOIN = "\n\n"


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str = ""
    dataset: str
    split: str = "test"
    column: str = "text"


@dataclass(frozen=True)
class Suite:
    spec: SuiteSpec
    text: str

    @property
    def fingerprint(self) -> str:
        """Hash of the definition and the exact text: results never outlive a change of either."""
        h = hashlib.sha256(json.dumps(self.spec.model_dump(), sort_keys=True).encode())
        h.update(b"\0" + self.text.encode("utf-8"))
        return h.hexdigest()


def known_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def _read_spec(path: Path) -> SuiteSpec:
    try:
        data = yaml.safe_load(path.read_text())
        return SuiteSpec.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise InvalidInput(f"evals.suite: {path} is not a valid suite: {exc}") from None


def resolve_suite(suite: str, *, base_dir: Path, column: str = "text") -> SuiteSpec:
    """The suite definition a recipe's ``evals.suite`` names."""
    if (SUITES_DIR / f"{suite}.yaml").is_file():
        return _read_spec(SUITES_DIR / f"{suite}.yaml")
    if suite.endswith((".yaml", ".yml")):
        path = Path(suite).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise InvalidInput(f"evals.suite: suite file not found: {path}")
        return _read_spec(path)
    from pipeline.data.text import is_local

    if is_local(suite) or "/" in suite:
        return SuiteSpec(name=Path(suite).stem if is_local(suite) else suite, dataset=suite, split="test", column=column)
    close = difflib.get_close_matches(suite, known_suites(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InvalidInput(f"evals.suite: unknown suite {suite!r}{hint}; known: {', '.join(known_suites())}, a .yaml suite file, a local text file or a hub dataset id")


def load_suite(suite: str, *, base_dir: Path, column: str = "text") -> Suite:
    spec = resolve_suite(suite, base_dir=base_dir, column=column)
    from pipeline.data.text import load_texts

    texts = load_texts(spec.dataset, base_dir=base_dir, split=spec.split, column=spec.column, what="evals.suite")
    if not texts:
        raise InvalidInput(f"evals.suite: suite {spec.name!r} has no text")
    return Suite(spec=spec, text=JOIN.join(texts))
