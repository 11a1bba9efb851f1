from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from worker.observability import Metrics

EXPECTED = {
    "signal_worker_candles_total",
    "signal_worker_forecasts_total",
    "signal_worker_dead_letters_total",
    "signal_worker_conflated_total",
    "signal_worker_skipped_total",
    "signal_worker_late_candles_total",
    "signal_worker_batch_size_bucket",
    "signal_worker_sampling_seconds_bucket",
    "signal_worker_end_to_end_seconds_bucket",
    "signal_worker_consumer_lag",
    "signal_worker_redis_errors_total",
    "signal_worker_broker_errors_total",
    "signal_worker_batches_in_flight",
    "signal_worker_paused_partitions",
    "signal_worker_online_crps",
    "signal_worker_online_coverage",
    "signal_worker_online_scored_total",
    "signal_worker_ready",
    "signal_worker_model_info",
}


def _exercise(m: Metrics) -> None:
    m.candles_in.labels(kind="final").inc()
    m.forecasts_out.inc(3)
    m.dead_letters.labels(reason="schema").inc()
    m.conflated.inc()
    m.skipped.labels(reason="insufficient_history").inc()
    m.late.inc()
    m.batch_size.observe(17)
    m.sampling_seconds.observe(0.3)
    m.end_to_end_seconds.observe(1.2)
    m.consumer_lag.labels(topic="candles", partition="0").set(42)
    m.redis_errors.inc()
    m.broker_errors.inc()
    m.batches_in_flight.set(2)
    m.paused_partitions.set(1)
    m.online_crps.labels(horizon="1h").set(0.0004)
    m.online_coverage.labels(horizon="1h", interval="90").set(0.88)
    m.online_scored.labels(horizon="1h").inc()
    m.set_ready(True)
    m.set_model_info(
        model_version="abc123", scheduler="dpmpp", steps=10, samples=64, device="cpu", timeframe="1h",
        calibrated_for="dpmpp 10 steps",
    )


def test_every_metric_is_exposed_with_its_exact_name() -> None:
    m = Metrics()
    _exercise(m)
    text = generate_latest(m.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert not EXPECTED - names, EXPECTED - names
    assert 'signal_worker_candles_total{kind="final"} 1.0' in text
    assert 'signal_worker_candles_total{kind="partial"} 0.0' in text  # pre-initialised
    assert 'signal_worker_consumer_lag{partition="0",topic="candles"} 42.0' in text
    assert 'model_version="abc123"' in text and 'steps="10"' in text
    assert "signal_worker_ready 1.0" in text


def test_batch_size_buckets() -> None:
    m = Metrics()
    m.batch_size.observe(3)
    text = generate_latest(m.registry).decode()
    for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0", "+Inf"):
        assert f'signal_worker_batch_size_bucket{{le="{le}"}}' in text


def test_instances_are_isolated_unless_sharing_a_registry() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.forecasts_out.inc()
    assert b.registry.get_sample_value("signal_worker_forecasts_total") == 0.0
    registry = CollectorRegistry()
    c = Metrics(registry)
    assert c.registry is registry
    c.set_ready(False)
    assert registry.get_sample_value("signal_worker_ready") == 0.0
