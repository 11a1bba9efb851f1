"""``signal-worker state show|reset`` as an operator runs it, against a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aredis

from worker.dev.embedded import EmbeddedRedis, free_port
from worker.settings import Settings
from worker.state import CandleRow, EpochClaim, WindowStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIGNAL_WORKER = str(Path(sys.executable).parent / "signal-worker")
HOUR = 3_600_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR


def cli(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_WORKER_")}
    environ.update({"SIGNAL_WORKER_REDIS__URL": redis_url, "SIGNAL_WORKER_REDIS__SOCKET_TIMEOUT_S": "1", **env})
    return subprocess.run([SIGNAL_WORKER, "state", *args], env=environ, cwd=str(REPO), capture_output=True,
                          text=True, timeout=120)


def store_of(client: aredis.Redis, timeframe: str = "1h", group: str = "signal-worker") -> WindowStore:
    settings = Settings.model_validate({"kafka": {"consumer_group": group}, "window": {"length": 64}})
    return WindowStore.from_settings(client, settings, timeframe)


def bar(symbol: str, t: int) -> CandleRow:
    return CandleRow(symbol, t, 1.0, 2.0, 0.5, 1.5, 3.0)


async def test_show_prints_the_symbols_window_and_watermark(own_redis: EmbeddedRedis) -> None:
    client = aredis.Redis.from_url(own_redis.url)
    try:
        store = store_of(client)
        await store.apply([bar("EURUSD", T0 + i * HOUR) for i in range(10)])
        await store.mark_forecast({"EURUSD": T0 + 8 * HOUR})
        future = int(time.time() * 1000) + 400 * 86_400_000  # a feed that switched ms -> µs looks like this
        await store.apply([bar("USDJPY", T0), bar("USDJPY", future)])
    finally:
        await client.aclose()

    out = cli(own_redis.url, "show", "--symbol", "EURUSD", "--timeframe", "1h", "--json")
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state["namespace"] == "signal-worker@1h"
    assert state["window_key"] == "sw:signal-worker@1h:{EURUSD}:w"
    assert (state["length"], state["oldest_open_time"], state["newest_open_time"]) == (10, T0, T0 + 9 * HOUR)
    assert state["watermark"] == T0 + 8 * HOUR
    assert state["problem"] is None
    assert 0 < state["window_ttl_s"] <= Settings().redis.window_ttl_s

    table = cli(own_redis.url, "show", "--symbol", "USDJPY", "--timeframe", "60m")  # same deployment as 1h
    assert table.returncode == 0, table.stderr
    assert "2 of 256 bars" in table.stdout
    newest = next(line for line in table.stdout.splitlines() if line.startswith("newest open time"))
    assert "in the FUTURE" in newest and str(future) in newest
    assert "status            healthy" in table.stdout


async def test_show_reports_a_quarantined_symbol(own_redis: EmbeddedRedis) -> None:
    client = aredis.Redis.from_url(own_redis.url)
    try:
        store = store_of(client)
        await client.set(store.watermark_key("EURUSD"), "not-a-number")
    finally:
        await client.aclose()
    out = cli(own_redis.url, "show", "--symbol", "EURUSD", "--timeframe", "1h")
    assert out.returncode == 0, out.stderr
    assert "QUARANTINED: bad_watermark" in out.stdout and "not-a-number" in out.stdout


async def test_reset_needs_yes_and_deletes_only_this_symbol_in_this_namespace(own_redis: EmbeddedRedis) -> None:
    client = aredis.Redis.from_url(own_redis.url)
    try:
        prod, canary, other_frame = store_of(client), store_of(client, group="canary"), store_of(client, "5m")
        for store in (prod, canary, other_frame):
            await store.apply([bar("EURUSD", T0), bar("GBPUSD", T0)])
            await store.mark_forecast({"EURUSD": T0})
        epoch = await prod.claim_epoch()

        refused = cli(own_redis.url, "reset", "--symbol", "EURUSD", "--timeframe", "1h")
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert len(await prod.read("EURUSD")) == 1

        done = cli(own_redis.url, "reset", "--symbol", "EURUSD", "--timeframe", "1h", "--yes")
        assert done.returncode == 0, done.stderr
        assert prod.window_key("EURUSD") in done.stdout and prod.watermark_key("EURUSD") in done.stdout
        snap = await prod.read("EURUSD")
        assert len(snap) == 0 and snap.watermark is None
        # Everything else is as it was: other symbol, other group, other timeframe, the epoch.
        assert len(await prod.read("GBPUSD")) == 1
        assert (await canary.read("EURUSD")).watermark == T0
        assert (await other_frame.read("EURUSD")).watermark == T0
        assert (await prod.claim_epoch()) == EpochClaim(epoch.token, False)

        again = cli(own_redis.url, "reset", "--symbol", "EURUSD", "--timeframe", "1h", "--yes", "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["deleted"] == []
    finally:
        await client.aclose()


def test_timeframe_defaults_to_the_setting_then_the_checkpoint(own_redis: EmbeddedRedis) -> None:
    by_setting = cli(own_redis.url, "show", "--symbol", "EURUSD", "--json", SIGNAL_WORKER_WINDOW__TIMEFRAME="1h")
    assert json.loads(by_setting.stdout)["namespace"] == "signal-worker@1h"
    by_checkpoint = cli(own_redis.url, "show", "--symbol", "EURUSD", "--json")
    assert by_checkpoint.returncode == 0, by_checkpoint.stderr
    assert json.loads(by_checkpoint.stdout)["namespace"] == "signal-worker@5m"  # the default model's
    explicit = cli(own_redis.url, "show", "--symbol", "EURUSD", "--json", SIGNAL_WORKER_REDIS__NAMESPACE="fx-prod")
    assert json.loads(explicit.stdout)["window_key"] == "sw:fx-prod:{EURUSD}:w"


def test_unreachable_redis_and_bad_input_fail_with_one_line() -> None:
    down = cli(f"redis://127.0.0.1:{free_port()}/0", "show", "--symbol", "EURUSD", "--timeframe", "1h")
    assert down.returncode == 2
    assert down.stderr.startswith("signal-worker state: redis describe: unavailable")
    assert "Traceback" not in down.stderr
    bad = cli("redis://127.0.0.1:1/0", "show", "--symbol", "eur usd", "--timeframe", "1h")
    assert bad.returncode == 2 and "--symbol" in bad.stderr
    ns = cli("redis://127.0.0.1:1/0", "show", "--symbol", "EURUSD", "--timeframe", "1h",
             SIGNAL_WORKER_REDIS__NAMESPACE="a b")
    assert ns.returncode == 2 and "SIGNAL_WORKER_REDIS__NAMESPACE" in ns.stderr
