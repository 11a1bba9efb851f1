"""Per-symbol rolling candle windows in Redis (see ``docs/state.md``).

Layout, per symbol, both keys in one hash slot so a script may touch them together on a cluster:

* ``{prefix}:{SYMBOL}:w`` sorted set; score = bar open time (ms), member = msgpack of
  ``[open_time, open, high, low, close, volume]`` (int, then five float64). One member per open time.
* ``{prefix}:{SYMBOL}:m`` string; open time of the newest bar whose forecast was published.

Every write goes through a Lua script, so a symbol's window and watermark change atomically, and a
batch of symbols costs one round trip (a non-transactional pipeline of EVALSHA calls).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
from numpy.typing import NDArray
from redis import exceptions as rexc
from redis.asyncio import Redis

from worker.errors import StateUnavailable

__all__ = ["Bar", "CandleRow", "WindowSnapshot", "WindowStore"]


# --------------------------------------------------------------------------- structs


@dataclass(frozen=True, slots=True)
class CandleRow:
    """One OHLCV bar of one symbol; ``open_time`` is epoch milliseconds."""

    symbol: str
    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float


class Bar(Protocol):
    """What a window stores of a bar: :class:`CandleRow`, or a decoded candle as it is."""

    @property
    def symbol(self) -> str: ...
    @property
    def open_time(self) -> int: ...
    @property
    def open(self) -> float: ...
    @property
    def high(self) -> float: ...
    @property
    def low(self) -> float: ...
    @property
    def close(self) -> float: ...
    @property
    def volume(self) -> float: ...


@dataclass(frozen=True, slots=True, eq=False)
class WindowSnapshot:
    """A symbol's window as Redis held it right after a write (or read), oldest bar first.

    ``times`` and ``values`` are read-only arrays; ``values`` columns are open, high, low, close,
    volume.
    """

    symbol: str
    times: NDArray[np.int64]
    values: NDArray[np.float64]
    watermark: int | None

    def open_times(self) -> NDArray[np.int64]:
        """Open times (ms), shape ``(n,)``, strictly increasing."""
        return self.times

    def ohlcv(self) -> NDArray[np.float64]:
        """Bars, shape ``(n, 5)``: open, high, low, close, volume."""
        return self.values

    @property
    def newest_open_time(self) -> int | None:
        return int(self.times[-1]) if len(self.times) else None

    def candles(self) -> tuple[CandleRow, ...]:
        return tuple(
            CandleRow(self.symbol, int(t), *map(float, row)) for t, row in zip(self.times, self.values, strict=True)
        )

    def __len__(self) -> int:
        return len(self.times)


# --------------------------------------------------------------------------- scripts

# KEYS: window, watermark. ARGV: length, ttl_s, then open_time/member pairs.
# A full window admits a new bar by ZADD then ZPOPMIN, which drops the oldest (the new bar itself
# when it is older than everything held). The set so exceeds `length` by one for a moment; the
# encoding Redis picks (listpack up to zset-max-listpack-entries, then skiplist for good) can
# therefore differ only when `length` equals that limit, and even then a replay of the same events
# takes that path only if the first pass already did, so DUMP stays byte-identical (tested).
# Rewriting an identical member is skipped: replays then cost one read per bar and send no writes
# to replicas.
_APPLY_LUA = """
local window, mark = KEYS[1], KEYS[2]
local length = tonumber(ARGV[1])
local n = redis.call('ZCARD', window)
for i = 3, #ARGV, 2 do
  local t, member = ARGV[i], ARGV[i + 1]
  local current = redis.call('ZRANGEBYSCORE', window, t, t)
  if #current == 0 then
    redis.call('ZADD', window, t, member)
    if n < length then
      n = n + 1
    else
      redis.call('ZPOPMIN', window)
    end
  elseif #current ~= 1 or current[1] ~= member then
    redis.call('ZREMRANGEBYSCORE', window, t, t)
    redis.call('ZADD', window, t, member)
    n = n - #current + 1
  end
end
if n > length then
  redis.call('ZREMRANGEBYRANK', window, 0, n - length - 1)
end
redis.call('EXPIRE', window, ARGV[2])
redis.call('EXPIRE', mark, ARGV[2])
return {table.concat(redis.call('ZRANGE', window, 0, -1)), redis.call('GET', mark)}
"""

# KEYS: watermark, window. ARGV: open_time, ttl_s. Returns the watermark now stored.
_MARK_LUA = """
local current = redis.call('GET', KEYS[1])
local result = ARGV[1]
if current and tonumber(current) >= tonumber(ARGV[1]) then
  result = current
  redis.call('EXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return result
"""

# KEYS: window, watermark.
_READ_LUA = """
return {table.concat(redis.call('ZRANGE', KEYS[1], 0, -1)), redis.call('GET', KEYS[2])}
"""


@dataclass(frozen=True, slots=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


_APPLY = _Script.of(_APPLY_LUA)
_MARK = _Script.of(_MARK_LUA)
_READ = _Script.of(_READ_LUA)
_SCRIPTS = (_APPLY, _MARK, _READ)

_Call = tuple[_Script, tuple[str, ...], Sequence[int | bytes]]


# --------------------------------------------------------------------------- member codec

# msgpack of [uint64, f64 x5] is 55 bytes with type tags at fixed offsets: fixarray(6), uint64,
# then five float64. Every open time after 1970-02-19 (>= 2**32 ms) packs that way, so a whole
# window decodes with a few numpy ops instead of a msgpack call per bar.
_RECORD_BYTES = 55
_TAG_AT = np.array([0, 1, 10, 19, 28, 37, 46])
_TAGS = np.array([0x96, 0xCF, 0xCB, 0xCB, 0xCB, 0xCB, 0xCB], dtype=np.uint8)
_VALUE_BYTES = np.array([at + 1 + k for at in (10, 19, 28, 37, 46) for k in range(8)])


def _decode_window(blob: bytes) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    n, rest = divmod(len(blob), _RECORD_BYTES)
    if rest == 0:
        raw = np.frombuffer(blob, dtype=np.uint8).reshape(n, _RECORD_BYTES)
        # Checking every record's tags in order proves each one is exactly 55 bytes long.
        if (raw[:, _TAG_AT] == _TAGS).all():
            times = np.ascontiguousarray(raw[:, 2:10]).view(">u8").reshape(n).astype(np.int64)
            values = np.ascontiguousarray(raw[:, _VALUE_BYTES]).view(">f8").astype(np.float64)
            return times, values.reshape(n, 5)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    rows = list(unpacker)
    times = np.array([r[0] for r in rows], dtype=np.int64)
    values = np.array([r[1:] for r in rows], dtype=np.float64).reshape(len(rows), 5)
    return times, values


def _snapshot(symbol: str, reply: Sequence[Any]) -> WindowSnapshot:
    blob, mark = reply
    times, values = _decode_window(blob)
    times.flags.writeable = False
    values.flags.writeable = False
    return WindowSnapshot(symbol, times, values, None if mark is None else int(mark))


# --------------------------------------------------------------------------- errors

# Replies that mean "the server cannot serve this right now" rather than "the request is wrong".
_UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "OOM")
_UNAVAILABLE_TYPES = (
    rexc.ConnectionError,  # includes BusyLoadingError, AuthenticationError, MaxConnectionsError
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    rexc.OutOfMemoryError,
    TimeoutError,
    OSError,
)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


# --------------------------------------------------------------------------- store


class WindowStore:
    """Rolling windows of the newest ``length`` bars per symbol, expiring ``ttl_s`` after the last write.

    Every method makes one round trip (plus one ``SCRIPT LOAD`` after the server lost its script
    cache, e.g. on restart or failover) and raises :class:`StateUnavailable` when Redis cannot
    answer. All writes are idempotent, so retrying a failed call is always safe.
    """

    def __init__(self, redis: Redis, *, prefix: str, length: int, ttl_s: int) -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self._redis = redis
        self._prefix = prefix
        self.length = length
        self.ttl_s = ttl_s

    def window_key(self, symbol: str) -> str:
        return f"{self._prefix}:{{{symbol}}}:w"

    def watermark_key(self, symbol: str) -> str:
        return f"{self._prefix}:{{{symbol}}}:m"

    async def apply(self, batch: Sequence[Bar]) -> dict[str, WindowSnapshot]:
        """Upsert every bar, trim, refresh the TTLs; return each touched symbol's whole window.

        A bar with an open time already in the window replaces it (a correction); within the
        batch the last bar for an open time wins. Bars older than a full window's oldest are
        dropped. The result does not depend on how a stream is cut into batches or replayed.
        """
        if not batch:
            return {}
        pack = msgpack.packb
        by_symbol: dict[str, dict[int, bytes]] = {}
        for row in batch:
            t = int(row.open_time)
            member = pack((t, float(row.open), float(row.high), float(row.low), float(row.close), float(row.volume)))
            bars = by_symbol.get(row.symbol)
            if bars is None:
                bars = by_symbol[row.symbol] = {}
            bars[t] = member
        calls: list[_Call] = []
        for symbol, bars in by_symbol.items():
            args: list[int | bytes] = [self.length, self.ttl_s]
            for t, member in bars.items():
                args += (t, member)
            calls.append((_APPLY, (self.window_key(symbol), self.watermark_key(symbol)), args))
        replies = await self._run(calls)
        return {symbol: _snapshot(symbol, reply) for symbol, reply in zip(by_symbol, replies, strict=True)}

    async def mark_forecast(self, marks: Mapping[str, int]) -> dict[str, int]:
        """Raise each symbol's watermark to ``max(stored, given)``; refresh both keys' TTL.

        Returns the watermarks now stored (which may be newer than the ones given).
        """
        if not marks:
            return {}
        calls: list[_Call] = [
            (_MARK, (self.watermark_key(symbol), self.window_key(symbol)), (int(t), self.ttl_s))
            for symbol, t in marks.items()
        ]
        replies = await self._run(calls)
        return {symbol: int(reply) for symbol, reply in zip(marks, replies, strict=True)}

    async def read(self, symbol: str) -> WindowSnapshot:
        """The symbol's window and watermark, without touching the TTL. Empty if none is stored."""
        (reply,) = await self._run([(_READ, (self.window_key(symbol), self.watermark_key(symbol)), ())])
        return _snapshot(symbol, reply)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:
            if _is_unavailable(exc):
                raise StateUnavailable(f"redis ping failed: {exc}") from exc
            raise

    async def load_scripts(self) -> None:
        """Load the Lua scripts now, so the first ``apply`` makes exactly one round trip."""
        await self._load(_SCRIPTS)

    async def _load(self, scripts: Sequence[_Script]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for script in scripts:
            pipe.script_load(script.source)
        try:
            shas = await pipe.execute()
        except Exception as exc:
            if _is_unavailable(exc):
                raise StateUnavailable(f"redis SCRIPT LOAD failed: {exc}") from exc
            raise
        for script, sha in zip(scripts, shas, strict=True):
            if sha != script.sha:
                raise RuntimeError(f"redis returned sha {sha!r} for a script whose sha1 is {script.sha}")

    async def _run(self, calls: Sequence[_Call]) -> list[Any]:
        # EVALSHA is sent optimistically; NOSCRIPT (script cache lost) means load and resend the
        # whole pipeline, which is safe because every script is idempotent. redis-py's Script
        # objects are not used: in a pipeline they cost an extra SCRIPT EXISTS round trip per call.
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                if _is_unavailable(exc):
                    raise StateUnavailable(f"redis unavailable: {exc}") from exc
                raise
            if attempt == 1 or not any(isinstance(reply, rexc.NoScriptError) for reply in replies):
                break
            # The server lost its script cache; reload all scripts so the next calls of the
            # other kinds do not each pay this detour too.
            await self._load(_SCRIPTS)
        for reply in replies:
            if isinstance(reply, Exception):
                if _is_unavailable(reply):
                    raise StateUnavailable(f"redis refused the write: {reply}") from reply
                raise reply
        return list(replies)
