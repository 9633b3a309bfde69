"""Typed errors of the core; activities map them to non-retryable ApplicationErrors."""

from __future__ import annotations


class CsbsError(Exception):
    """Base class. ``retryable`` says whether trying the same call again may succeed."""

    retryable = False

    @property
    def type_name(self) -> str:
        return type(self).__name__


class InvalidInput(CsbsError):
    """A request broke a rule (bad name, bad size, bad mapping, ...)."""


class NotFound(CsbsError):
    """A server, disk, backup, task or object does not exist."""


class InvalidState(CsbsError):
    """The thing exists but its state forbids the operation."""


class Conflict(CsbsError):
    """Another operation holds what this one needs (e.g. a backup already running)."""


class QuotaExceeded(CsbsError):
    """The project's backup quota would be exceeded."""


class GarbageCollectionRunning(CsbsError):
    """A sweep holds the project's chunks for a moment; retrying soon succeeds."""

    retryable = True


class CorruptData(CsbsError):
    """Stored data failed its digest or format check: never retried, never trusted."""


class StorageError(CsbsError):
    """The object store failed; transient, so retried."""

    retryable = True


class StorageUnavailable(CsbsError):
    """The bucket is missing or the credentials are refused: needs a person, not a retry."""


class DiskUnavailable(CsbsError):
    """A disk image is missing or may not be opened: needs a person, not a retry."""


class DriverError(CsbsError):
    """The compute driver failed to do something to a server or disk."""

    retryable = True


class GarbageCollectionDeferred(CsbsError):
    """Backups are running: the sweep waits for them (CollectGarbage tries again later)."""


class LeaseLost(CsbsError):
    """A sweep no longer holds its lease (it stalled, or a retry took over): it stops
    before deleting anything more. Retried: a new attempt takes a new lease."""

    retryable = True


class UnsafePath(CsbsError):
    """A directory csbs would trust (sockets, keys) is not private to it: a person fixes it."""
