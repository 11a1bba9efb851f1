"""WindowStore against a real Redis/valkey: layout, idempotency, TTL, watermark, round trips, outages."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import redis.asyncio as aredis
from redis.asyncio.connection import Connection

from worker.dev.embedded import EmbeddedRedis
from worker.errors import StateUnavailable
from worker.settings import RedisSettings
from worker.state import CandleRow, WindowStore, make_redis
from worker.state.windows import _decode_window

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000  # ms; > 2**32, the realistic case
STEP = 60_000


def bar(symbol: str, i: int, close: float | None = None, *, t0: int = T0) -> CandleRow:
    c = 100.0 + i if close is None else close
    return CandleRow(symbol, t0 + i * STEP, c - 0.5, c + 1.0, c - 1.0, c, 10.0 * i + 0.25)


def store_for(client: aredis.Redis, prefix: str, length: int = 8, ttl_s: int = 3600) -> WindowStore:
    return WindowStore(client, prefix=prefix, length=length, ttl_s=ttl_s)


async def test_apply_returns_sorted_windows_per_symbol(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    snaps = await store.apply([bar("EURUSD", 2), bar("EURUSD", 0), bar("GBPUSD", 5), bar("EURUSD", 1)])

    assert set(snaps) == {"EURUSD", "GBPUSD"}
    eur = snaps["EURUSD"]
    assert eur.open_times().dtype == np.int64
    assert eur.ohlcv().dtype == np.float64
    assert eur.ohlcv().shape == (3, 5)
    assert eur.open_times().tolist() == [T0, T0 + STEP, T0 + 2 * STEP]
    assert eur.ohlcv()[1].tolist() == [100.5, 102.0, 100.0, 101.0, 10.25]
    assert eur.newest_open_time == T0 + 2 * STEP
    assert eur.watermark is None
    assert eur.candles() == (bar("EURUSD", 0), bar("EURUSD", 1), bar("EURUSD", 2))
    assert len(snaps["GBPUSD"]) == 1

    read = await store.read("EURUSD")
    assert read.open_times().tolist() == eur.open_times().tolist()
    assert np.array_equal(read.ohlcv(), eur.ohlcv())
    with pytest.raises(ValueError):
        eur.ohlcv()[0, 0] = 1.0  # snapshots are read-only


async def test_keys_share_a_hash_slot(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    assert store.window_key("EURUSD") == f"{unique_prefix}:{{EURUSD}}:w"
    assert store.watermark_key("EURUSD") == f"{unique_prefix}:{{EURUSD}}:m"
    await store.apply([bar("EURUSD", 0)])
    await store.mark_forecast({"EURUSD": T0})
    assert await redis_client.type(store.window_key("EURUSD")) == b"zset"
    assert await redis_client.get(store.watermark_key("EURUSD")) == str(T0).encode()


async def test_out_of_order_bar_lands_in_place(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await store.apply([bar("X", 0), bar("X", 1), bar("X", 3)])
    snap = (await store.apply([bar("X", 2)]))["X"]
    assert snap.open_times().tolist() == [T0 + i * STEP for i in range(4)]
    assert snap.ohlcv()[:, 3].tolist() == [100.0, 101.0, 102.0, 103.0]


async def test_correction_replaces_the_bar(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await store.apply([bar("X", 0), bar("X", 1), bar("X", 2)])
    snap = (await store.apply([bar("X", 1, close=555.0)]))["X"]
    assert len(snap) == 3
    assert snap.ohlcv()[:, 3].tolist() == [100.0, 555.0, 102.0]
    assert await redis_client.zcard(store.window_key("X")) == 3


async def test_last_bar_wins_within_a_batch(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    snap = (await store.apply([bar("X", 0, close=1.0), bar("X", 1), bar("X", 0, close=2.0)]))["X"]
    assert snap.ohlcv()[:, 3].tolist() == [2.0, 101.0]


async def test_trim_keeps_the_newest_length_bars(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix, length=8)
    snap = (await store.apply([bar("X", i) for i in range(20)]))["X"]
    assert snap.open_times().tolist() == [T0 + i * STEP for i in range(12, 20)]

    # Older than a full window's oldest: dropped. A correction of an evicted bar: dropped too.
    snap = (await store.apply([bar("X", 3), bar("X", 11, close=0.0)]))["X"]
    assert snap.open_times().tolist() == [T0 + i * STEP for i in range(12, 20)]

    # Newer: the oldest goes.
    snap = (await store.apply([bar("X", 25)]))["X"]
    assert snap.open_times()[0] == T0 + 13 * STEP
    assert snap.newest_open_time == T0 + 25 * STEP
    assert len(snap) == 8


async def test_shorter_length_trims_an_existing_window(redis_client: aredis.Redis, unique_prefix: str) -> None:
    await store_for(redis_client, unique_prefix, length=10).apply([bar("X", i) for i in range(10)])
    snap = (await store_for(redis_client, unique_prefix, length=4).apply([bar("X", 10)]))["X"]
    assert snap.open_times().tolist() == [T0 + i * STEP for i in range(7, 11)]


async def test_ttl_set_and_refreshed_on_both_keys(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix, ttl_s=600)
    await store.apply([bar("X", 0)])
    await store.mark_forecast({"X": T0})
    wkey, mkey = store.window_key("X"), store.watermark_key("X")
    assert 590 <= await redis_client.ttl(wkey) <= 600
    assert 590 <= await redis_client.ttl(mkey) <= 600

    await redis_client.expire(wkey, 5)
    await redis_client.expire(mkey, 5)
    await store.apply([bar("X", 1)])
    assert await redis_client.ttl(wkey) > 500
    assert await redis_client.ttl(mkey) > 500

    await redis_client.expire(wkey, 5)
    await store.mark_forecast({"X": T0})  # not newer, still refreshes both
    assert await redis_client.ttl(wkey) > 500

    ttl_before = await redis_client.ttl(wkey)
    await redis_client.expire(wkey, 5)
    await store.read("X")  # reads do not keep idle windows alive
    assert await redis_client.ttl(wkey) <= 5 < ttl_before


async def test_watermark_is_monotonic(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await store.apply([bar("A", 0), bar("B", 0)])
    assert await store.mark_forecast({"A": T0 + 5 * STEP, "B": T0}) == {"A": T0 + 5 * STEP, "B": T0}
    assert await store.mark_forecast({"A": T0 + 2 * STEP}) == {"A": T0 + 5 * STEP}
    assert (await store.read("A")).watermark == T0 + 5 * STEP
    assert await store.mark_forecast({"A": T0 + 9 * STEP}) == {"A": T0 + 9 * STEP}
    snaps = await store.apply([bar("A", 1), bar("B", 1)])
    assert snaps["A"].watermark == T0 + 9 * STEP
    assert snaps["B"].watermark == T0


async def test_concurrent_marks_keep_the_maximum(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    marks = list(range(T0, T0 + 50 * STEP, STEP))
    random.Random(7).shuffle(marks)
    await asyncio.gather(*(store.mark_forecast({"A": t}) for t in marks))
    assert (await store.read("A")).watermark == T0 + 49 * STEP


def _stream(symbols: Sequence[str], bars_per_symbol: int, seed: int) -> list[CandleRow]:
    """Interleaved symbols, shuffled a little (late bars) with some corrections mixed in."""
    rng = random.Random(seed)
    rows = [bar(s, i) for i in range(bars_per_symbol) for s in symbols]
    for i in range(0, len(rows) - 5, 7):
        j = i + rng.randrange(1, 5)
        rows[i], rows[j] = rows[j], rows[i]
    corrections = [bar(s, rng.randrange(bars_per_symbol), close=rng.random()) for s in symbols for _ in range(5)]
    for c in corrections:
        rows.insert(rng.randrange(len(rows)), c)
    return rows


def _batches(rows: Sequence[CandleRow], size: int) -> list[Sequence[CandleRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# 8, 100: listpack throughout (100 also with batches that would overflow 128 if the set grew
# past `length` before trimming); 128: exactly zset-max-listpack-entries (default), where a full window
# briefly holds 129 members; 300: skiplist.
@pytest.mark.parametrize("length", [8, 100, 128, 300])
async def test_replay_leaves_windows_byte_identical(
    redis_client: aredis.Redis, unique_prefix: str, length: int
) -> None:
    symbols = ["EURUSD", "USDJPY", "XAUUSD"]
    rows = _stream(symbols, bars_per_symbol=length + 40, seed=length)
    store = store_for(redis_client, unique_prefix, length=length)
    for chunk in _batches(rows, 37):
        await store.apply(chunk)
    await store.mark_forecast({s: T0 + 10 * STEP for s in symbols})
    dumps = {s: await redis_client.dump(store.window_key(s)) for s in symbols}

    # Replay the whole stream, cut differently, then a replay from the middle.
    for chunk in _batches(rows, 101):
        await store.apply(chunk)
    for chunk in _batches(rows[len(rows) // 2 :], 13):
        await store.apply(chunk)
    assert {s: await redis_client.dump(store.window_key(s)) for s in symbols} == dumps

    # A fresh store fed the same events in other batches ends byte-identical too.
    other = store_for(redis_client, f"{unique_prefix}:again", length=length)
    for chunk in _batches(rows, 1 if length < 100 else 250):
        await other.apply(chunk)
    assert {s: await redis_client.dump(other.window_key(s)) for s in symbols} == dumps
    assert (await store.read("EURUSD")).watermark == T0 + 10 * STEP


async def test_listpack_boundary_replay_without_eviction(redis_client: aredis.Redis, unique_prefix: str) -> None:
    # Exactly `length` distinct bars, never evicting: the set may stay listpack; a replay must not
    # push it into a skiplist.
    length = 128
    store = store_for(redis_client, unique_prefix, length=length)
    rows = [bar("X", i) for i in range(length)]
    await store.apply(rows)
    before = await redis_client.dump(store.window_key("X"))
    encoding = await redis_client.object("encoding", store.window_key("X"))
    await store.apply(rows[::-1])
    assert await redis_client.dump(store.window_key("X")) == before
    assert await redis_client.object("encoding", store.window_key("X")) == encoding


async def test_small_open_times_use_the_generic_decoder(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    rows = [bar("X", i, t0=0) for i in range(3)]  # open times 0, 60000, 120000: short msgpack ints
    snap = (await store.apply(rows))["X"]
    assert snap.open_times().tolist() == [0, STEP, 2 * STEP]
    assert snap.candles() == tuple(rows)


def test_decoder_fast_and_generic_paths_agree() -> None:
    rows = [(T0 + i * STEP, 1.5 * i, 2.0, -3.0, float("inf"), 1e-300) for i in range(50)]
    fast = b"".join(msgpack.packb(r) for r in rows)
    times, values = _decode_window(fast)
    assert times.tolist() == [r[0] for r in rows]
    assert values.tolist() == [list(r[1:]) for r in rows]

    mixed = fast + msgpack.packb((7, 1.0, 2.0, 3.0, 4.0, 5.0))  # one short record: generic path
    times, values = _decode_window(mixed)
    assert times.tolist()[-1] == 7 and values.shape == (51, 5)

    times, values = _decode_window(b"")
    assert times.shape == (0,) and values.shape == (0, 5)


async def test_empty_inputs_make_no_request(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    assert await store.apply([]) == {}
    assert await store.mark_forecast({}) == {}
    snap = await store.read("NOPE")
    assert len(snap) == 0 and snap.newest_open_time is None and snap.watermark is None


class _CountingConnection(Connection):
    """Counts writes to the socket: one per request flight, i.e. per round trip."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_apply_and_mark_are_one_round_trip_each(own_redis: EmbeddedRedis) -> None:
    pool = aredis.ConnectionPool.from_url(own_redis.url, connection_class=_CountingConnection)
    client = aredis.Redis.from_pool(pool)
    try:
        store = WindowStore(client, prefix="rt", length=64, ttl_s=600)
        await client.ping()  # connect (handshake commands are not ours to count)
        symbols = [f"S{i:02d}" for i in range(50)]
        batch = [bar(s, i) for i in range(10) for s in symbols]

        _CountingConnection.sends = 0
        await store.apply(batch)  # cold script cache: EVALSHA, SCRIPT LOAD, EVALSHA
        assert _CountingConnection.sends == 3

        await client.config_resetstat()
        _CountingConnection.sends = 0
        snaps = await store.apply([bar(s, i) for i in range(10, 20) for s in symbols])
        assert _CountingConnection.sends == 1
        assert len(snaps) == 50
        stats = await client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 50  # one script call per symbol, nothing else sent

        _CountingConnection.sends = 0
        await store.mark_forecast({s: T0 for s in symbols})
        assert _CountingConnection.sends == 1

        # A corrupt symbol in the batch is classified from its own reply: still one round trip.
        await client.set(store.window_key("S07"), "not a window")
        _CountingConnection.sends = 0
        result = await store.apply([bar(s, 20) for s in symbols])
        assert _CountingConnection.sends == 1
        assert set(result.quarantined) == {"S07"} and len(result) == 49

        # Server lost its scripts (restart, failover, SCRIPT FLUSH): reload, resend, same result.
        await client.script_flush()
        snaps = await store.apply([bar("S00", 20)])
        assert snaps["S00"].newest_open_time == T0 + 20 * STEP
    finally:
        await client.aclose()


async def test_state_unavailable_while_redis_is_down(own_redis: EmbeddedRedis) -> None:
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "socket_timeout_s": 1.0}))
    try:
        store = WindowStore(client, prefix="down", length=8, ttl_s=600)
        await store.apply([bar("X", 0)])
        own_redis.stop()

        for call in (
            store.apply([bar("X", 1)]),
            store.mark_forecast({"X": T0}),
            store.read("X"),
            store.ping(),
        ):
            started = time.monotonic()
            with pytest.raises(StateUnavailable) as info:
                await call
            assert time.monotonic() - started < 5.0  # surfaces fast; backoff is the caller's job
            assert info.value.__cause__ is not None

        own_redis.start()  # same port, empty server, empty script cache
        snap = (await store.apply([bar("X", 2)]))["X"]
        assert snap.open_times().tolist() == [T0 + 2 * STEP]
        await store.ping()
    finally:
        await client.aclose()


async def test_busy_loading_reply_is_state_unavailable(own_redis: EmbeddedRedis) -> None:
    client = aredis.Redis.from_url(own_redis.url)
    blocker = aredis.Redis.from_url(own_redis.url)
    try:
        store = WindowStore(client, prefix="busy", length=8, ttl_s=600)
        await store.load_scripts()
        await blocker.config_set("busy-reply-threshold", 100)
        # A script spinning past busy-reply-threshold makes the server answer BUSY to others.
        spin_lua = (
            "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
            "if n[1] - t[1] >= 2 then break end end return 1"
        )

        async def run_spin() -> None:
            await blocker.eval(spin_lua, 0)

        spin = asyncio.create_task(run_spin())
        await asyncio.sleep(0.5)
        with pytest.raises(StateUnavailable):
            await store.apply([bar("X", 0)])
        await spin
    finally:
        await client.aclose()
        await blocker.aclose()


async def test_full_windows_under_batches_spanning_many_symbols_keep_exactly_the_newest_bars(
    redis_client: aredis.Redis, unique_prefix: str
) -> None:
    """The worker's shape of traffic: batches of 500 candles over 50 symbols into full 256-bar windows.
    (Its speed is measured by `signal-worker bench --io-only`, docs/benchmarks.md, not here.)"""
    store = store_for(redis_client, unique_prefix, length=256, ttl_s=600)
    symbols = [f"S{i:02d}" for i in range(50)]
    batches = [[bar(s, b * 10 + k) for k in range(10) for s in symbols] for b in range(60)]
    for chunk in batches:
        snaps = await store.apply(chunk)
        assert set(snaps) == set(symbols)
    for s in (symbols[0], symbols[-1]):
        snap = await store.read(s)
        assert snap.open_times().tolist() == [bar(s, i).open_time for i in range(600 - 256, 600)]
        assert snap.ohlcv()[-1].tolist() == [bar(s, 599).open, bar(s, 599).high, bar(s, 599).low,
                                             bar(s, 599).close, bar(s, 599).volume]
