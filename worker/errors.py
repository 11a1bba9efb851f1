"""Every error the worker raises on purpose, in one place."""

from __future__ import annotations


class SignalWorkerError(Exception):
    """Base class."""


class ConfigError(SignalWorkerError):
    """A setting is invalid; the message names the environment variable."""


class CheckpointError(SignalWorkerError):
    """A checkpoint is missing, corrupt, mismatched or unsafe; the message says which part."""


class TimeframeError(SignalWorkerError):
    """A timeframe or horizon does not fit the model or the stream."""


class InsufficientHistory(SignalWorkerError):
    """A window cannot yield a forecast (too short, too many missing bars). ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StateUnavailable(SignalWorkerError):
    """Redis cannot be reached; the caller retries with backoff and pauses input."""
