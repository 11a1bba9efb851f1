"""The service CLI as a user runs it: ``signal-worker replay | tail | run | demo``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import decode_candle, encode_forecast
from schemas.headers import forecast_headers
from worker.cli.service_commands import SHIPPED_CANDLES
from worker.dev.embedded import EmbeddedBroker, create_topics
from worker.features.candles import CandleSeries, load_csv
from worker.model.forecaster import ForecastRequest
from worker.model.registry import CHECKPOINTS
from worker.service.engine import TrivialEngine
from worker.service.messages import forecast_message
from worker.settings import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIGNAL_WORKER = str(Path(sys.executable).parent / "signal-worker")
# The hourly checkpoint as first shipped: these tests replay hourly candles.
CHECKPOINT = Path(os.environ.get("SIGNAL_WORKER_TEST_CHECKPOINT") or CHECKPOINTS["eurusd-1h-v1"])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_WORKER_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIGNAL_WORKER, *args], env=env or cli_env(), cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)


async def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 60) -> list:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: list = []  # type: ignore[type-arg]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < n:
            assert asyncio.get_running_loop().time() < deadline, f"{len(out)} of {n} records on {topic}"
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


async def test_replay_publishes_the_csv(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("replay")
    await create_topics(broker.bootstrap, {topic: 1})
    result = await asyncio.to_thread(run_cli, "replay", "--candles", str(SHIPPED_CANDLES), "--symbol", "EURUSD",
                                     "--limit", "50", "--bootstrap", broker.bootstrap, "--topic", topic)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"published": 50, "topic": topic, "symbol": "EURUSD", "timeframe": "1h"}

    records = await read_topic(broker.bootstrap, topic, 50)
    assert len(records) == 50
    series = load_csv(SHIPPED_CANDLES)[:50]
    for rec, t, row in zip(records, series.open_time, series.ohlcv, strict=True):
        candle = decode_candle(rec.value, timeframe="1h", key=rec.key)  # valid for a 1h worker
        assert rec.key == b"EURUSD"
        assert candle.is_final and candle.open_time == int(t)
        assert [candle.open, candle.high, candle.low, candle.close, candle.volume] == row.tolist()


async def test_tail_prints_readable_rows(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("fc")
    await create_topics(broker.bootstrap, {topic: 1})
    series = load_csv(SHIPPED_CANDLES)[:20]
    engine = TrivialEngine(timeframe_ms=3_600_000, horizons_ms=[3_600_000, 14_400_000])
    requests = [ForecastRequest("EURUSD", CandleSeries(series.open_time[: i + 1], series.ohlcv[: i + 1]))
                for i in range(8, 14)]
    forecasts = engine.process(requests).forecasts
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for fc in forecasts:
            msg = forecast_message(fc, timeframe="1h", timeframe_ms=3_600_000, ingest_ms=fc.open_time + 3_600_000,
                                   publish_ms=fc.open_time + 3_600_250, worker_id="cli-test")
            await producer.send_and_wait(topic, encode_forecast(msg), key=b"EURUSD", headers=forecast_headers(msg))
    finally:
        await producer.stop()

    result = await asyncio.to_thread(run_cli, "tail", "--bootstrap", broker.bootstrap, "--topic", topic,
                                     "--from-beginning", "--limit", "5")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 5
    for row, fc in zip(rows, forecasts, strict=False):
        assert "EURUSD" in row
        assert f"close={fc.close:.5f}" in row
        assert re.search(r"\| +1h mean=", row) and re.search(r"\| +4h mean=", row)
        assert "P(up)=" in row and "q05..q95=" in row and "250ms" in row
        assert row.startswith("2017-01-")


def test_bad_config_exits_nonzero_naming_the_variable() -> None:
    result = run_cli("run", env=cli_env(SIGNAL_WORKER_BATCH__MAX_SIZE="0"), timeout=60)
    assert result.returncode != 0
    assert "SIGNAL_WORKER_BATCH__MAX_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_and_prints_forecasts() -> None:
    # The demo serves the default (5-minute) checkpoint with no checkpoint setting, as a user runs it.
    assert DEFAULT_CHECKPOINT.is_dir()
    env = cli_env(SIGNAL_WORKER_SAMPLING__TORCH_THREADS="1", OMP_NUM_THREADS="1")
    result = run_cli("demo", "--duration", "60", "--simulated", "1", "--bars", "200", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "P(up)=" in line]
    assert rows, result.stdout[-3000:]
    assert {s for s in ("EURUSD", "SIM1") if any(s in r for r in rows)} == {"EURUSD", "SIM1"}
    stopped = re.search(r"stopped cleanly: (\d+) forecasts published, exit code (-?\d+)", result.stdout)
    assert stopped, result.stdout[-2000:]
    assert int(stopped.group(1)) >= len(rows) > 0
    assert stopped.group(2) == "0"


def test_settle_heap_hides_startup_objects_from_the_collector() -> None:
    import gc

    from worker.cli.service_commands import settle_heap

    threshold = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # modules, torch, the interpreter's own objects
        assert gc.get_threshold() == (10_000, 2, 5)
        cycle: list[object] = []
        cycle.append(cycle)  # garbage made after settling is still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_bench_io_only_runs_the_worker_in_its_own_process_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    result = run_cli("bench", "--io-only", "--symbols", "3", "--bars", "12", "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(out.read_text().splitlines()[-1])
    assert doc["worker"] == "own process" and doc["worker_exit_code"] == 0  # drained and stopped on SIGTERM
    assert doc["forecasts"] == 3 * (12 + 1)  # every bar from the engine's 8th on, nothing more
    assert doc["throughput_candles_per_s"] > 0 and 0 <= doc["worker_cpu_fraction"] <= 2  # 10 ms CPU ticks
    assert doc["machine"]["cpu_count"] >= 1 and len(doc["rss_mb"]) >= 1
