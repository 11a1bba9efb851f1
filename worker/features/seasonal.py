"""Intraday seasonality on the market's clock, and the seasonal volatility forecast built from it.

FX volatility follows the trading sessions, and the sessions follow local clocks: in UTC, New York
opens an hour earlier in summer than in winter (New York's DST ended 2023-11-05, London's
2023-10-29). Everything here therefore runs on the **New York clock** (``America/New_York`` via
zoneinfo), with the FX trading day starting at 17:00 New York time (the daily roll and the Sunday
open). A slot is a bar position in that trading day (288 slots at 5 minutes).

The *profile* is the mean absolute one-bar log return per slot (Andersen–Bollerslev), estimated on
training data pooled over pairs (each pair divided by its own mean first, so no pair dominates),
lightly smoothed around the day, scaled to a root-mean-square of 1, and multiplied by a week-open
factor during the first hour after the Sunday open (thin, wide-spread quotes).

One clock cannot hold every session: Tokyo keeps UTC+9 all year, so on the New York clock its
session starts at 20:00 in New York's summer and at 19:00 in its winter. A profile learned across
both seasons smears the Asian hours (on the 2023 training data the New York 19:00 hour is 0.49 of
the day's mean in summer and 0.79 in winter). A profile may therefore carry one set of slots per
New York UTC offset (summer time, winter time), each fitted on the bars of its season; a bar uses
the set of its own offset, and the pooled slots where none was fitted. Returns divided by
the profile are *deseasonalised*; an EWMA of their square is the deseasonalised variance, and the
variance of bar ``t + k`` forecast at ``t`` is ``ewma_t * profile(t + k)^2``.

Bars that follow a gap (the weekend, a holiday close, an outage) carry the whole gap in their
close-to-close return. The volatility estimate uses their open-to-close return instead, so one
Sunday-open jump does not inflate the next hours; the gap itself is a separate model input.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo

import numpy as np

from worker.features.candles import CandleSeries

MARKET_TZ = ZoneInfo("America/New_York")
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TRADING_DAY_START_H = 17  # the FX day rolls at 17:00 New York time
WEEK_OPEN_MS = HOUR_MS  # the week-open factor covers the first hour after the Sunday open
_SMOOTH = np.array([1.0, 2.0, 1.0]) / 4.0  # light circular smoothing of the per-slot means
_FLOOR = 1e-6


@functools.lru_cache(maxsize=65_536)
def _offset_ms(hour: int) -> int:
    """New York's UTC offset (ms) during the UTC hour ``hour`` (DST changes on whole UTC hours)."""
    stamp = dt.datetime.fromtimestamp(hour * 3600, tz=dt.UTC).astimezone(MARKET_TZ)
    offset = stamp.utcoffset()
    assert offset is not None
    return int(offset.total_seconds() * 1000)


def market_time_ms(open_time: np.ndarray) -> np.ndarray:
    """Milliseconds on the New York wall clock, shifted so 0 is a 17:00 trading-day start."""
    t = np.asarray(open_time, dtype=np.int64)
    hours = t // HOUR_MS
    uniq, inv = np.unique(hours, return_inverse=True)
    offsets = np.array([_offset_ms(int(h)) for h in uniq], dtype=np.int64)[inv.reshape(-1)]
    return t + offsets - TRADING_DAY_START_H * HOUR_MS


@dataclass(frozen=True)
class MarketClock:
    """Per bar: position in the trading day, trading weekday (0 = the day that opens Sunday 17:00,
    i.e. Monday's session), and whether it falls in the first hour of the trading week."""

    day_fraction: np.ndarray  # float64 in [0, 1)
    slot: np.ndarray  # int64 in [0, slots_per_day)
    weekday: np.ndarray  # int64 0..6 (0 = Monday's session)
    week_open: np.ndarray  # bool
    utc_offset_min: np.ndarray  # int64: New York's UTC offset in minutes (-240 summer, -300 winter)


def _session_weekday(market_ms: np.ndarray) -> np.ndarray:
    """Trading weekday (0 = Monday's session) of times on :func:`market_time_ms`'s clock."""
    # 1970-01-01 was a Thursday; the shifted clock makes a session start at 0, so session day d
    # is the session of calendar day d + 1 (17:00 Sunday starts Monday's session).
    out: np.ndarray = ((market_ms // DAY_MS) + 4) % 7
    return out


def market_clock(open_time: np.ndarray, timeframe_ms: int) -> MarketClock:
    m = market_time_ms(open_time)
    offset_ms = m - np.asarray(open_time, dtype=np.int64) + TRADING_DAY_START_H * HOUR_MS
    in_day = m % DAY_MS
    weekday = _session_weekday(m)
    return MarketClock(
        day_fraction=in_day / DAY_MS,
        slot=(in_day // timeframe_ms).astype(np.int64),
        weekday=weekday.astype(np.int64),
        week_open=(weekday == 0) & (in_day < WEEK_OPEN_MS),
        utc_offset_min=offset_ms // 60_000,
    )


# Trading weekdays of :class:`MarketClock` with no FX trading: Friday 17:00 -> Sunday 17:00 New York.
CLOSED_WEEKDAYS = (5, 6)


def market_closed(open_time: np.ndarray) -> np.ndarray:
    """True for a time inside the FX weekend closure, Friday 17:00 -> Sunday 17:00 New York (so 48 h
    of UTC, 49 h on the weekend New York falls back, 47 h when it springs forward). Holiday closes
    (Christmas, New Year) are not in it."""
    out: np.ndarray = _session_weekday(market_time_ms(open_time)) >= CLOSED_WEEKDAYS[0]
    return out


def bars_before_close(origin_time: np.ndarray, timeframe_ms: int, horizon: int) -> np.ndarray:
    """Per origin bar: how many of the next ``horizon`` bars (``origin + k * timeframe``, k = 1 ...)
    open before the market closes for the weekend; ``horizon`` when none falls in the closure.
    A horizon of h bars is a forecast of the trading week the origin is in only if h <= this."""
    origin = np.asarray(origin_time, dtype=np.int64).reshape(-1)
    future = origin[:, None] + timeframe_ms * np.arange(1, horizon + 1, dtype=np.int64)[None, :]
    closed = market_closed(future.ravel()).reshape(future.shape)
    out: np.ndarray = np.where(closed.any(axis=1), closed.argmax(axis=1), horizon).astype(np.int64)
    return out


def market_hour(open_time: np.ndarray) -> np.ndarray:
    """The New York wall-clock hour (0..23) of each bar."""
    out: np.ndarray = (market_time_ms(open_time) % DAY_MS // HOUR_MS + TRADING_DAY_START_H) % 24
    return out


def market_time_features(open_time: np.ndarray, timeframe_ms: int) -> np.ndarray:
    """Time of the trading day and trading weekday on the unit circle, New York clock, (n, 4)."""
    clock = market_clock(open_time, timeframe_ms)
    tod = 2 * np.pi * clock.day_fraction
    dow = 2 * np.pi * (clock.weekday + clock.day_fraction) / 7
    return np.stack([np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)], axis=1).astype(np.float32)


def adjacent(open_time: np.ndarray, timeframe_ms: int) -> np.ndarray:
    """True where a bar directly follows the previous one (False for the first and after any gap)."""
    out = np.zeros(len(open_time), dtype=bool)
    out[1:] = np.diff(open_time) == timeframe_ms
    return out


def vol_returns(series: CandleSeries, timeframe_ms: int) -> np.ndarray:
    """One-bar log returns for volatility estimation: close-to-close where the bar follows its
    predecessor directly, open-to-close after a gap (the gap is not one bar's volatility). NaN for
    the first bar."""
    c = series.close
    o = series.ohlcv[:, 0]
    r = np.full(len(c), np.nan)
    r[1:] = np.log(c[1:] / c[:-1])
    gap = ~adjacent(series.open_time, timeframe_ms)
    gap[0] = False
    r[gap] = np.log(c[gap] / o[gap])
    return r


@dataclass(frozen=True)
class SeasonalProfile:
    """Per-slot volatility multipliers (RMS 1) and the week-open factor; stored in the checkpoint.
    ``by_offset``: optional per-season slots, ``(New York UTC offset in minutes, slots)`` pairs."""

    timeframe_ms: int
    slots: tuple[float, ...]
    week_open_factor: float
    by_offset: tuple[tuple[int, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        n = DAY_MS // self.timeframe_ms
        for name, values in (("slots", self.slots), *((f"slots at UTC{m:+d}min", v) for m, v in self.by_offset)):
            if len(values) != n:
                raise ValueError(f"profile {name} needs {n} values, got {len(values)}")
            if not all(np.isfinite(values)) or min(values) <= 0:
                raise ValueError(f"profile {name}: values must be finite and positive")
        if not self.week_open_factor > 0:
            raise ValueError("profile week_open_factor must be positive")
        if len({m for m, _ in self.by_offset}) != len(self.by_offset):
            raise ValueError("profile by_offset names an offset twice")

    def scale(self, open_time: np.ndarray) -> np.ndarray:
        """The seasonal multiplier of each bar (n,)."""
        return self.scale_of(market_clock(open_time, self.timeframe_ms))

    def scale_of(self, clock: MarketClock) -> np.ndarray:
        """:meth:`scale` of bars whose market clock is already computed."""
        s = np.asarray(self.slots)[clock.slot]
        for minutes, slots in self.by_offset:
            here = clock.utc_offset_min == minutes
            s[here] = np.asarray(slots)[clock.slot[here]]
        return np.where(clock.week_open, s * self.week_open_factor, s)

    def pooled(self) -> SeasonalProfile:
        """The same profile on one clock (the pooled slots for every season): the classic
        Andersen–Bollerslev profile that the seasonal-EWMA baseline uses whatever the model's."""
        return SeasonalProfile(self.timeframe_ms, self.slots, self.week_open_factor)

    @classmethod
    def flat(cls, timeframe_ms: int) -> SeasonalProfile:
        return cls(timeframe_ms, tuple([1.0] * int(DAY_MS // timeframe_ms)), 1.0)


# A season gets its own slots only with this many bars per slot on average (pooled over pairs;
# 2023's winter part of the training data has about 40 per slot per pair): fewer, and its profile
# would be noise, so it keeps the pooled one.
MIN_BARS_PER_SLOT = 50


def _smoothed_slots(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    # Slots never traded (e.g. a weekend-only slot of a coarse timeframe) take the quietest level.
    mean = np.where(np.isfinite(mean), mean, np.nanmin(mean))
    padded = np.concatenate([mean[-1:], mean, mean[:1]])
    smooth = np.maximum(np.convolve(padded, _SMOOTH, mode="valid"), _FLOOR)
    out: np.ndarray = smooth / np.sqrt(np.mean(smooth**2))
    return out


def fit_profile(series: Iterable[CandleSeries], timeframe_ms: int, *, by_offset: bool = False) -> SeasonalProfile:
    """Estimate the profile from training series (bars after a gap are left out: their return
    spans more than one bar). ``by_offset``: also one set of slots per New York UTC offset that
    the data covers well enough (:data:`MIN_BARS_PER_SLOT`)."""
    n_slots = int(DAY_MS // timeframe_ms)
    pooled: list[tuple[np.ndarray, MarketClock]] = []
    for s in series:
        r = np.abs(np.log(s.close[1:] / s.close[:-1]))
        keep = adjacent(s.open_time, timeframe_ms)[1:]
        r, t = r[keep], s.open_time[1:][keep]
        if len(r) == 0:
            continue
        pooled.append((r / r.mean(), market_clock(t, timeframe_ms)))  # scale-free: each pair by its shape

    def slots_of(offset_min: int | None) -> tuple[np.ndarray, int]:
        """Smoothed slots of every bar (None) or of the bars at one New York UTC offset."""
        sums, counts = np.zeros(n_slots), np.zeros(n_slots)
        for r, clock in pooled:
            m = ~clock.week_open if offset_min is None else ~clock.week_open & (clock.utc_offset_min == offset_min)
            np.add.at(sums, clock.slot[m], r[m])
            np.add.at(counts, clock.slot[m], 1)
        return (_smoothed_slots(sums, counts) if counts.any() else np.ones(n_slots)), int(counts.sum())

    everything, n_bars = slots_of(None)
    if not n_bars:
        raise ValueError("no adjacent bars to estimate a profile from")
    seasons: list[tuple[int, tuple[float, ...]]] = []
    if by_offset:
        offsets = np.unique(np.concatenate([c.utc_offset_min for _, c in pooled]))
        for minutes in (int(m) for m in offsets):
            season, n = slots_of(minutes)
            if n >= MIN_BARS_PER_SLOT * n_slots:
                seasons.append((minutes, tuple(float(v) for v in season)))
    profile = SeasonalProfile(timeframe_ms, tuple(float(v) for v in everything), 1.0, tuple(seasons))
    week_sum = week_n = rest_sum = rest_n = 0.0
    for r, clock in pooled:
        z = r / profile.scale_of(clock)
        week_sum, week_n = week_sum + float(z[clock.week_open].sum()), week_n + int(clock.week_open.sum())
        rest_sum, rest_n = rest_sum + float(z[~clock.week_open].sum()), rest_n + int((~clock.week_open).sum())
    factor = (week_sum / week_n) / (rest_sum / rest_n) if week_n and rest_n else 1.0
    return replace(profile, week_open_factor=float(factor))


def finite_ewma(x: np.ndarray, lookback: int, lam: float) -> np.ndarray:
    """Finite-memory EWMA: value t averages x[t-lookback+1 .. t] only (weights sum to 1); NaN
    before that and wherever the window holds a NaN."""
    n = len(x)
    out = np.full(n, np.nan)
    if n < lookback:
        return out
    weights = lam ** np.arange(lookback)[::-1]
    weights /= weights.sum()
    win = np.lib.stride_tricks.sliding_window_view(x, lookback)
    out[lookback - 1 :] = win @ weights
    return out


VOL_ESTIMATORS = ("returns", "range")
_PARKINSON = 1.0 / (4.0 * np.log(2.0))


def range_variance(series: CandleSeries) -> np.ndarray:
    """Parkinson's one-bar variance estimate ``ln(high / low)^2 / (4 ln 2)``: about five times as
    efficient as a squared return for a random walk, because a bar's range sees its whole path."""
    h, low = series.ohlcv[:, 1], series.ohlcv[:, 2]
    return _PARKINSON * np.log(h / low) ** 2


def fit_range_bias(series: Iterable[CandleSeries], profile: SeasonalProfile) -> float:
    """E[u^2] / E[Parkinson / s^2] on training data, the mean of the per-series ratios (scale-free).
    A bar's range built from discrete quotes misses part of the path (and quotes are not traded
    prices), so Parkinson's estimate runs low; this factor makes it a variance in return units."""
    ratios = []
    for s in series:
        keep = adjacent(s.open_time, profile.timeframe_ms)
        if keep.sum() < 2:
            continue
        scale2 = profile.scale(s.open_time) ** 2
        u2 = (vol_returns(s, profile.timeframe_ms) ** 2 / scale2)[keep]
        pk = (range_variance(s) / scale2)[keep]
        if pk.mean() > 0:
            ratios.append(float(u2.mean() / pk.mean()))
    if not ratios:
        raise ValueError("no adjacent bars with a range to fit the range bias on")
    return float(np.mean(ratios))


def deseasonalised_range(series: CandleSeries, scale: np.ndarray, range_bias: float) -> np.ndarray:
    """Per bar ``range_bias * Parkinson_t / s_t^2`` for the seasonal multipliers ``scale`` (NaN at the
    first bar, as with returns: it has no predecessor to scale against)."""
    x: np.ndarray = range_bias * range_variance(series) / scale**2
    x[0] = np.nan
    return x


def deseasonalised_variance(series: CandleSeries, profile: SeasonalProfile, lookback: int,
                            lam: float, *, estimator: str = "returns",
                            range_bias: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per bar: the seasonal multiplier ``s_t`` and the EWMA variance of the deseasonalised bars
    ``t - lookback + 1 .. t`` (NaN without enough history): of ``(r_t / s_t)^2`` (``returns``, the
    Andersen–Bollerslev baseline), or of ``range_bias * Parkinson_t / s_t^2`` (``range``)."""
    s = profile.scale(series.open_time)
    if estimator == "returns":
        x = (vol_returns(series, profile.timeframe_ms) / s) ** 2
    elif estimator == "range":
        x = deseasonalised_range(series, s, range_bias)
    else:
        raise ValueError(f"unknown volatility estimator {estimator!r}; choose one of {list(VOL_ESTIMATORS)}")
    var = finite_ewma(x, lookback, lam)
    return s, np.maximum(var, _FLOOR**2)
