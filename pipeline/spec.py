"""Building blocks of recipe sections that target kinds share with the recipe.

Kept apart from :mod:`pipeline.recipe` so that a target kind's settings class
(``pipeline/targets/<kind>/__init__.py``) can use them while the recipe builds its
target union from the kinds: the import graph points one way,
``recipe -> targets -> spec``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
# Names become folder, file and MLflow names: bounded well below file systems' 255-byte limit.
NAME_MAX = 64


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GateThresholds(Strict):
    """The checks a gate can make; ``None`` switches one off."""

    max_perplexity_increase_pct: float | None = Field(None, ge=0)
    max_kl_divergence: float | None = Field(None, ge=0)
    max_kl_p99: float | None = Field(None, ge=0)
    min_top1_agreement_pct: float | None = Field(None, ge=0, le=100)
    min_task_accuracy_recovery_pct: float | None = Field(None, ge=0, le=1000)
    min_decode_speedup: float | None = Field(None, gt=0)


class GateSpec(GateThresholds):
    """Thresholds an artifact must meet on every required device to be promoted."""

    max_perplexity_increase_pct: float | None = Field(5.0, ge=0)
    required_devices: list[str] | None = None
    #: what the per-device recommendation optimizes among artifacts that pass
    recommend: str = Field("smallest", pattern=r"^(smallest|fastest)$")


class GateOverride(GateThresholds):
    """Per-target overrides of the recipe's gates; unset keys keep the recipe's value."""
