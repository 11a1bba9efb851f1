"""Logging, Prometheus metrics and the health/metrics HTTP server."""

from worker.observability.health import HealthServer, Readiness
from worker.observability.logging import configure_logging, get_logger
from worker.observability.metrics import Metrics

__all__ = ["HealthServer", "Metrics", "Readiness", "configure_logging", "get_logger"]
