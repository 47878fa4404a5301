"""Errors the daemon raises on purpose, each with a stable reason code.

Every surface maps these the same way: the control API to a gRPC status plus an
`aegis-reason` trailer, the gate to an HTTP status plus a JSON error code.
Messages must never contain a secret.
"""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """The class of failure; one gRPC status code each."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    INTERNAL = "internal"


class AegisError(Exception):
    """A failure with a precise, secret-free message and a stable reason code."""

    kind: Kind = Kind.INTERNAL
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


def log_safe(exc: BaseException) -> str:
    """What a log line may say about a failure: an AegisError's message (written to be shown), or only the
    type of any other exception, whose text may hold data."""
    return exc.message if isinstance(exc, AegisError) else type(exc).__name__


class InvalidArgument(AegisError):
    kind = Kind.INVALID_ARGUMENT
    reason = "invalid_argument"


class NotFound(AegisError):
    kind = Kind.NOT_FOUND
    reason = "not_found"


class AlreadyExists(AegisError):
    kind = Kind.ALREADY_EXISTS
    reason = "already_exists"


class FailedPrecondition(AegisError):
    kind = Kind.FAILED_PRECONDITION
    reason = "failed_precondition"


class VaultLocked(FailedPrecondition):
    reason = "vault_locked"

    def __init__(self) -> None:
        super().__init__("the vault is locked")


class VaultUninitialized(FailedPrecondition):
    reason = "vault_uninitialized"

    def __init__(self) -> None:
        super().__init__("no vault has been created in this data directory")


class WrongPassphrase(AegisError):
    kind = Kind.PERMISSION_DENIED
    reason = "wrong_passphrase"


class StorageFull(AegisError):
    kind = Kind.RESOURCE_EXHAUSTED
    reason = "storage_full"


class StorageReadOnly(AegisError):
    kind = Kind.FAILED_PRECONDITION
    reason = "storage_read_only"


class StorageCorrupt(AegisError):
    kind = Kind.DATA_LOSS
    reason = "storage_corrupt"


class StorageUnavailable(AegisError):
    kind = Kind.UNAVAILABLE
    reason = "storage_unavailable"


class ShuttingDown(AegisError):
    """aegisd is stopping: a call that would run on past the stop (`ledger follow`) is ended."""

    kind = Kind.UNAVAILABLE
    reason = "shutting_down"
