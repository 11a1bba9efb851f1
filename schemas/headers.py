"""Kafka record header names and builders. Header values are bytes (ASCII/UTF-8 text).

Headers are informative: the payload is the contract and always carries its own ``schema_version``.
Consumers must not require a header to decode a message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from schemas.codec import CONTENT_TYPE as CONTENT_TYPE_MSGPACK
from schemas.deadletter import DeadLetterRecord
from schemas.forecast import ForecastMessage

SCHEMA_VERSION: Final = "schema_version"
MODEL_VERSION: Final = "model_version"
IDEMPOTENCY_KEY: Final = "idempotency_key"
CONTENT_TYPE: Final = "content-type"
DLQ_REASON: Final = "dlq_reason"

Headers = list[tuple[str, bytes]]


def idempotency_key(symbol: str, timeframe: str, open_time: int, model_version: str) -> str:
    """``"EURUSD:5m:1700000100000:sssd-1.2"``: one forecast per bar and model. A consumer that sees a
    key twice (producer retry, worker restart, rebalance) can drop the second copy."""
    return f"{symbol}:{timeframe}:{open_time}:{model_version}"


def _content() -> tuple[str, bytes]:
    return (CONTENT_TYPE, CONTENT_TYPE_MSGPACK.encode())


def candle_headers(schema_version: int = 1) -> Headers:
    """Headers a producer of ``candles`` should set (optional for the worker)."""
    return [_content(), (SCHEMA_VERSION, str(schema_version).encode())]


def forecast_headers(message: ForecastMessage) -> Headers:
    """``content-type``, ``schema_version``, ``model_version`` and ``idempotency_key`` for a forecast."""
    return forecast_headers_of(message.symbol, message.timeframe, message.open_time, message.model_version,
                               schema_version=message.schema_version)


def forecast_headers_of(symbol: str, timeframe: str, open_time: int, model_version: str, *,
                        schema_version: int = 1) -> Headers:
    """:func:`forecast_headers` from the values alone, for producers that do not build the model."""
    key = idempotency_key(symbol, timeframe, open_time, model_version)
    return [
        _content(),
        (SCHEMA_VERSION, str(schema_version).encode()),
        (MODEL_VERSION, model_version.encode()),
        (IDEMPOTENCY_KEY, key.encode()),
    ]


def dead_letter_headers(record: DeadLetterRecord) -> Headers:
    """``content-type``, ``schema_version`` and ``dlq_reason`` for a dead-letter record."""
    return [
        _content(),
        (SCHEMA_VERSION, str(record.schema_version).encode()),
        (DLQ_REASON, record.reason.value.encode()),
    ]


def header_value(headers: Iterable[tuple[str, bytes]] | None, name: str) -> bytes | None:
    """The value of the first header called ``name`` (exact, case-sensitive), or ``None``."""
    for key, value in headers or ():
        if key == name:
            return value
    return None
