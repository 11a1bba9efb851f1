"""Kafka transport: typed wrappers over aiokafka that move bytes, nothing more."""

from worker.transport.broker import kafka_client_kwargs
from worker.transport.consumer import CandleConsumer, RebalanceCallback
from worker.transport.lag import compute_lag, total_lag
from worker.transport.producer import Headers, OutRecord, RecordProducer

__all__ = [
    "CandleConsumer",
    "Headers",
    "OutRecord",
    "RebalanceCallback",
    "RecordProducer",
    "compute_lag",
    "kafka_client_kwargs",
    "total_lag",
]
