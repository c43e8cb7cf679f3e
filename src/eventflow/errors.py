"""Error classes that decide behaviour: retried, dead-lettered, or refused at the edge."""

from __future__ import annotations


class EventflowError(Exception):
    """Base class for every error EventFlow raises on purpose."""

    #: Short machine-readable failure class recorded in job state and DLQ entries.
    failure_class: str = "error"


class TransientError(EventflowError):
    """A failure that may succeed on retry (Redis hiccup, remote store timeout)."""

    failure_class = "transient"


#: Downstream dependencies guarded by a circuit breaker shared in Redis (see docs/operations.md).
DEPENDENCIES = ("input_store", "output_store")


class DependencyUnavailable(TransientError):
    """A downstream store the job needs is unreachable (not the job's fault): counts toward its breaker."""

    def __init__(self, dependency: str, message: str) -> None:
        if dependency not in DEPENDENCIES:
            raise ValueError(f"unknown dependency {dependency!r}; one of {DEPENDENCIES}")
        super().__init__(message)
        self.dependency = dependency
        self.failure_class = f"{dependency}_unavailable"


class PermanentError(EventflowError):
    """A failure that will fail again: bad input, unreadable raster, raster too large."""

    failure_class = "permanent"


class PoisonMessage(PermanentError):
    """A stream entry that cannot be decoded: unknown schema version or invalid payload."""

    failure_class = "poison"


class InputError(PermanentError):
    """The job's inputs are unusable (missing file, wrong band, mismatched grids)."""

    failure_class = "input"


class RasterTooLarge(PermanentError):
    """The raster exceeds the configured size limits."""

    failure_class = "raster_too_large"


class ConfigError(EventflowError):
    """A setting is invalid; the message names the environment variable."""

    failure_class = "config"


class LostLease(TransientError):
    """The worker no longer owns the job's lease (it was fenced out); it must write nothing."""

    failure_class = "lost_lease"


class LibraryMismatch(EventflowError):
    """The Redis Function library on the server is missing or of another version."""

    failure_class = "library_mismatch"


class EpochMismatch(EventflowError):
    """Redis was wiped (bootstrap epoch key missing) while EventFlow state was expected."""

    failure_class = "epoch_mismatch"
