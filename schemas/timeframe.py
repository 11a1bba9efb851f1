"""Durations and timeframes as the contracts spell them: ``"5m"``, ``"1h"``, ``"4h"``, ``"1d"``.

Kept in ``schemas`` (not ``worker``) because the candle contract itself depends on it:
``open_time`` must be a multiple of the timeframe.
"""

from __future__ import annotations

import re

_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def parse_duration_ms(text: str) -> int:
    """``"15m"`` -> 900000. Raises ``ValueError`` naming the bad text."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (expected e.g. '5m', '1h', '4h', '1d')")
    value = int(match.group(1)) * _UNITS_MS[match.group(2)]
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value


def format_duration(ms: int) -> str:
    """Inverse of :func:`parse_duration_ms` using the largest whole unit."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def horizon_bars(horizon_ms: int, timeframe_ms: int) -> int:
    """A horizon in bars of the stream. Fails clearly when it is under one bar or not whole."""
    if horizon_ms < timeframe_ms:
        raise ValueError(
            f"horizon {format_duration(horizon_ms)} is shorter than one {format_duration(timeframe_ms)} bar"
        )
    if horizon_ms % timeframe_ms:
        raise ValueError(
            f"horizon {format_duration(horizon_ms)} is not a whole number of "
            f"{format_duration(timeframe_ms)} bars"
        )
    return horizon_ms // timeframe_ms


def parse_horizons(text: str) -> list[int]:
    """``"15m,1h,4h"`` or minutes ``"60,240"`` -> sorted unique horizons in ms."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            if int(part) == 0:
                raise ValueError(f"horizon must be positive: {part!r}")
            out.add(int(part) * 60_000)
        else:
            out.add(parse_duration_ms(part))
    if not out:
        raise ValueError(f"no horizons in {text!r}")
    return sorted(out)
