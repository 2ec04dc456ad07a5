"""Errors a weight-sync backend raises to the HTTP layer, each with the status code it maps to."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status; the message is shown to the client verbatim (never a secret)."""

    status_code: int = 500

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(ApiError):
    status_code = 400


class Conflict(ApiError):
    """Another sync is running, or the server is not in a state that allows this call."""

    status_code = 409


class NotReady(ApiError):
    """The broadcaster was never initialised, or the model is torn and refuses to serve."""

    status_code = 503


class SyncError(ApiError):
    """The sync ran and failed (refused manifest, peer died, timeout); the reason names the cause."""

    status_code = 502


class SyncTimedOut(ApiError):
    status_code = 504
