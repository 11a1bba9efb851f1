"""Record producer: a thin typed wrapper over ``AIOKafkaProducer`` for forecasts and dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata

from worker.settings import KafkaSettings
from worker.transport.broker import KafkaClient, kafka_client_kwargs

__all__ = ["Headers", "OutRecord", "RecordProducer"]

Headers = Sequence[tuple[str, bytes]]


class OutRecord(NamedTuple):
    """One record for :meth:`RecordProducer.send_many`; keyed, or ``None`` (then partition 0)."""

    key: bytes | None
    value: bytes
    headers: Headers


@lru_cache(maxsize=65_536)
def _partition_index(key: bytes, partitions: int) -> int:
    # The Java client's (and aiokafka's) default partitioner: murmur2 of the key, sign bit cleared.
    # Cached because keys are symbols: few, and each seen on every bar.
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class RecordProducer(KafkaClient):
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
            # One micro-batch of forecasts per partition usually fits one record batch (Kafka's
            # default message.max.bytes is ~1 MiB).
            "max_batch_size": min(512 * 1024, settings.max_request_bytes),
            # Checked against the largest dead letter at start-up (settings), so every dead
            # letter fits one request.
            "max_request_size": settings.max_request_bytes,
            **overrides,
        }
        self._producer = AIOKafkaProducer(**kwargs)
        self.max_request_bytes: int = kwargs.get("max_request_size", settings.max_request_bytes)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        """Flush what is buffered, then close."""
        await self._producer.stop()

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

    async def send_many(self, topic: str, records: Sequence[OutRecord]) -> list[asyncio.Future[Any]]:
        """:meth:`send_batches` without the records of each batch."""
        return [future for future, _ in await self.send_batches(topic, records)]

    async def send_batches(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[asyncio.Future[Any], list[OutRecord]]]:
        """Queue keyed records as one record batch per partition; return each batch's ack future
        with the records it carries (what to resend if it fails).

        Each key goes to the partition :meth:`send` would choose (the default partitioner), and
        records keep their order within a partition. Far cheaper per record than :meth:`send`,
        which pays for a future, a partitioner call and an accumulator lookup each. A future
        failing fails every record of its batch. Awaiting this call waits for the topic's metadata
        and for room in the producer's queue.
        """
        partitions = sorted(await self._producer.partitions_for(topic))
        by_partition: dict[int, list[OutRecord]] = {}
        for rec in records:
            # What send() checks per record, and a batch of one would slip past: the broker would
            # refuse it anyway (message.max.bytes), so say so now, naming the size.
            size = len(rec.value) + len(rec.key or b"") + sum(len(k) + len(v) for k, v in rec.headers) + 64
            if size > self.max_request_bytes:
                raise MessageSizeTooLargeError(
                    f"a record of about {size} bytes exceeds max_request_size={self.max_request_bytes}")
            p = partitions[0] if rec.key is None else partitions[_partition_index(rec.key, len(partitions))]
            bucket = by_partition.get(p)
            if bucket is None:
                bucket = by_partition[p] = []
            bucket.append(rec)
        futures: list[tuple[asyncio.Future[Any], list[OutRecord]]] = []
        for p, bucket in by_partition.items():
            batch = self._producer.create_batch()
            held: list[OutRecord] = []
            for rec in bucket:
                if batch.append(key=rec.key, value=rec.value, timestamp=None, headers=list(rec.headers)) is None:
                    batch.close()
                    futures.append((await self._producer.send_batch(batch, topic, partition=p), held))
                    batch, held = self._producer.create_batch(), []
                    if batch.append(key=rec.key, value=rec.value, timestamp=None, headers=list(rec.headers)) is None:
                        raise MessageSizeTooLargeError(f"a record of {len(rec.value)} bytes does not fit a batch")
                held.append(rec)
            # Closed: ready to send now; all its records are here, lingering would only add latency.
            batch.close()
            futures.append((await self._producer.send_batch(batch, topic, partition=p), held))
        return futures

    async def probe(self, timeout_s: float) -> None:
        """One metadata round trip to a broker: raises if none answers within ``timeout_s``.

        The producer's cached metadata would say nothing about a broker that went away; this asks.
        """
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout=timeout_s)

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged or has failed."""
        await self._producer.flush()
