"""Per-symbol rolling candle windows in Redis (see ``docs/state.md``).

Layout (:class:`~worker.state.keys.KeyLayout`), per symbol and deployment namespace, both keys in one
hash slot so a script may touch them together on a cluster:

* ``{prefix}:{namespace}:{SYMBOL}:w`` sorted set; score = bar open time (ms), member = msgpack of
  ``[open_time, open, high, low, close, volume]`` (int, then five float64). One member per open time.
* ``{prefix}:{namespace}:{SYMBOL}:m`` string; open time of the newest bar whose forecast was published.
* ``{prefix}:{namespace}:epoch`` string, no TTL: written once; its absence means Redis lost the
  namespace's state (see :meth:`WindowStore.claim_epoch`).

Every write goes through a Lua script, so a symbol's window and watermark change atomically, and a
batch of symbols costs one round trip (a non-transactional pipeline of EVALSHA calls). Each symbol's
reply is classified on its own (:mod:`worker.state.classify`): a symbol whose keys hold data the
worker cannot use is reported in ``quarantined`` and the rest of the batch is served.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgpack
import numpy as np
from numpy.typing import NDArray
from redis import exceptions as rexc
from redis.asyncio import Redis

from worker.errors import StateMisconfigured, SymbolStateCorrupt
from worker.settings import Settings
from worker.state.classify import decode_error, reply_error, state_error
from worker.state.keys import KeyLayout, deployment_namespace

__all__ = [
    "ApplyResult",
    "Bar",
    "BatchResult",
    "CandleRow",
    "EpochClaim",
    "MarkResult",
    "SymbolState",
    "WindowSnapshot",
    "WindowStore",
]

V = TypeVar("V")


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


@dataclass(frozen=True, slots=True, eq=False)
class BatchResult(Mapping[str, V], Generic[V]):
    """What a batch call returns: a read-only mapping of the healthy symbols' results (as before
    quarantine existed), plus ``quarantined``: symbol -> why its stored state is unusable.

    A quarantined symbol's keys were left as they were (its script wrote nothing, or its window
    could not be decoded after the write); every other symbol of the batch was applied normally.
    """

    healthy: Mapping[str, V]
    quarantined: Mapping[str, SymbolStateCorrupt] = field(default_factory=dict)
    # apply() of a non-empty batch only: the namespace's epoch marker as Redis held it just before
    # this batch was written (None: no marker; also None for an empty batch, which sends nothing).
    # A worker that claimed another token knows Redis lost its state, even when the restart was too
    # quick to surface as an error (see WindowStore.claim_epoch).
    epoch: str | None = None

    def __getitem__(self, symbol: str) -> V:
        return self.healthy[symbol]

    def __iter__(self) -> Iterator[str]:
        return iter(self.healthy)

    def __len__(self) -> int:
        return len(self.healthy)

    def __repr__(self) -> str:
        return f"BatchResult({dict(self.healthy)!r}, quarantined={sorted(self.quarantined)!r})"


ApplyResult = BatchResult[WindowSnapshot]
MarkResult = BatchResult[int]


@dataclass(frozen=True, slots=True)
class EpochClaim:
    """The namespace's epoch marker. ``created``: this call wrote it, i.e. Redis held no state of
    this namespace (first start ever, or Redis came back empty). ``token`` identifies the epoch: a
    worker that remembers an older token than the current one knows the state was lost in between."""

    token: str
    created: bool


@dataclass(frozen=True, slots=True)
class SymbolState:
    """One symbol's keys as an operator sees them (``signal-worker state show``).

    ``*_type`` is Redis' TYPE (``none`` when absent); ``*_ttl_s`` is None without a key or TTL.
    ``problem`` says why the worker would quarantine the symbol, None when it is healthy.
    """

    symbol: str
    namespace: str | None
    window_key: str
    watermark_key: str
    window_type: str
    watermark_type: str
    length: int
    oldest_open_time: int | None
    newest_open_time: int | None
    watermark: int | None
    watermark_raw: str | None
    window_ttl_s: int | None
    watermark_ttl_s: int | None
    configured_length: int
    configured_ttl_s: int
    problem: str | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# --------------------------------------------------------------------------- scripts

# Every script first reads the symbol's keys with pcall and checks what they hold, before any
# write: a key of the wrong type or a watermark that is not an integer of at most 15 characters makes the script return
# `SWCORRUPT <reason> <detail>` for that symbol alone (classify.reply_error), with nothing written.
_CHECKS_LUA = """
local function corrupt(reason, detail)
  return redis.error_reply('SWCORRUPT ' .. reason .. ' ' .. detail)
end
local function watermark_of(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    return nil, corrupt('wrong_type', 'watermark key ' .. key .. ' holds a ' .. redis.call('TYPE', key).ok)
  end
  -- At most 15 characters: a millisecond time has 13 until the year 2286; a longer number is one
  -- Python refuses to parse (over 4,300 digits) or one no bar can ever be newer than.
  if value and (#value > 15 or not string.match(value, '^%-?%d+$')) then
    local shown = string.format('%q', string.sub(value, 1, 40))
    return nil, corrupt('bad_watermark', 'watermark key ' .. key .. ' holds ' .. shown)
  end
  return value, nil
end
local function card_of(key)
  local n = redis.pcall('ZCARD', key)
  if type(n) == 'table' and n.err then
    return nil, corrupt('wrong_type', 'window key ' .. key .. ' holds a ' .. redis.call('TYPE', key).ok)
  end
  return n, nil
end
"""

# KEYS: window, watermark. ARGV: length, ttl_s, then open_time/member pairs.
# A full window admits a new bar by ZADD then ZPOPMIN, which drops the oldest (the new bar itself
# when it is older than everything held). The set so exceeds `length` by one for a moment; the
# encoding Redis picks (listpack up to zset-max-listpack-entries, then skiplist for good) can
# therefore differ only when `length` equals that limit, and even then a replay of the same events
# takes that path only if the first pass already did, so DUMP stays byte-identical (tested).
# Rewriting an identical member is skipped: replays then cost one read per bar and send no writes
# to replicas.
_APPLY_LUA = _CHECKS_LUA + """
local window, mark = KEYS[1], KEYS[2]
local length = tonumber(ARGV[1])
local m, bad = watermark_of(mark)
if bad then return bad end
local n
n, bad = card_of(window)
if bad then return bad end
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
return {table.concat(redis.call('ZRANGE', window, 0, -1)), m}
"""

# KEYS: watermark, window. ARGV: open_time, ttl_s. Returns the watermark now stored.
_MARK_LUA = _CHECKS_LUA + """
local current, bad = watermark_of(KEYS[1])
if bad then return bad end
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

# KEYS: window, watermark. Returns whether each existed; both are deleted. (A script rather than
# MULTI: the worker's ACL then needs no @transaction.)
_RESET_LUA = """
local existed = {redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', KEYS[2])}
redis.call('DEL', KEYS[1], KEYS[2])
return existed
"""

# KEYS: epoch marker. ARGV: a fresh token. Sets it unless a marker exists; returns {created, marker}.
_EPOCH_LUA = """
local created = redis.call('SET', KEYS[1], ARGV[1], 'NX') and 1 or 0
return {created, redis.call('GET', KEYS[1])}
"""

# KEYS: window, watermark.
_READ_LUA = _CHECKS_LUA + """
local m, bad = watermark_of(KEYS[2])
if bad then return bad end
local _, bad_window = card_of(KEYS[1])
if bad_window then return bad_window end
return {table.concat(redis.call('ZRANGE', KEYS[1], 0, -1)), m}
"""


@dataclass(frozen=True, slots=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


# The symbol of load_scripts' permission check: not a valid symbol (schemas.candle.SYMBOL_PATTERN),
# so never a real one's keys.
_PROBE_SYMBOL = "probe!"

_APPLY = _Script.of(_APPLY_LUA)
_MARK = _Script.of(_MARK_LUA)
_READ = _Script.of(_READ_LUA)
_RESET = _Script.of(_RESET_LUA)
_EPOCH = _Script.of(_EPOCH_LUA)
_SCRIPTS = (_APPLY, _MARK, _READ, _RESET, _EPOCH)

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
    """A snapshot from a script's reply; :class:`SymbolStateCorrupt` when the window's members are
    not bars this store wrote (so one bad member never reaches the features)."""
    blob, mark = reply
    try:
        times, values = _decode_window(blob)
    except Exception as exc:  # msgpack errors, ragged rows, non-numbers: all mean "not our bars"
        raise decode_error(symbol, "undecodable_window", exc) from exc
    if len(times) > 1 and not bool((times[1:] > times[:-1]).all()):
        raise SymbolStateCorrupt(symbol, "undecodable_window", "members are not in open-time order")
    times.flags.writeable = False
    values.flags.writeable = False
    return WindowSnapshot(symbol, times, values, None if mark is None else int(mark))


# --------------------------------------------------------------------------- store


class WindowStore:
    """Rolling windows of the newest ``length`` bars per symbol, expiring ``ttl_s`` after the last write.

    Every method makes one round trip (plus one ``SCRIPT LOAD`` after the server lost its script
    cache, e.g. on restart or failover). Failures are classified once (:mod:`worker.state.classify`):
    :class:`~worker.errors.StateUnavailable` (retriable) when Redis cannot answer or take writes,
    :class:`~worker.errors.StateMisconfigured` when it refuses the worker itself, and per symbol
    :class:`~worker.errors.SymbolStateCorrupt` in a batch result's ``quarantined`` (raised by the
    single-symbol :meth:`read`). All writes are idempotent, so retrying a failed call is always safe.

    ``namespace`` is the deployment's identity inside ``prefix`` (see :mod:`worker.state.keys`); the
    service builds its store with :meth:`from_settings`. ``None`` keeps the layout from before
    namespaces (``{prefix}:{SYMBOL}:w``).
    """

    def __init__(self, redis: Redis, *, prefix: str, length: int, ttl_s: int, namespace: str | None = None) -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self._redis = redis
        self.keys = KeyLayout(prefix, namespace)
        self.length = length
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings, timeframe: str) -> WindowStore:
        """The store of the deployment ``settings`` describe, serving bars of ``timeframe`` (e.g. "5m").

        Namespace: ``SIGNAL_WORKER_REDIS__NAMESPACE`` when set, else ``<consumer group>@<timeframe>``;
        an unusable one raises :class:`~worker.errors.ConfigError` naming the setting.
        """
        return cls(
            redis,
            prefix=settings.redis.key_prefix,
            namespace=deployment_namespace(settings, timeframe),
            length=settings.window.length,
            ttl_s=settings.redis.window_ttl_s,
        )

    @property
    def namespace(self) -> str | None:
        return self.keys.namespace

    def window_key(self, symbol: str) -> str:
        return self.keys.window(symbol)

    def watermark_key(self, symbol: str) -> str:
        return self.keys.watermark(symbol)

    def epoch_key(self) -> str:
        return self.keys.epoch()

    async def apply(self, batch: Sequence[Bar]) -> ApplyResult:
        """Upsert every bar, trim, refresh the TTLs; return each touched symbol's whole window.

        A bar with an open time already in the window replaces it (a correction); within the
        batch the last bar for an open time wins. Bars older than a full window's oldest are
        dropped. The result does not depend on how a stream is cut into batches or replayed.
        A symbol whose stored state is unusable is in ``.quarantined`` instead, its keys untouched.
        """
        if not batch:
            return BatchResult({})
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
        epoch, *replies = await self._run(calls, "apply", first=("GET", self.epoch_key()))
        if isinstance(epoch, Exception):
            raise _bad_epoch_key(self.epoch_key(), epoch)
        snapshots: dict[str, WindowSnapshot] = {}
        quarantined: dict[str, SymbolStateCorrupt] = {}
        for symbol, reply in zip(by_symbol, replies, strict=True):
            try:
                if isinstance(reply, Exception):
                    raise reply_error(reply, symbol, "apply") from reply
                snapshots[symbol] = _snapshot(symbol, reply)
            except SymbolStateCorrupt as exc:
                quarantined[symbol] = exc
        return BatchResult(snapshots, quarantined, epoch=_epoch_text(self.epoch_key(), epoch))

    async def mark_forecast(self, marks: Mapping[str, int]) -> MarkResult:
        """Raise each symbol's watermark to ``max(stored, given)``; refresh both keys' TTL.

        Returns the watermarks now stored (which may be newer than the ones given); a symbol whose
        watermark key is unusable is in ``.quarantined``, unchanged.
        """
        if not marks:
            return BatchResult({})
        calls: list[_Call] = [
            (_MARK, (self.watermark_key(symbol), self.window_key(symbol)), (int(t), self.ttl_s))
            for symbol, t in marks.items()
        ]
        replies = await self._run(calls, "mark_forecast")
        stored: dict[str, int] = {}
        quarantined: dict[str, SymbolStateCorrupt] = {}
        for symbol, reply in zip(marks, replies, strict=True):
            if isinstance(reply, Exception):
                error = reply_error(reply, symbol, "mark_forecast")
                if not isinstance(error, SymbolStateCorrupt):
                    raise error from reply
                quarantined[symbol] = error
            else:
                stored[symbol] = int(reply)
        return BatchResult(stored, quarantined)

    async def read(self, symbol: str) -> WindowSnapshot:
        """The symbol's window and watermark, without touching the TTL. Empty if none is stored.

        Raises :class:`~worker.errors.SymbolStateCorrupt` when the symbol's keys are unusable.
        """
        (reply,) = await self._run([(_READ, (self.window_key(symbol), self.watermark_key(symbol)), ())], "read")
        if isinstance(reply, Exception):
            raise reply_error(reply, symbol, "read") from reply
        return _snapshot(symbol, reply)

    async def describe(self, symbol: str) -> SymbolState:
        """What Redis holds for ``symbol`` in this namespace, healthy or not (for operators)."""
        wkey, mkey = self.window_key(symbol), self.watermark_key(symbol)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.type(wkey)
            pipe.type(mkey)
            pipe.ttl(wkey)
            pipe.ttl(mkey)
            wtype, mtype, wttl, mttl = (_text(v) for v in await pipe.execute())
            pipe = self._redis.pipeline(transaction=False)
            if wtype == "zset":
                pipe.zcard(wkey)
                pipe.zrange(wkey, 0, 0, withscores=True)
                pipe.zrange(wkey, -1, -1, withscores=True)
            if mtype == "string":
                pipe.get(mkey)
            extra = list(await pipe.execute()) if len(pipe) else []
        except Exception as exc:
            raise state_error(exc, "describe") from exc
        length, oldest, newest, raw = 0, None, None, None
        if wtype == "zset":
            length, first, last = int(extra[0]), extra[1], extra[2]
            oldest = int(first[0][1]) if first else None
            newest = int(last[0][1]) if last else None
            extra = extra[3:]
        if mtype == "string":
            raw = _text(extra[0])
        problem = None
        watermark = None
        try:
            watermark = (await self.read(symbol)).watermark
        except SymbolStateCorrupt as exc:
            problem = f"{exc.reason}: {exc.detail}"
        return SymbolState(
            symbol=symbol,
            namespace=self.namespace,
            window_key=wkey,
            watermark_key=mkey,
            window_type=wtype,
            watermark_type=mtype,
            length=length,
            oldest_open_time=oldest,
            newest_open_time=newest,
            watermark=watermark,
            watermark_raw=raw,
            window_ttl_s=_ttl(int(wttl)),
            watermark_ttl_s=_ttl(int(mttl)),
            configured_length=self.length,
            configured_ttl_s=self.ttl_s,
            problem=problem,
        )

    async def reset(self, symbol: str) -> tuple[str, ...]:
        """Delete ``symbol``'s window and watermark in this namespace (whatever they hold); return the
        keys that existed. Nothing of another namespace or symbol is touched."""
        keys = (self.window_key(symbol), self.watermark_key(symbol))
        (reply,) = await self._run([(_RESET, keys, ())], "reset")
        if isinstance(reply, Exception):
            raise state_error(reply, "reset") from reply
        return tuple(key for key, existed in zip(keys, reply, strict=True) if existed)

    async def claim_epoch(self) -> EpochClaim:
        """Create the namespace's epoch marker unless it exists; return the marker now stored.

        ``created=True`` means Redis held no marker: the first start of this deployment, or Redis
        lost its data (restarted without persistence, a failover to an empty replica, the marker
        evicted). A failover that lost only the last writes keeps the marker: not detected here.
        The marker has no TTL on purpose: one that expired while the market is closed would read
        as a loss, and refreshing it from the per-symbol scripts would cross hash slots.
        """
        key = self.epoch_key()
        token = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:16]}"
        (reply,) = await self._run([(_EPOCH, (key,), (token.encode(),))], "claim_epoch")
        if isinstance(reply, Exception):
            raise _bad_epoch_key(key, reply)
        created, current = reply
        return EpochClaim(_epoch_text(key, current) or "", bool(created))  # the script always returns one

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:
            raise state_error(exc, "ping") from exc

    async def load_scripts(self) -> None:
        """Load the Lua scripts now, so the first ``apply`` makes exactly one round trip, and check
        that this user may run them on this namespace's keys, so an ACL or endpoint mistake fails at
        start-up (:class:`~worker.errors.StateMisconfigured`) rather than at the first candle.

        The check applies an empty batch to a key no symbol can have (``!`` is not allowed in
        symbols): the script reads both keys and sets the TTL of keys that do not exist, which
        needs the same permissions as a real write and changes nothing.
        """
        await self._load(_SCRIPTS)
        probe = _PROBE_SYMBOL
        await self._run([(_APPLY, (self.window_key(probe), self.watermark_key(probe)), (self.length, self.ttl_s))],
                        "start-up check", first=("GET", self.epoch_key()))

    async def _load(self, scripts: Sequence[_Script]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for script in scripts:
            pipe.script_load(script.source)
        try:
            shas = await pipe.execute()
        except Exception as exc:
            raise state_error(exc, "SCRIPT LOAD") from exc
        for script, sha in zip(scripts, shas, strict=True):
            if _text(sha) != script.sha:
                raise StateMisconfigured(f"redis returned sha {sha!r} for a script whose sha1 is {script.sha}")

    async def _run(self, calls: Sequence[_Call], what: str, first: tuple[str, ...] | None = None) -> list[Any]:
        """Send ``calls`` as one pipeline; return each call's reply or its error reply, in order.

        ``first``: one plain command sent ahead of the scripts in the same round trip, its reply
        first in the list. Raises only for the whole batch: unavailable or misconfigured. Per-call
        errors stay in the list for the caller to classify per symbol.
        """
        # EVALSHA is sent optimistically; NOSCRIPT (script cache lost) means load and resend the
        # whole pipeline, which is safe because every script is idempotent. redis-py's Script
        # objects are not used: in a pipeline they cost an extra SCRIPT EXISTS round trip per call.
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            if first is not None:
                pipe.execute_command(*first)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                raise state_error(exc, what) from exc
            if attempt == 1 or not any(isinstance(reply, rexc.NoScriptError) for reply in replies):
                break
            # The server lost its script cache; reload all scripts so the next calls of the
            # other kinds do not each pay this detour too.
            await self._load(_SCRIPTS)
        # A reply error that is not about one symbol's data (OOM, READONLY, NOPERM ...) is the
        # server's answer to the whole batch: raise it, so no symbol is quarantined for it.
        for reply in replies:
            if isinstance(reply, Exception):
                error = reply_error(reply, "", what)
                if not isinstance(error, SymbolStateCorrupt):
                    raise error from reply
        return list(replies)


def _bad_epoch_key(key: str, exc: Exception) -> StateMisconfigured:
    return StateMisconfigured(f"redis: {key} holds something other than the epoch marker ({exc}); delete that key")


def _epoch_text(key: str, value: Any) -> str | None:
    """The epoch token as text; a value that is not UTF-8 was not written by a worker."""
    try:
        return None if value is None else str(_text(value))
    except UnicodeDecodeError as exc:
        raise _bad_epoch_key(key, exc) from None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _ttl(value: int) -> int | None:
    return value if value >= 0 else None
