"""Deployment namespaces: two deployments on one Redis (another consumer group, another timeframe)
never see each other's bars or watermarks, and a bad namespace fails at start-up naming the setting."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis
from redis.crc import key_slot

from worker.errors import ConfigError
from worker.settings import Settings, load_settings
from worker.state import CandleRow, WindowStore, deployment_namespace

T0 = 1_700_000_000_000
MINUTE = 60_000


def settings(**redis: object) -> Settings:
    return Settings.model_validate({"kafka": {"consumer_group": "signal-worker"}, "redis": redis})


def bar(symbol: str, t: int, close: float) -> CandleRow:
    return CandleRow(symbol, t, close, close + 1, close - 1, close, 1.0)


def test_namespace_is_group_and_timeframe_unless_set() -> None:
    assert deployment_namespace(settings(), "5m") == "signal-worker@5m"
    assert deployment_namespace(settings(), "60m") == deployment_namespace(settings(), "1h") == "signal-worker@1h"
    assert deployment_namespace(settings(namespace="prod-eu"), "5m") == "prod-eu"
    canary = Settings.model_validate({"kafka": {"consumer_group": "signal-worker-canary"}})
    assert deployment_namespace(canary, "5m") != deployment_namespace(settings(), "5m")


def test_from_settings_builds_the_deployments_keys() -> None:
    store = WindowStore.from_settings(None, settings(key_prefix="fx", window_ttl_s=600), "5m")  # type: ignore[arg-type]
    assert store.namespace == "signal-worker@5m"
    assert store.window_key("EURUSD") == "fx:signal-worker@5m:{EURUSD}:w"
    assert store.watermark_key("EURUSD") == "fx:signal-worker@5m:{EURUSD}:m"
    assert store.epoch_key() == "fx:signal-worker@5m:epoch"
    assert store.ttl_s == 600 and store.length == Settings().window.length
    # Both keys of a symbol in one cluster slot, whatever the namespace.
    assert key_slot(store.window_key("EURUSD").encode()) == key_slot(store.watermark_key("EURUSD").encode()) \
        == key_slot(b"{EURUSD}")


@pytest.mark.parametrize("bad", ["has space", "{EURUSD}", "tab\there", "a}b", "x" * 129])
def test_bad_namespace_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SIGNAL_WORKER_REDIS__NAMESPACE", bad)
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_REDIS__NAMESPACE"):
        load_settings()


def test_bad_namespace_given_directly_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_REDIS__NAMESPACE"):
        WindowStore(None, prefix="sw", namespace="a {b}", length=8, ttl_s=60)  # type: ignore[arg-type]


def test_group_unusable_as_namespace_says_which_settings() -> None:
    odd = Settings.model_validate({"kafka": {"consumer_group": "team {fx} workers"}})
    with pytest.raises(ConfigError, match=r"SIGNAL_WORKER_KAFKA__CONSUMER_GROUP.*SIGNAL_WORKER_REDIS__NAMESPACE"):
        deployment_namespace(odd, "5m")
    assert deployment_namespace(odd.model_copy(update={"redis": settings(namespace="fx").redis}), "5m") == "fx"


@pytest.mark.integration
async def test_two_deployments_on_one_redis_keep_disjoint_state(
    redis_client: aredis.Redis, unique_prefix: str
) -> None:
    """Production (5m), its canary (own group, same prefix, same Redis) and a 1h deployment all
    write EURUSD. Each window holds only its own bars and each watermark is its own: the canary
    running ahead never makes production's bars late (the incident of issue 9, B7)."""
    base = {"redis": {"key_prefix": unique_prefix}}
    prod = WindowStore.from_settings(redis_client, Settings.model_validate(
        {**base, "kafka": {"consumer_group": "signal-worker"}}), "5m")
    canary = WindowStore.from_settings(redis_client, Settings.model_validate(
        {**base, "kafka": {"consumer_group": "signal-worker-canary"}}), "5m")
    hourly = WindowStore.from_settings(redis_client, Settings.model_validate(
        {**base, "kafka": {"consumer_group": "signal-worker"}}), "1h")
    stores = {"prod": prod, "canary": canary, "hourly": hourly}
    steps = {"prod": 5 * MINUTE, "canary": 5 * MINUTE, "hourly": 60 * MINUTE}
    closes = {"prod": 1.0, "canary": 2.0, "hourly": 3.0}

    # The canary replays ahead: its watermark is far in the future of production's stream.
    await canary.apply([bar("EURUSD", T0 + 100 * steps["canary"], 2.0)])
    await canary.mark_forecast({"EURUSD": T0 + 100 * steps["canary"]})

    for i in range(12):
        for name, store in stores.items():
            t = T0 + i * steps[name]
            result = await store.apply([bar("EURUSD", t, closes[name])])
            snap = result["EURUSD"]
            if name != "canary":
                # Every bar is newer than this deployment's own watermark: it would be forecast.
                assert snap.watermark is None or t > snap.watermark
                await store.mark_forecast({"EURUSD": t})
            assert set(snap.ohlcv()[:, 3].tolist()) == {closes[name]}  # only its own bars
    assert (await prod.read("EURUSD")).watermark == T0 + 11 * 5 * MINUTE
    assert (await hourly.read("EURUSD")).watermark == T0 + 11 * 60 * MINUTE
    assert (await canary.read("EURUSD")).watermark == T0 + 100 * 5 * MINUTE
    assert (await hourly.read("EURUSD")).open_times().tolist() == [T0 + i * 60 * MINUTE for i in range(12)]

    keys = {name: {k async for k in redis_client.scan_iter(match=f"{unique_prefix}:{s.namespace}:*")}
            for name, s in stores.items()}
    assert all(len(k) == 2 for k in keys.values())
    assert not (keys["prod"] & keys["canary"]) and not (keys["prod"] & keys["hourly"])
    assert not (keys["canary"] & keys["hourly"])

    # Resetting one deployment's symbol leaves the others' untouched.
    assert await canary.reset("EURUSD") == (canary.window_key("EURUSD"), canary.watermark_key("EURUSD"))
    assert len(await prod.read("EURUSD")) == 12 and len(await hourly.read("EURUSD")) == 12
