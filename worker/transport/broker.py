"""What every Kafka client the worker creates shares: connection settings and the start/stop lifecycle."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from aiokafka import codec
from aiokafka.helpers import create_ssl_context

from worker.settings import KafkaSettings

__all__ = ["KafkaClient", "kafka_client_kwargs", "missing_codecs"]


class KafkaClient:
    """``start()`` / ``stop()``, and the same as an async context manager (``async with Client(...)``)."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def kafka_client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaConsumer``/``AIOKafkaProducer``/``AIOKafkaAdminClient``.

    With ``SSL``/``SASL_SSL`` and no ``ssl_cafile`` the system CA store verifies the broker;
    ``ssl_certfile``/``ssl_keyfile`` enable mutual TLS. SCRAM credentials travel in aiokafka's
    ``sasl_plain_*`` arguments, which it uses for every username/password mechanism.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()],
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    return kwargs


def missing_codecs() -> list[str]:
    """Compression codecs this process cannot decode. A producer may compress its batches with any
    of them (``compression.type``, per producer or topic); a fetch of a batch in a missing codec
    raises ``UnsupportedCodecError`` (not retriable) for good, so the worker checks at start-up
    instead of failing on the first such batch (and again after every restart)."""
    have = {"gzip": codec.has_gzip, "snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
    return [name for name, check in have.items() if not check()]
