"""The ``budget`` kind: the best artifact under a bit budget, chosen across formats.

A budget target lists candidate configurations of other kinds (GPTQ, AWQ, AutoRound,
GGUF types, ...) and a budget: at most ``max_bpw`` bits per weight on the linear layers,
or at most ``max_size_mib`` on disk. It builds every candidate (each a cached stage of
its own kind, so a candidate another target also builds is built once), counts each
one's bits from its files, scores those within budget on ``device`` against the source
on text held out from calibration *and* from the final eval, and keeps the best. Its
artifact is the winner's files plus ``selection.json``: every candidate, its bits, its
score and why it won or lost.

Why quantforge does this itself: each library's search stays inside its own format
(auto-round's AutoScheme, ModelOpt's AutoQuantize, llama.cpp's per-tensor types); the
choice a user faces is between formats.

Settings and declaration only. Its stages score candidates, which is eval work, so they live in the
evals layer (:mod:`evals.budget`), above the kinds whose planners they call.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from pipeline.targets.base import CheckContext, Found, KindDeclaration, TargetBase


def _device(name: str) -> str:
    from pipeline.backends.devices import Device

    return Device.parse(name).name


class BudgetTarget(TargetBase):
    """The best of several candidate configurations within a bit budget, on held-out text.

    Example::

        - name: best-4-5
          kind: budget
          max_bpw: 4.5            # linear-layer bits per weight (or max_size_mib)
          device: cpu             # where candidates are scored (and the winner will run)
          metric: kl              # kl (mean KL divergence) or ppl (perplexity ratio)
          candidates:
            - {kind: gptq, group_size: 64, symmetric: false, observer: mse}
            - {kind: awq, group_size: 64, duo_scaling: both, observer: mse, gptq: {actorder: weight}}
            - {kind: gguf, quants: [IQ4_XS, Q4_0], imatrix: true}
    """

    kind: Literal["budget"]
    #: the most linear-layer bits per weight (counted from the candidate's files, as the table does)
    max_bpw: float | None = Field(None, gt=0, le=64)
    #: or: the most MiB on disk (the artifact's files)
    max_size_mib: float | None = Field(None, gt=0)
    #: the device candidates are scored on: a format's quality can differ between runtimes
    device: Annotated[str, AfterValidator(_device)] = "cpu"
    #: what "best" means: the lowest mean KL divergence from the source, or the lowest perplexity ratio
    metric: Literal["kl", "ppl"] = "kl"
    #: windows of evals.context tokens each candidate is scored on
    selection_windows: int = Field(16, ge=1, le=100_000)
    #: the text candidates are scored on; unset: the eval suite's text *after* the windows the
    #: final eval scores (disjoint from it by construction; the builtin suite is held out from calibration)
    selection_suite: str | None = None
    #: other kinds' target settings without a name (a gguf candidate with several quants is several candidates)
    candidates: list[dict[str, Any]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_budget(self) -> "BudgetTarget":
        if (self.max_bpw is None) == (self.max_size_mib is None):
            raise ValueError("give exactly one budget: max_bpw (linear-layer bits per weight) or max_size_mib")
        return self

    def candidate_targets(self) -> list[tuple[int, Any | None, list[Found]]]:
        """Each candidate as its kind's target (named ``<name>-<j>``), or None and why not."""
        from pydantic import ValidationError

        from pipeline.targets import declaration, registered, unknown_kind_message

        out = []
        for j, raw in enumerate(self.candidates):
            where = ("candidates", j)
            kind = raw.get("kind")
            if not isinstance(kind, str):
                out.append((j, None, [((*where, "kind"), "a candidate needs a `kind:` (gptq, awq, autoround, fp8, gguf, ...)")]))
                continue
            if kind not in registered():
                out.append((j, None, [((*where, "kind"), unknown_kind_message(kind))]))
                continue
            if kind == "budget":
                out.append((j, None, [((*where, "kind"), "a budget target cannot be a candidate of another")]))
                continue
            if "name" in raw or "gates" in raw:
                key = "name" if "name" in raw else "gates"
                out.append((j, None, [((*where, key), f"candidates take no `{key}:` (the budget target's own applies)")]))
                continue
            try:
                out.append((j, declaration(kind).settings.model_validate({**raw, "name": f"{self.name}-{j}"}), []))
            except ValidationError as exc:
                out.append((j, None, [((*where, *(str(p) for p in e["loc"])), e["msg"]) for e in exc.errors()]))
        return out

    def needs_calibration(self) -> bool:
        return any(t is not None and t.needs_calibration() for _, t, _ in self.candidate_targets())

    def problems(self, ctx: CheckContext) -> list[Found]:
        from pipeline.backends.devices import Device
        from pipeline.targets import declaration

        device_class = Device.parse(self.device).kind
        here = ("targets", ctx.index)
        found: list[Found] = []
        for j, target, errors in self.candidate_targets():
            found += [((*here, *loc), msg) for loc, msg in errors]
            if target is None:
                continue
            why = declaration(target.kind).missing()
            if why:
                found.append(((*here, "candidates", j, "kind"), why))
            if not all(fmt.eval_runtimes.get(device_class) for fmt in declaration(target.kind).formats):
                found.append(((*here, "candidates", j, "kind"),
                              f"{target.kind} artifacts have no eval runtime on {self.device}: the candidate could not be scored there"))
            # The candidate's own checks, located under this candidate.
            for loc, msg in target.problems(ctx):
                if loc[:2] == here:
                    loc = (*here, "candidates", j, *loc[2:])
                    # a kind's message names its own fields as targets.<i>.<field>
                    msg = msg.replace(f"targets.{ctx.index}.", f"targets.{ctx.index}.candidates.{j}.")
                found.append((loc, msg))
        return found


BUDGET = KindDeclaration(
    kind="budget",
    settings=BudgetTarget,
    planner="evals.budget:plan_stages",
    summary="the best candidate (any kinds) within a bits-per-weight or size budget, chosen on held-out text",
    # Its artifact is one of the candidates' formats, known when it has been chosen (the build
    # report then names that kind, and the eval and registry treat it as one).
    formats=(),
    # Candidates are mostly llm-compressor builds, which want a GPU runner.
    ci_runner="gpu",
    libraries=(),
)
