"""Every error the worker raises on purpose, in one place.

Each class says whether the same operation may succeed if repeated (``retriable``), the way
aiokafka's ``KafkaError.retriable`` does; the one retry policy of the service reads that flag and
nothing else, so a new error is classified here, once, not at every call site.
"""

from __future__ import annotations


class SignalWorkerError(Exception):
    """Base class. ``retriable``: the same call may succeed later (back off and retry)."""

    retriable: bool = False


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


class InvalidCandles(InsufficientHistory):
    """The candles themselves are unusable (a non-positive or non-finite price, high under low,
    open times out of order): reason ``invalid_candles``. An InsufficientHistory, so a caller that
    sets aside symbols it cannot forecast sets these aside too."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_candles", detail)


class StateError(SignalWorkerError):
    """Redis answered, or failed to, in a way the window store cannot use."""


class StateUnavailable(StateError):
    """Redis cannot be reached or cannot take writes for now (connection lost, timeout, LOADING,
    READONLY replica during a failover, OOM): the caller pauses input and retries with backoff."""

    retriable = True


class SymbolStateCorrupt(StateError):
    """One symbol's keys hold data the worker cannot use (WRONGTYPE, a non-integer watermark, an
    undecodable bar). Confined to that symbol: it is quarantined, every other symbol is served."""

    def __init__(self, symbol: str, reason: str, detail: str) -> None:
        super().__init__(f"{symbol}: {reason}: {detail}")
        self.symbol = symbol
        self.reason = reason
        self.detail = detail


class StateMisconfigured(StateError):
    """Redis refuses the worker itself (NOPERM, MOVED/ASK from a cluster, an unknown command): no
    retry helps; start-up or the consume loop fails with a message naming the setting."""


class PublishFailed(SignalWorkerError):
    """The broker refused records for good (too large, not authorised, no such topic): retrying
    cannot help. The message names the topic and the setting to look at; the worker exits non-zero
    without committing, so nothing is lost."""


class SamplingStalled(SignalWorkerError):
    """A sampling call has run past ``SIGNAL_WORKER_SAMPLING__STALL_AFTER_S`` (a hung CUDA kernel, a
    deadlock in a native library): a thread cannot be interrupted, so the worker exits non-zero
    without committing the stuck batch; the group gives its partitions to a healthy replica, which
    forecasts the batch again."""


class BrokerUnreachable(SignalWorkerError):
    """No broker answered within ``SIGNAL_WORKER_KAFKA__BOOTSTRAP_TIMEOUT_S`` at start-up."""
