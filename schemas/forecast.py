"""The output contract: one probabilistic forecast per final bar, on the ``forecasts`` topic
(Kafka key = UTF-8 symbol).

Returns are log returns from the origin bar's ``close`` to the close ``horizon_bars`` bars later;
price levels are ``close * exp(return)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from schemas.candle import MAX_TIME_MS, SYMBOL_PATTERN, TIMEFRAME_PATTERN
from schemas.codec import packb, unpackb
from schemas.errors import MessageDecodeError
from schemas.timeframe import parse_duration_ms

FORECAST_SCHEMA_VERSION: Final = 1
QUANTILE_KEYS: Final = ("q05", "q10", "q25", "q50", "q75", "q90", "q95")
QUANTILE_LEVELS: Final = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
# A forecast summarises at least this many sample paths (a std and quantiles need two).
MIN_SAMPLES: Final = 2

_Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
_Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
_TimeMs = Annotated[int, Strict(), Field(ge=0, lt=MAX_TIME_MS)]


def _quantile_map(value: dict[str, float]) -> dict[str, float]:
    keys = set(value)
    if keys != set(QUANTILE_KEYS):
        missing = sorted(set(QUANTILE_KEYS) - keys)
        extra = sorted(keys - set(QUANTILE_KEYS))
        raise ValueError(
            f"quantile keys must be exactly {list(QUANTILE_KEYS)}; missing {missing}, unexpected {extra}"
        )
    ordered = {k: value[k] for k in QUANTILE_KEYS}
    previous = None
    for k, v in ordered.items():
        if previous is not None and v < previous[1]:
            raise ValueError(f"quantiles must be non-decreasing: {k}={v!r} < {previous[0]}={previous[1]!r}")
        previous = (k, v)
    return ordered


def _quantile_schema(description: str, *, positive: bool) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "number"}
    if positive:
        number["exclusiveMinimum"] = 0
    return {
        "type": "object",
        "description": description,
        "properties": {
            k: {**number, "description": f"{int(q * 100)}% quantile"}
            for k, q in zip(QUANTILE_KEYS, QUANTILE_LEVELS, strict=True)
        },
        "required": list(QUANTILE_KEYS),
        "additionalProperties": False,
    }


ReturnQuantiles = Annotated[
    dict[StrictStr, _Finite],
    AfterValidator(_quantile_map),
    WithJsonSchema(
        _quantile_schema(
            "Quantiles of the log return, keys exactly q05..q95, values non-decreasing in key order.",
            positive=False,
        )
    ),
]
PriceQuantiles = Annotated[
    dict[StrictStr, _Positive],
    AfterValidator(_quantile_map),
    WithJsonSchema(
        _quantile_schema(
            "Quantiles of the price level close*exp(r), keys exactly q05..q95, non-decreasing.", positive=True
        )
    ),
]


class HorizonForecast(BaseModel):
    """The forecast distribution of the log return ``ln(close[t+h] / close[t])`` for one horizon."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", json_schema_serialization_defaults_required=True, title="HorizonForecast"
    )

    horizon_minutes: StrictInt = Field(ge=1, description="Horizon in minutes, e.g. 60.")
    horizon_bars: StrictInt = Field(
        ge=1, description="Horizon in bars of the stream: horizon_minutes * 60000 / timeframe_ms."
    )
    mean: _Finite = Field(description="Mean of the sampled log return.")
    std: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = Field(
        description="Standard deviation of the sampled log return (>= 0)."
    )
    quantiles: ReturnQuantiles
    p_up: Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)] = Field(
        description="Share of samples with a positive log return, in [0, 1]."
    )
    price_mean: _Positive = Field(description="Mean of the sampled price level close*exp(r).")
    price_quantiles: PriceQuantiles


class ForecastMessage(BaseModel):
    """One forecast for one symbol, made when the bar at ``open_time`` closed."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_serialization_defaults_required=True,
        title="ForecastMessage",
        json_schema_extra={
            "description": (
                "A probabilistic forecast on the `forecasts` topic, encoded as a msgpack map with string "
                "keys. Kafka key: the symbol as UTF-8. Returns are log returns from `close`; price levels "
                "are close*exp(r). All numbers are finite. Consumers must ignore unknown keys."
            )
        },
    )

    schema_version: Literal[1] = Field(default=1, description="Contract version (1).")
    symbol: StrictStr = Field(pattern=SYMBOL_PATTERN, description="Instrument, as in the candle.")
    timeframe: StrictStr = Field(
        pattern=TIMEFRAME_PATTERN, description="Bar length of the stream, e.g. `5m`."
    )
    open_time: _TimeMs = Field(description="Open time of the forecast-origin bar (ms since epoch, UTC).")
    event_time: _TimeMs = Field(description="Close time of the origin bar: open_time + timeframe (ms).")
    ingest_time: _TimeMs = Field(description="Kafka timestamp of the candle record that closed the bar (ms).")
    publish_time: _TimeMs = Field(description="Wall-clock time the worker published this forecast (ms).")
    latency_ms: _Finite = Field(
        description="publish_time - ingest_time in ms (may be slightly negative under clock skew)."
    )
    close: _Positive = Field(description="Close of the origin bar; the base of every return.")
    horizons: tuple[HorizonForecast, ...] = Field(
        min_length=1, description="One entry per horizon, ascending and unique by horizon_minutes."
    )
    model_version: StrictStr = Field(min_length=1, description="Checkpoint identifier of the model.")
    scheduler: StrictStr = Field(min_length=1, description="Diffusion sampler/scheduler name, e.g. `ddim`.")
    steps: StrictInt = Field(ge=1, description="Sampler steps.")
    nfe: StrictInt = Field(ge=1, description="Number of network function evaluations per sample.")
    samples: StrictInt = Field(ge=1, description="Number of Monte-Carlo sample paths.")
    seed: StrictInt = Field(ge=0, description="RNG seed used for the samples (reproducibility).")
    worker_id: StrictStr = Field(
        min_length=1, description="Identity of the worker instance that produced it."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ForecastMessage:
        tf_ms = parse_duration_ms(self.timeframe)
        if self.open_time % tf_ms:
            raise ValueError(f"open_time={self.open_time} is not a multiple of timeframe {self.timeframe}")
        if self.event_time != self.open_time + tf_ms:
            raise ValueError(
                f"event_time={self.event_time} must be open_time + timeframe = {self.open_time + tf_ms}"
            )
        previous = 0
        for h in self.horizons:
            if h.horizon_minutes <= previous:
                raise ValueError("horizons must be ascending and unique by horizon_minutes")
            previous = h.horizon_minutes
            if h.horizon_minutes * 60_000 != h.horizon_bars * tf_ms:
                raise ValueError(
                    f"horizon {h.horizon_minutes} min is not {h.horizon_bars} bars of {self.timeframe}"
                )
        return self

    def horizon(self, minutes: int) -> HorizonForecast:
        """The entry for ``minutes``; ``KeyError`` if absent."""
        for h in self.horizons:
            if h.horizon_minutes == minutes:
                return h
        raise KeyError(minutes)


def _horizon_map(h: HorizonForecast) -> dict[str, Any]:
    return {
        "horizon_minutes": h.horizon_minutes,
        "horizon_bars": h.horizon_bars,
        "mean": float(h.mean),
        "std": float(h.std),
        "quantiles": {k: float(h.quantiles[k]) for k in QUANTILE_KEYS},
        "p_up": float(h.p_up),
        "price_mean": float(h.price_mean),
        "price_quantiles": {k: float(h.price_quantiles[k]) for k in QUANTILE_KEYS},
    }


_MESSAGE_KEYS: Final = tuple(ForecastMessage.model_fields)
_HORIZON_KEYS: Final = tuple(HorizonForecast.model_fields)


def pack_forecast(fields: Mapping[str, Any]) -> bytes:
    """The msgpack bytes of a forecast given as plain values: every field of :class:`ForecastMessage`,
    ``horizons`` a sequence of maps with every field of :class:`HorizonForecast` and the two quantile
    maps in ``QUANTILE_KEYS`` order. Keys are written in declared order, as :func:`encode_forecast`
    writes them.

    Nothing is validated here. It is for a producer that has checked its values already (the
    worker's hot path, where a pydantic model per forecast would cost more than everything else);
    anyone else builds a :class:`ForecastMessage` and calls :func:`encode_forecast`.
    """
    wire = fields if tuple(fields) == _MESSAGE_KEYS else {k: fields[k] for k in _MESSAGE_KEYS}
    horizons = fields["horizons"]
    if any(tuple(h) != _HORIZON_KEYS for h in horizons):
        wire = {**wire, "horizons": [{k: h[k] for k in _HORIZON_KEYS} for h in horizons]}
    return packb(wire)


def encode_forecast(message: ForecastMessage) -> bytes:
    """The msgpack bytes for ``message``, keys in declared order (deterministic)."""
    m = message
    return pack_forecast(
        {
            "schema_version": m.schema_version,
            "symbol": m.symbol,
            "timeframe": m.timeframe,
            "open_time": m.open_time,
            "event_time": m.event_time,
            "ingest_time": m.ingest_time,
            "publish_time": m.publish_time,
            "latency_ms": float(m.latency_ms),
            "close": float(m.close),
            "horizons": [_horizon_map(h) for h in m.horizons],
            "model_version": m.model_version,
            "scheduler": m.scheduler,
            "steps": m.steps,
            "nfe": m.nfe,
            "samples": m.samples,
            "seed": m.seed,
            "worker_id": m.worker_id,
        }
    )


def decode_forecast(payload: bytes | bytearray | memoryview) -> ForecastMessage:
    """Decode and fully validate a ``forecasts`` record value.

    Strict: ints are not accepted for int-only fields when sent as floats, bools and strings are not
    numbers, every invariant of the models holds. Unknown keys are ignored. Raises
    :class:`~schemas.errors.MessageDecodeError`.
    """
    try:
        obj = unpackb(payload)
    except Exception as exc:
        raise MessageDecodeError(f"forecast is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageDecodeError(f"forecast top level is {type(obj).__name__}, expected a map")
    version = obj.get("schema_version")
    if type(version) is not int or version != FORECAST_SCHEMA_VERSION:
        raise MessageDecodeError(f"unsupported forecast schema_version {version!r}")
    if not isinstance(obj.get("horizons"), list):
        raise MessageDecodeError("forecast field 'horizons' must be an array")
    try:
        return ForecastMessage.model_validate(obj)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid forecast: {exc}") from exc
