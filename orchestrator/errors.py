"""Errors the control plane returns to operators; each maps to one gRPC status code."""

from __future__ import annotations


class AdminError(Exception):
    """An admin command that cannot be carried out: `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):    # crosses process boundaries inside Ray errors
        return AdminError, (self.code, self.message)


def not_found(message: str) -> AdminError:
    return AdminError("NOT_FOUND", message)


def failed_precondition(message: str) -> AdminError:
    return AdminError("FAILED_PRECONDITION", message)


def invalid_argument(message: str) -> AdminError:
    return AdminError("INVALID_ARGUMENT", message)
