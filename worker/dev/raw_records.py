"""Records that other Kafka clients write and aiokafka's own producer refuses to, for fault tests.

A record header's key is a string in the protocol, and aiokafka decodes it strictly as UTF-8 when it
reads a batch; a broker stores whatever a producer sent, so a librdkafka, Go or kcat producer with a
binary header name writes a record that aiokafka cannot read (``UnicodeDecodeError`` from
``getmany``). :func:`send_with_binary_header_key` writes one for real — valid batch, valid CRC — with
aiokafka's pure-Python batch builder, which encodes a header key by calling its ``encode``. Dev-only.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

__all__ = ["BINARY_HEADER_KEY", "send_with_binary_header_key"]

BINARY_HEADER_KEY = b"\xff\xfeid"  # not UTF-8


class _BinaryKey(str):
    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return BINARY_HEADER_KEY


async def send_with_binary_header_key(bootstrap: str, topic: str, value: bytes, *, key: bytes | None = None,
                                      partition: int | None = None) -> tuple[int, int]:
    """Produce one record whose only header's key is :data:`BINARY_HEADER_KEY`; (partition, offset).

    Swaps aiokafka's C batch builder (which insists on a plain ``str``) for its Python one in the
    producer's modules for the duration of the call: not safe beside other producers in the process."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer_module
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    saved = accumulator.DefaultRecordBatchBuilder, producer_module.DefaultRecordBatchBuilder
    accumulator.DefaultRecordBatchBuilder = producer_module.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    try:
        await producer.start()
        meta = await producer.send_and_wait(topic, value, key=key, partition=partition,
                                            headers=[(_BinaryKey("id"), b"1")])
    finally:
        await producer.stop()
        accumulator.DefaultRecordBatchBuilder, producer_module.DefaultRecordBatchBuilder = saved
    return int(meta.partition), int(meta.offset)
