"""``Report``: what a task's generator yields to the runner (docs/reference.md, "Reports")."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._contexts import is_typed_context_value
from ._errors import ConfigurationError
from ._validation import check_message, check_progress, check_text


class Phase(enum.StrEnum):
    """How far a task has got, as it says in a ``Report``."""

    NORMAL = "normal"
    """A checkpoint: the context is stored before the generator resumes."""
    FINISHED = "finished"
    """Done. The runner closes the generator."""
    FAILED = "failed"
    """Failed; retried while attempts are left. The runner closes the generator."""


@dataclass(frozen=True, slots=True)
class Report:
    """One checkpoint or final word of a running task.

    ``context`` None keeps the stored context. It is a ``str`` — one with a NUL character or a
    lone surrogate cannot be stored and is refused here, so the task that yields it fails alone
    with a clear error — or, for a task type with a ``context_type``, a value of that type (a
    dataclass or pydantic model instance, or a TypedDict's dict), checked and encoded when it is
    stored. ``delete`` (terminal phases only) removes the task's row instead of keeping it
    FINISHED or FAILED. ``error`` is the failure text: any ``str``, made storable when stored.
    ``progress`` (a fraction from 0 to 1) and ``message`` (at most 1,000 characters) are stored
    with the checkpoint, in the same write; None keeps the stored value (docs/design.md §2.6).
    """

    context: object = None
    phase: Phase = Phase.NORMAL
    delete: bool = False
    error: str | None = None
    progress: float | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.context, str):
            check_text("Report context", self.context, allow_empty=True)
        elif self.context is not None and not is_typed_context_value(self.context):
            raise ConfigurationError(
                "Report context must be a str or a typed context (a dataclass, TypedDict or "
                f"pydantic model), not {type(self.context).__name__}"
            )
        if not isinstance(self.phase, Phase):
            raise ConfigurationError(f"Report phase must be a Phase, not {self.phase!r}")
        if self.delete and self.phase is Phase.NORMAL:
            raise ConfigurationError("delete=True is only meaningful on a terminal report")
        if self.error is not None and self.phase is not Phase.FAILED:
            raise ConfigurationError("error is only meaningful on a failed report")
        if self.error is not None and not isinstance(self.error, str):
            raise ConfigurationError(f"Report error must be a str, not {type(self.error).__name__}")
        if self.progress is not None:
            object.__setattr__(self, "progress", check_progress(self.progress))
        if self.message is not None:
            check_message(self.message)

    @classmethod
    def finished(
        cls,
        context: object = None,
        *,
        delete: bool = False,
        progress: float | None = None,
        message: str | None = None,
    ) -> Report:
        """The task is done; ``delete=True`` removes its record."""
        return cls(
            context=context,
            phase=Phase.FINISHED,
            delete=delete,
            progress=progress,
            message=message,
        )

    @classmethod
    def failed(
        cls,
        error: str = "failed",
        *,
        context: object = None,
        delete: bool = False,
        progress: float | None = None,
        message: str | None = None,
    ) -> Report:
        """The task failed with ``error``; it is retried while attempts are left."""
        return cls(
            context=context,
            phase=Phase.FAILED,
            delete=delete,
            error=error,
            progress=progress,
            message=message,
        )

    @property
    def stores(self) -> bool:
        """Whether a checkpoint has anything to store (context, progress or message)."""
        return self.context is not None or self.progress is not None or self.message is not None

    @property
    def terminal(self) -> bool:
        return self.phase is not Phase.NORMAL
