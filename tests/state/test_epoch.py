"""claim_epoch: the marker that tells the service Redis came back empty (issue 9, C11).

Against a real server that is restarted empty (persistence off), not a simulated flush."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis

from worker.dev.embedded import EmbeddedRedis
from worker.errors import StateMisconfigured
from worker.settings import RedisSettings
from worker.state import CandleRow, EpochClaim, WindowStore, make_redis

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def bar(symbol: str, i: int) -> CandleRow:
    return CandleRow(symbol, T0 + i * 60_000, 1.0, 2.0, 0.5, 1.5, 3.0)


async def test_epoch_is_created_once_and_again_after_redis_restarts_empty(own_redis: EmbeddedRedis) -> None:
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "socket_timeout_s": 1.0}))
    try:
        store = WindowStore(client, prefix="sw", namespace="g@5m", length=8, ttl_s=600)
        other = WindowStore(client, prefix="sw", namespace="canary@5m", length=8, ttl_s=600)
        first = await store.claim_epoch()
        assert first.created
        again = await store.claim_epoch()
        assert again == EpochClaim(first.token, False)  # same epoch, not created
        assert (await other.claim_epoch()).created  # per namespace

        await store.apply([bar("X", i) for i in range(5)])
        await store.mark_forecast({"X": T0})
        assert await client.ttl(store.epoch_key()) == -1  # no TTL: an idle weekend is not a loss
        assert not (await store.claim_epoch()).created

        own_redis.stop()
        own_redis.start()  # same URL, empty keyspace (no persistence)

        # The pooled connection went stale with the restart; the client reconnects by itself.
        after = await store.claim_epoch()
        assert after.created and after.token != first.token
        assert len(await store.read("X")) == 0  # the state really was lost
        assert not (await store.claim_epoch()).created
    finally:
        await client.aclose()


async def test_two_replicas_agree_on_one_epoch(own_redis: EmbeddedRedis) -> None:
    a = aredis.Redis.from_url(own_redis.url)
    b = aredis.Redis.from_url(own_redis.url)
    try:
        claims = [await WindowStore(c, prefix="sw", namespace="g@5m", length=8, ttl_s=600).claim_epoch()
                  for c in (a, b)]
        assert [c.created for c in claims] == [True, False]
        assert claims[0].token == claims[1].token
    finally:
        await a.aclose()
        await b.aclose()


async def test_reset_of_a_symbol_keeps_the_epoch(own_redis: EmbeddedRedis) -> None:
    client = aredis.Redis.from_url(own_redis.url)
    try:
        store = WindowStore(client, prefix="sw", namespace="g@5m", length=8, ttl_s=600)
        token = (await store.claim_epoch()).token
        await store.apply([bar("X", 0)])
        await store.reset("X")
        assert await store.claim_epoch() == EpochClaim(token, False)
    finally:
        await client.aclose()


async def test_every_apply_reports_the_epoch_so_a_quick_restart_is_noticed(own_redis: EmbeddedRedis) -> None:
    """A restart shorter than the socket timeout raises nothing (the client reconnects on its one
    retry), so the worker learns of it from the epoch each batch reports, in the same round trip."""
    client = make_redis(RedisSettings.model_validate({"url": own_redis.url, "socket_timeout_s": 1.0}))
    try:
        store = WindowStore(client, prefix="sw", namespace="g@5m", length=8, ttl_s=600)
        assert (await store.apply([bar("X", 0)])).epoch is None  # nothing claimed yet
        claim = await store.claim_epoch()
        assert (await store.apply([bar("X", 1)])).epoch == claim.token

        own_redis.stop()
        own_redis.start()
        result = await store.apply([bar("X", 2)])  # no error: the client reconnected by itself
        assert result.epoch is None != claim.token  # ... but the marker is gone: state was lost
        assert result["X"].open_times().tolist() == [bar("X", 2).open_time]
        renewed = await store.claim_epoch()
        assert renewed.created and (await store.apply([bar("X", 3)])).epoch == renewed.token

        await client.delete(store.epoch_key())
        await client.hset(store.epoch_key(), "x", "y")
        with pytest.raises(StateMisconfigured, match="epoch marker"):
            await store.apply([bar("X", 4)])
        with pytest.raises(StateMisconfigured, match="epoch marker"):
            await store.claim_epoch()
    finally:
        await client.aclose()
