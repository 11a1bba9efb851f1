"""EmbeddedBroker and create_topics against the real Tansu binary."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from worker.dev.embedded import EmbeddedBroker, create_topics

pytestmark = pytest.mark.integration


async def test_create_topics_is_idempotent(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    a, b = topic_factory("a"), topic_factory("b")
    await create_topics(broker.bootstrap, {a: 3, b: 1})
    await create_topics(broker.bootstrap, {a: 3})
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics([a, b])}
    finally:
        await admin.close()
    assert described == {a: 3, b: 1}


def test_restart_keeps_the_address() -> None:
    with EmbeddedBroker() as own:
        bootstrap = own.bootstrap
        pid = own._process.pid if own._process else None
        own.stop()
        assert not own.is_running()
        own.stop()  # idempotent
        own.start()
        assert own.bootstrap == bootstrap
        assert own._process is not None and own._process.pid != pid
    assert not own.is_running()
