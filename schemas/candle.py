"""The input contract: one OHLCV bar on the ``candles`` topic (Kafka key = UTF-8 symbol).

:func:`decode_candle_fields` is on the hot path of the worker. It validates the decoded msgpack map
with plain Python checks, in a fixed order, and returns the values as a :class:`CandleFields`
tuple: building a pydantic model per record would cost more than all the checks together.
:func:`decode_candle` runs the same checks and returns the :class:`CandleEvent` model (built with
``model_construct``, no second pydantic validation). Constructing :class:`CandleEvent` directly (``CandleEvent(...)``,
``model_validate``) runs the equivalent pydantic validation, minus the checks that need the worker's
context (its timeframe and the Kafka key).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Annotated, Any, Final, Literal, NamedTuple, NoReturn

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, model_validator

from schemas.codec import kind_of, packb, short_repr, unpackb
from schemas.errors import CandleRejected, RejectReason
from schemas.timeframe import format_duration, parse_duration_ms

CANDLE_SCHEMA_VERSION: Final = 1
SYMBOL_PATTERN: Final = r"^[A-Z0-9._-]{1,32}$"
TIMEFRAME_PATTERN: Final = r"^[1-9][0-9]*[smhd]$"
DEFAULT_MAX_BYTES: Final = 4096
MAX_TIME_MS: Final = 2**63  # exclusive; times are signed 64-bit milliseconds

_SYMBOL_RE = re.compile(r"[A-Z0-9._-]{1,32}")
_TIMEFRAME_RE = re.compile(r"[1-9][0-9]*[smhd]")

_Price = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]


class CandleEvent(BaseModel):
    """One OHLCV bar of one symbol, as published on the ``candles`` topic.

    Encoded as a msgpack map with string keys. Unknown keys are ignored (forward compatibility).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        title="CandleEvent",
        json_schema_extra={
            "description": (
                "One OHLCV bar of one symbol on the `candles` topic, encoded as a msgpack map with "
                "string keys. Kafka key: the symbol as UTF-8. Unknown keys are ignored by consumers. "
                "Numbers must be finite (msgpack can carry NaN/inf; they are rejected). Integers are "
                "accepted where a float is expected; booleans and strings are not."
            )
        },
    )

    schema_version: Literal[1] = Field(
        default=1,
        description="Contract version. Optional on input (defaults to 1); any other value is rejected.",
    )
    symbol: StrictStr = Field(
        pattern=SYMBOL_PATTERN,
        description="Instrument, upper-case, e.g. `EURUSD`. Must equal the Kafka key when a key is set.",
    )
    timeframe: StrictStr = Field(
        pattern=TIMEFRAME_PATTERN,
        description="Bar length: a positive integer and a unit s, m, h or d, e.g. `5m`, `1h`.",
    )
    open_time: StrictInt = Field(
        ge=0,
        lt=MAX_TIME_MS,
        description="Bar open time, milliseconds since the Unix epoch (UTC). A multiple of the timeframe.",
    )
    open: _Price = Field(description="First price of the bar (> 0).")
    high: _Price = Field(description="Highest price of the bar; >= max(open, close) and >= low.")
    low: _Price = Field(description="Lowest price of the bar; <= min(open, close).")
    close: _Price = Field(description="Last price of the bar (> 0).")
    volume: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = Field(
        description="Traded volume (or tick count) of the bar, finite and >= 0."
    )
    is_final: StrictBool = Field(
        description="True once the bar is closed; false for an in-progress update of the same bar."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CandleEvent:
        if self.high < max(self.open, self.close) or self.low > min(self.open, self.close):
            raise ValueError(
                f"inconsistent OHLC: open={self.open!r} high={self.high!r} "
                f"low={self.low!r} close={self.close!r}"
            )
        if self.high < self.low:
            raise ValueError(f"inconsistent OHLC: high={self.high!r} < low={self.low!r}")
        if self.open_time % parse_duration_ms(self.timeframe):
            raise ValueError(f"open_time={self.open_time} is not a multiple of timeframe {self.timeframe}")
        return self

    @property
    def timeframe_ms(self) -> int:
        """The timeframe in milliseconds."""
        return _timeframe_ms(self.timeframe)

    @property
    def close_time(self) -> int:
        """``open_time + timeframe``: when the bar closes (ms). The forecast's ``event_time``."""
        return self.open_time + _timeframe_ms(self.timeframe)


class CandleFields(NamedTuple):
    """A candle that passed every check of :func:`decode_candle_fields`, as plain values.

    Same fields and meaning as :class:`CandleEvent` (minus ``schema_version``, always 1 here);
    :meth:`to_event` gives the model.
    """

    symbol: str
    timeframe: str  # canonical, e.g. "1h"
    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    is_final: bool

    def to_event(self) -> CandleEvent:
        return _construct(schema_version=CANDLE_SCHEMA_VERSION, **self._asdict())


def encode_candle(candle: CandleEvent) -> bytes:
    """The msgpack bytes for ``candle``, keys in declared order."""
    return packb(
        {
            "schema_version": candle.schema_version,
            "symbol": candle.symbol,
            "timeframe": candle.timeframe,
            "open_time": candle.open_time,
            "open": float(candle.open),
            "high": float(candle.high),
            "low": float(candle.low),
            "close": float(candle.close),
            "volume": float(candle.volume),
            "is_final": candle.is_final,
        }
    )


@lru_cache(maxsize=64)
def _timeframe_ms(text: str) -> int:
    return parse_duration_ms(text)


@lru_cache(maxsize=64)
def _event_timeframe(text: str) -> tuple[int, str] | None:
    """``(ms, canonical text)`` for a well-formed timeframe string, else ``None``."""
    if _TIMEFRAME_RE.fullmatch(text) is None:
        return None
    ms = parse_duration_ms(text)
    return ms, format_duration(ms)


def _reject(reason: RejectReason, detail: str) -> NoReturn:
    raise CandleRejected(reason, detail)


_REQUIRED: Final = ("symbol", "timeframe", "open_time", "open", "high", "low", "close", "volume", "is_final")
_NUMBERS: Final = ("open", "high", "low", "close", "volume")
_PRICES: Final = ("open", "high", "low", "close")
_construct = CandleEvent.model_construct


def decode_candle(
    payload: bytes | bytearray | memoryview | None,
    *,
    timeframe: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    key: bytes | None = None,
) -> CandleEvent:
    """Decode and validate one ``candles`` record value into a :class:`CandleEvent`.

    The checks, their order and the errors are those of :func:`decode_candle_fields`.
    """
    return decode_candle_fields(payload, timeframe=timeframe, max_bytes=max_bytes, key=key).to_event()


def decode_candle_fields(
    payload: bytes | bytearray | memoryview | None,
    *,
    timeframe: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    key: bytes | None = None,
) -> CandleFields:
    """Decode and validate one ``candles`` record value.

    ``timeframe`` is the worker's timeframe (e.g. ``"5m"``); ``key`` the Kafka record key, if any.
    Raises :class:`~schemas.errors.CandleRejected` with the first failing check, in this order:
    size, msgpack decode (must be a map), version, fields/types, finiteness, volume sign, symbol,
    prices > 0, OHLC consistency, timeframe equality, ``open_time`` alignment, key.

    Integers are accepted for the five numbers and returned as ``float``; ``bool`` and ``str`` are
    not numbers. Unknown keys are ignored. The returned ``timeframe`` is canonical
    (``"60m"`` on a ``"1h"`` worker decodes to ``"1h"``). Raises ``ValueError`` if the *worker's*
    ``timeframe`` argument itself is not a duration.
    """
    worker_tf_ms = _timeframe_ms(timeframe)

    # 1. size
    if payload is None:
        _reject(RejectReason.UNDECODABLE, "record value is null (tombstone), expected a msgpack map")
    size = len(payload)
    if size > max_bytes:
        _reject(RejectReason.OVERSIZED, f"record value is {size} bytes, the limit is {max_bytes}")

    # 2. msgpack, a map
    try:
        obj: Any = unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        _reject(
            RejectReason.UNDECODABLE, f"not valid msgpack ({type(exc).__name__}: {short_repr(str(exc), 120)})"
        )
    if type(obj) is not dict:
        _reject(RejectReason.UNDECODABLE, f"top level is a msgpack {kind_of(obj)}, expected a map")

    # 3. version
    version = obj.get("schema_version", CANDLE_SCHEMA_VERSION)
    if type(version) is not int or version != CANDLE_SCHEMA_VERSION:
        _reject(
            RejectReason.UNSUPPORTED_VERSION,
            f"field 'schema_version' = {short_repr(version)}; this consumer reads version "
            f"{CANDLE_SCHEMA_VERSION} only",
        )

    # 4. fields and types
    for name in _REQUIRED:
        if name not in obj:
            _reject(RejectReason.SCHEMA, f"missing field {name!r}")
    symbol = obj["symbol"]
    if type(symbol) is not str:
        _reject(
            RejectReason.SCHEMA, f"field 'symbol' must be str, got {kind_of(symbol)} {short_repr(symbol)}"
        )
    tf_text = obj["timeframe"]
    if type(tf_text) is not str:
        _reject(
            RejectReason.SCHEMA,
            f"field 'timeframe' must be str, got {kind_of(tf_text)} {short_repr(tf_text)}",
        )
    event_tf = _event_timeframe(tf_text) if len(tf_text) <= 16 else None
    if event_tf is None:
        _reject(
            RejectReason.SCHEMA,
            f"field 'timeframe' = {short_repr(tf_text)} is not a timeframe like '5m', '1h', '1d'",
        )
    open_time = obj["open_time"]
    if type(open_time) is not int:
        _reject(
            RejectReason.SCHEMA,
            f"field 'open_time' must be int (ms since epoch), "
            f"got {kind_of(open_time)} {short_repr(open_time)}",
        )
    if not 0 <= open_time < MAX_TIME_MS:
        _reject(RejectReason.SCHEMA, f"field 'open_time' = {open_time} is outside [0, 2**63) ms")
    nums: dict[str, float] = {}
    for name in _NUMBERS:
        value = obj[name]
        kind = type(value)
        if kind is float:
            nums[name] = value
        elif kind is int:
            try:
                nums[name] = float(value)
            except OverflowError:  # pragma: no cover - msgpack ints are at most 64-bit
                _reject(RejectReason.SCHEMA, f"field {name!r} = {value} does not fit a float")
        else:
            _reject(
                RejectReason.SCHEMA,
                f"field {name!r} must be a number, got {kind_of(value)} {short_repr(value)}",
            )
    is_final = obj["is_final"]
    if type(is_final) is not bool:
        _reject(
            RejectReason.SCHEMA,
            f"field 'is_final' must be bool, got {kind_of(is_final)} {short_repr(is_final)}",
        )

    # 5. finiteness
    for name in _NUMBERS:
        if not math.isfinite(nums[name]):
            _reject(RejectReason.NON_FINITE, f"field {name!r} = {nums[name]!r} is not finite")
    volume = nums["volume"]
    if volume < 0:
        _reject(RejectReason.SCHEMA, f"field 'volume' = {volume!r} is negative")

    # 6. symbol
    if _SYMBOL_RE.fullmatch(symbol) is None:
        _reject(
            RejectReason.INVALID_SYMBOL,
            f"field 'symbol' = {short_repr(symbol)} does not match {SYMBOL_PATTERN}",
        )

    # 7. prices
    for name in _PRICES:
        if nums[name] <= 0:
            _reject(RejectReason.NON_POSITIVE_PRICE, f"field {name!r} = {nums[name]!r} is not > 0")

    # 8. OHLC
    o, h, lo, c = nums["open"], nums["high"], nums["low"], nums["close"]
    if h < lo:
        _reject(RejectReason.INCONSISTENT_OHLC, f"high = {h!r} is below low = {lo!r}")
    if h < (o if o > c else c):
        _reject(RejectReason.INCONSISTENT_OHLC, f"high = {h!r} is below max(open={o!r}, close={c!r})")
    if lo > (o if o < c else c):
        _reject(RejectReason.INCONSISTENT_OHLC, f"low = {lo!r} is above min(open={o!r}, close={c!r})")

    # 9. timeframe
    tf_ms, tf_canonical = event_tf
    if tf_ms != worker_tf_ms:
        _reject(
            RejectReason.TIMEFRAME_MISMATCH,
            f"field 'timeframe' = {tf_text!r}, this worker consumes {format_duration(worker_tf_ms)} bars",
        )

    # 10. alignment
    if open_time % tf_ms:
        _reject(
            RejectReason.MISALIGNED_OPEN_TIME,
            f"field 'open_time' = {open_time} is not a multiple of {tf_canonical} ({tf_ms} ms); "
            f"off by {open_time % tf_ms} ms",
        )

    # 11. key
    if key is not None and key != symbol.encode():
        _reject(RejectReason.KEY_MISMATCH, f"record key {short_repr(bytes(key))} != symbol {symbol!r}")

    return CandleFields(symbol, tf_canonical, open_time, o, h, lo, c, volume, is_final)
