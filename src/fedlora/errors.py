"""Domain exceptions. The CLI turns any :class:`FedloraError` into one line and exit status 2."""

from __future__ import annotations


class FedloraError(Exception):
    """Base class for every error fedlora reports to a user as a one-line message."""


class ConfigError(FedloraError):
    """A configuration key or value is unknown, of the wrong type, out of range or contradictory."""


class DataError(FedloraError):
    """A dataset is missing, empty, malformed or too small for the requested partition."""


class ModelError(FedloraError):
    """A model cannot be found or loaded."""


class UpdateRejected(FedloraError):
    """A client's upload failed validation; the round goes on without it."""

    def __init__(self, client: int | str, reason: str) -> None:
        super().__init__(f"update from client {client} rejected: {reason}")
        self.client = client
        self.reason = reason


class RoundFailed(FedloraError):
    """Too few valid updates arrived for a round; the global state is left unchanged."""


class ClientFailure(FedloraError):
    """A client did not deliver a usable reply (crashed, timed out, raised, diverged); it is left out of the round."""
