"""Message contracts of the signal worker: candles in, forecasts out, dead letters aside.

All three are versioned msgpack maps with string keys (see ``docs/schemas.md``). This package never
imports ``worker`` or torch, so producers and consumers elsewhere can depend on it alone.
"""

from schemas.candle import (
    CANDLE_SCHEMA_VERSION,
    DEFAULT_MAX_BYTES,
    SYMBOL_PATTERN,
    CandleEvent,
    CandleFields,
    decode_candle,
    decode_candle_fields,
    encode_candle,
)
from schemas.codec import packb, unpackb
from schemas.deadletter import (
    DEAD_LETTER_SCHEMA_VERSION,
    DeadLetterRecord,
    decode_dead_letter,
    encode_dead_letter,
)
from schemas.errors import REJECT_REASON_DESCRIPTIONS, CandleRejected, MessageDecodeError, RejectReason
from schemas.forecast import (
    FORECAST_SCHEMA_VERSION,
    QUANTILE_KEYS,
    QUANTILE_LEVELS,
    ForecastMessage,
    HorizonForecast,
    decode_forecast,
    encode_forecast,
    pack_forecast,
)
from schemas.headers import (
    candle_headers,
    dead_letter_headers,
    forecast_headers,
    forecast_headers_of,
    header_value,
    idempotency_key,
)
from schemas.timeframe import format_duration, horizon_bars, parse_duration_ms, parse_horizons

SCHEMA_VERSION = 1
"""The current version of every contract in this package."""

# Default topic names; deployments may override them.
TOPIC_CANDLES = "candles"
TOPIC_FORECASTS = "forecasts"
TOPIC_DEAD_LETTER = "candles.dlq"

__all__ = [
    "CANDLE_SCHEMA_VERSION",
    "DEAD_LETTER_SCHEMA_VERSION",
    "DEFAULT_MAX_BYTES",
    "FORECAST_SCHEMA_VERSION",
    "QUANTILE_KEYS",
    "QUANTILE_LEVELS",
    "REJECT_REASON_DESCRIPTIONS",
    "SCHEMA_VERSION",
    "SYMBOL_PATTERN",
    "TOPIC_CANDLES",
    "TOPIC_DEAD_LETTER",
    "TOPIC_FORECASTS",
    "CandleEvent",
    "CandleFields",
    "CandleRejected",
    "DeadLetterRecord",
    "ForecastMessage",
    "HorizonForecast",
    "MessageDecodeError",
    "RejectReason",
    "candle_headers",
    "dead_letter_headers",
    "decode_candle",
    "decode_candle_fields",
    "decode_dead_letter",
    "decode_forecast",
    "encode_candle",
    "encode_dead_letter",
    "encode_forecast",
    "forecast_headers",
    "forecast_headers_of",
    "format_duration",
    "header_value",
    "horizon_bars",
    "idempotency_key",
    "pack_forecast",
    "packb",
    "parse_duration_ms",
    "parse_horizons",
    "unpackb",
]
