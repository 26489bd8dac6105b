"""Options users pass to activities and workflows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from treeflow.schemas import ParentClosePolicy
from treeflow.schemas import RetryPolicy as RetryPolicyRecord


def resolve_parent_close_policy(policy: ParentClosePolicy | None, wait: bool) -> ParentClosePolicy:
    """The policy recorded for a child: `policy`, or for None and UNSPECIFIED (Temporal's
    and Mistral's "default") the default rule: TERMINATE for a child started with
    `wait=True`, ABANDON for one started with `wait=False`."""
    if policy is None or policy is ParentClosePolicy.UNSPECIFIED:
        return ParentClosePolicy.TERMINATE if wait else ParentClosePolicy.ABANDON
    return ParentClosePolicy(policy)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed activity is retried.

    Delays grow from `initial_interval` by `backoff_coefficient` up to
    `maximum_interval` (default 100 x initial); `maximum_attempts` counts the first
    attempt, 0 means unlimited. Errors whose type is in `non_retryable_error_types`,
    or raised as `ApplicationError(non_retryable=True)`, fail at once.
    """

    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    maximum_interval: timedelta | None = None
    maximum_attempts: int = 0
    non_retryable_error_types: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.backoff_coefficient < 1:
            raise ValueError("backoff_coefficient must be at least 1")
        if self.maximum_attempts < 0:
            raise ValueError("maximum_attempts must be 0 (unlimited) or more")

    def to_record(self) -> RetryPolicyRecord:
        return RetryPolicyRecord(
            initial_interval_ms=millis(self.initial_interval),
            backoff_coefficient=self.backoff_coefficient,
            maximum_interval_ms=millis(self.maximum_interval),
            maximum_attempts=self.maximum_attempts,
            non_retryable_error_types=list(self.non_retryable_error_types),
        )


def millis(duration: timedelta | float | None) -> int | None:
    """Milliseconds of a timedelta (or of seconds given as a number)."""
    if duration is None:
        return None
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {duration!r}")
    return round(seconds * 1000)
