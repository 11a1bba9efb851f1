"""Record producer: a thin typed wrapper over ``AIOKafkaProducer`` for forecasts and dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from worker.settings import KafkaSettings
from worker.transport.broker import kafka_client_kwargs

__all__ = ["Headers", "RecordProducer"]

Headers = Sequence[tuple[str, bytes]]


class RecordProducer:
    """``acks="all"``, no compression, a few ms of linger so a burst of forecasts shares requests.

    Delivery is at-least-once: a retried send after a lost ack can duplicate a record, so
    consumers of the output topic deduplicate (forecasts carry symbol + bar open time).
    Idempotence and transactions would remove those duplicates on real Kafka, but Tansu (the
    embedded test broker) fails InitProducerId, so both stay off; ``overrides`` can turn
    ``enable_idempotence`` on for a real cluster.
    """

    def __init__(self, settings: KafkaSettings, *, linger_ms: int = 5, **overrides: Any) -> None:
        kwargs: dict[str, Any] = {
            **kafka_client_kwargs(settings),
            "acks": "all",
            "enable_idempotence": False,
            "compression_type": None,
            "linger_ms": linger_ms,
            **overrides,
        }
        self._producer = AIOKafkaProducer(**kwargs)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        """Flush what is buffered, then close."""
        await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Queue one record; return the future of its acknowledgement.

        Awaiting this call only waits for buffer space (back-pressure); await the returned
        future, or ``asyncio.gather`` many, to know the broker has the records.
        """
        future: asyncio.Future[RecordMetadata] = await self._producer.send(
            topic,
            value,
            key=key,
            headers=list(headers) if headers else None,
            partition=partition,
            timestamp_ms=timestamp_ms,
        )
        return future

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged or has failed."""
        await self._producer.flush()
