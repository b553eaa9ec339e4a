"""Errors users see, and the exit codes they map to.

Exit codes: 0 ok, 1 a stage failed (or the registry was unreachable),
2 invalid input, 3 a gate failed (only with --fail-on-gate), 4 the model hub could
not be reached (``validate``: the checks that need the model's config.json were
skipped, and named; nothing that was checked is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_GATE_FAILED = 3
#: Not "invalid input": the recipe may be fine, the network or the hub is not.
EXIT_HUB_UNREACHABLE = 4


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located by file, line and dotted YAML path."""

    file: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class QuantforgeError(Exception):
    exit_code = EXIT_STAGE_FAILED


class InvalidInput(QuantforgeError):
    """Bad recipe or bad input data: nothing was built. Carries every problem found."""

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, problems: "list[Problem] | str"):
        if isinstance(problems, str):
            problems = [Problem(file="", path="", message=problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) if p.file else p.message for p in self.problems))


class StageFailed(QuantforgeError):
    """A stage ran and failed; its output was discarded."""

    exit_code = EXIT_STAGE_FAILED


class RegistryUnavailable(QuantforgeError):
    """The tracking server could not be reached; results stay on disk for `quantforge register`."""

    exit_code = EXIT_STAGE_FAILED


class HubUnreachable(QuantforgeError):
    """The model hub could not be reached (offline, DNS, timeout, gated without a token):
    what needs it was not done. Not invalid input: the same recipe may pass once online."""

    exit_code = EXIT_HUB_UNREACHABLE
