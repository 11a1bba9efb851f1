"""Prometheus metrics of the worker, all on one :class:`CollectorRegistry`.

Each :class:`Metrics` gets its own registry unless one is passed, so tests never collide
with each other or with the process-global default registry. ``docs/operations.md`` explains
what each series means and which alerts to set on them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CANDLE_KINDS",
    "END_TO_END_BUCKETS",
    "SAMPLING_BUCKETS",
    "Metrics",
]

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SAMPLING_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
END_TO_END_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
CANDLE_KINDS: tuple[str, ...] = ("final", "partial")


class Metrics:
    """Every metric the worker exports. Attribute names are what the service code uses."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # Throughput.
        self.candles_in = Counter(
            "signal_worker_candles_total", "Candle events accepted, by kind.", ["kind"], registry=r
        )
        self.forecasts_out = Counter(
            "signal_worker_forecasts_total", "Forecasts published and acknowledged.", registry=r
        )
        self.dead_letters = Counter(
            "signal_worker_dead_letters_total",
            "Input records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.conflated = Counter(
            "signal_worker_conflated_total",
            "Ready bars superseded by a newer bar of the same symbol in one batch (backlog).",
            registry=r,
        )
        self.skipped = Counter(
            "signal_worker_skipped_total",
            "Bars not forecast, by reason (e.g. too little history, too many gaps).",
            ["reason"],
            registry=r,
        )
        self.late = Counter(
            "signal_worker_late_candles_total",
            "Late or duplicate candles for bars older than the newest one seen.",
            registry=r,
        )

        # Sampling and latency.
        self.batch_size = Histogram(
            "signal_worker_batch_size",
            "Symbols per sampled micro-batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.sampling_seconds = Histogram(
            "signal_worker_sampling_seconds",
            "Wall time of one batch's diffusion sampling.",
            buckets=SAMPLING_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "signal_worker_end_to_end_seconds",
            "From the candle record's Kafka timestamp to the forecast being acknowledged by the broker.",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )

        # Input and back-pressure.
        self.consumer_lag = Gauge(
            "signal_worker_consumer_lag",
            "Records between the partition's high watermark and this consumer's position.",
            ["topic", "partition"],
            registry=r,
        )
        self.batches_in_flight = Gauge(
            "signal_worker_batches_in_flight", "Batches sampling right now.", registry=r
        )
        self.paused_partitions = Gauge(
            "signal_worker_paused_partitions",
            "Assigned partitions paused for back-pressure or while Redis is unavailable.",
            registry=r,
        )
        self.quarantined_symbols = Gauge(
            "signal_worker_quarantined_symbols",
            "Symbols whose bars are skipped right now because their Redis keys are unusable.",
            registry=r,
        )

        # Dependencies.
        self.redis_errors = Counter(
            "signal_worker_redis_errors_total", "Failed Redis operations (each retry counts).", registry=r
        )
        self.broker_errors = Counter(
            "signal_worker_broker_errors_total",
            "Failed Kafka operations: fetch, produce, commit (each retry counts).",
            registry=r,
        )

        # Online calibration: forecasts scored as their horizons realise.
        self.online_crps = Gauge(
            "signal_worker_online_crps",
            "Running mean CRPS of realised forecasts, by horizon (lower is better).",
            ["horizon"],
            registry=r,
        )
        self.online_coverage = Gauge(
            "signal_worker_online_coverage",
            "Running share of realised values inside the central prediction interval, "
            "by horizon and nominal interval in percent.",
            ["horizon", "interval"],
            registry=r,
        )
        self.online_scored = Counter(
            "signal_worker_online_scored_total",
            "Forecasts scored online, by horizon.",
            ["horizon"],
            registry=r,
        )

        # State.
        self.ready = Gauge("signal_worker_ready", "1 while /readyz reports ready, else 0.", registry=r)
        self.model = Info("signal_worker_model", "The loaded checkpoint and sampler.", registry=r)

        # Export the known label values at 0 so rate() works from the first scrape.
        for kind in CANDLE_KINDS:
            self.candles_in.labels(kind=kind)

    def set_model_info(
        self,
        *,
        model_version: str,
        scheduler: str,
        steps: int,
        samples: int,
        device: str,
        timeframe: str,
        calibrated_for: str,
    ) -> None:
        """Publish ``signal_worker_model_info{model_version=...,...} 1``. ``calibrated_for``: the
        sampler setting the checkpoint's calibration was fitted with ("dpmpp 10 steps"), or
        "uncalibrated"; beside ``scheduler`` and ``steps`` it shows a pod serving another one."""
        self.model.info(
            {
                "model_version": model_version,
                "scheduler": scheduler,
                "steps": str(steps),
                "samples": str(samples),
                "device": device,
                "timeframe": timeframe,
                "calibrated_for": calibrated_for,
            }
        )

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)
