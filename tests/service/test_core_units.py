"""The service core's small objects: the retry policy and the ledger's fencing (no broker needed)."""

from __future__ import annotations

from collections import Counter

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)

from worker.errors import ConfigError, PublishFailed, StateMisconfigured, StateUnavailable, SymbolStateCorrupt
from worker.service.jobs import ForecastJob
from worker.service.ledger import SymbolLedger
from worker.service.retry import Backoff, is_retriable

TP0 = TopicPartition("candles", 0)
TP1 = TopicPartition("candles", 1)


@pytest.mark.parametrize(("exc", "retriable"), [
    (KafkaTimeoutError(), True),  # a produce batch expired after request_timeout_ms: an outage
    (RequestTimedOutError(), True),
    (KafkaConnectionError(), True),
    (NotLeaderForPartitionError(), True),
    (MessageSizeTooLargeError(), False),
    (TopicAuthorizationFailedError(), False),
    (StateUnavailable("x"), True),
    (StateMisconfigured("x"), False),
    (SymbolStateCorrupt("S", "wrongtype", "x"), False),
    (PublishFailed("x"), False),
    (ConfigError("x"), False),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (ValueError(), False),
])
def test_one_retry_policy_reads_the_errors_own_flag(exc: BaseException, retriable: bool) -> None:
    assert is_retriable(exc) is retriable


def test_backoff_grows_to_its_ceiling_and_resets() -> None:
    b = Backoff(max_s=1.0, initial_s=0.1)
    delays = [b.next_delay() for _ in range(8)]
    assert 0.08 <= delays[0] <= 0.1 and all(0.8 <= d <= 1.0 for d in delays[4:])
    b.reset()
    assert b.next_delay() <= 0.1


def _job(symbol: str, t: int, tp: TopicPartition, gen: int) -> ForecastJob:
    return ForecastJob(symbol, t, 0, [(tp, t)], generation=gen)


def test_the_ledger_fences_work_of_revoked_partitions() -> None:
    ledger = SymbolLedger()
    ledger.assign([TP0, TP1])
    g0 = ledger.generation(TP0)
    assert g0 is not None and ledger.owns(TP0, g0)
    ledger.bind("AAA", TP0)
    ledger.bind("BBB", TP1)
    ledger.newest_seen.update({"AAA": 5, "BBB": 7})
    old = _job("AAA", 5, TP0, g0)
    assert ledger.revoke([TP0]) == {"AAA"}
    assert "AAA" not in ledger.newest_seen and ledger.newest_seen == {"BBB": 7}
    # A job planned before the revoke neither marks a watermark nor brings the symbol back ...
    assert ledger.release([old], [old]) == {}
    ledger.assign([TP0])
    g0b = ledger.generation(TP0)
    assert g0b is not None and g0b != g0
    # ... not even once the partition came back: the new assignment is another generation.
    assert not ledger.owns_job(old)
    assert ledger.release([old], [old]) == {}


def test_the_watermark_stays_below_the_oldest_open_job() -> None:
    ledger = SymbolLedger()
    ledger.assign([TP0])
    gen = ledger.generation(TP0)
    assert gen is not None
    ledger.bind("AAA", TP0)
    j1, j2 = _job("AAA", 100, TP0, gen), _job("AAA", 200, TP0, gen)
    for j in (j1, j2):
        ledger._open_jobs.setdefault("AAA", Counter())[j.open_time] += 1
    assert ledger.release([j2], [j2]) == {"AAA": 99}  # bar 100 still sampling
    assert ledger.release([j1], [j1]) == {"AAA": 200}


def test_state_epoch_notices_a_lost_state_once_and_rebuilds_before_writing() -> None:
    from worker.service.restore import StateEpoch

    e = StateEpoch()
    e.started("t1", created=False)  # the marker was there: the state survived
    assert not e.due and e.seen("t1")
    assert not e.seen(None) and e.due and e.lost  # an apply read no marker: Redis came back empty
    assert not e.seen("t2") and e.due  # still due (another replica already wrote a new marker)
    assert e.needs_rebuild("t2", created=False)  # lost: rebuild even though the marker exists now
    e.rebuilt()
    assert not e.due and e.seen("t2")

    fresh = StateEpoch()
    fresh.unknown()  # Redis unreachable at start-up
    assert fresh.due and not fresh.needs_rebuild("t3", created=False)  # it kept its state after all
    assert fresh.needs_rebuild("t4", created=True)


class _RefusingBroker:
    """The one call Checkpoint makes, failing as a consumer's commit does while the broker refuses
    connections (the policy under test is when to ask again, not Kafka)."""

    def __init__(self) -> None:
        self.refusing = True
        self.calls = 0

    async def commit(self, offsets: object) -> None:
        self.calls += 1
        if self.refusing:
            raise ConnectionRefusedError("broker away")


async def test_failed_commits_back_off_and_the_next_success_resets_the_pace() -> None:
    import asyncio

    from worker.observability.metrics import Metrics
    from worker.service.checkpoint import Checkpoint

    cp = Checkpoint(Metrics(), interval_s=0.01, max_backoff_s=0.2)
    broker = _RefusingBroker()
    cp.register(TP0, 5)
    cp.done(TP0, 5)
    deadline = asyncio.get_running_loop().time() + 1.0
    while asyncio.get_running_loop().time() < deadline:
        await cp.maybe_commit(broker, {TP0})  # type: ignore[arg-type]
        await asyncio.sleep(0.002)
    # Without the backoff: one try per 10 ms interval (~100). With it: 10, 20, 40, 80, 160, 200, ... ms.
    assert 5 <= broker.calls <= 12, broker.calls
    assert cp.failures == broker.calls and cp.tracker.committable() == {TP0: 6}  # nothing lost
    broker.refusing = False
    await asyncio.sleep(0.25)
    await cp.maybe_commit(broker, {TP0})  # type: ignore[arg-type]
    assert cp.failures == 0 and cp.tracker.committable() == {}
    # A revoke or shutdown commits at once, whatever the pace.
    cp.register(TP0, 6)
    cp.done(TP0, 6)
    assert await cp.commit(broker, {TP0})  # type: ignore[arg-type]


@pytest.mark.parametrize("grace_s", [2.0, 30.0, 120.0])
async def test_the_group_waits_for_a_whole_revoke_before_moving_partitions(grace_s: float) -> None:
    """The revoke may take the grace (batches still sampling) plus a commit (request timeout).
    With aiokafka's default rebalance timeout (the 10 s session timeout) Kafka moved the partitions
    while this member's batches still published, and its late rejoin cost a second rebalance."""
    from worker.service.app import SignalWorker
    from worker.settings import load_settings

    from .conftest import trivial_engine

    settings = load_settings(service={"shutdown_grace_s": grace_s, "metrics_port": 0},
                             kafka={"request_timeout_ms": 15_000})
    w = SignalWorker(settings, trivial_engine())
    try:
        timeout_ms = w.consumer._consumer._rebalance_timeout_ms  # what aiokafka sends in JoinGroup
        assert timeout_ms >= grace_s * 1000 + 15_000
        assert timeout_ms >= settings.kafka.session_timeout_ms
    finally:
        await w.consumer.stop()
        await w.producer.stop()


def test_a_rebuild_ignores_an_anchor_stamped_after_the_clock() -> None:
    """A last record stamped in µs (or by a clock far ahead): looking a window back from it, Kafka's
    time index finds only that record, and the rebuild would read back one bar."""
    from worker.service.restore import lookup_time

    now, lookback = 1_800_000_000_000, 65 * 300_000
    assert lookup_time(now - 1000, lookback, now) == now - 1000 - lookback
    assert lookup_time(now, lookback, now) == now - lookback
    assert lookup_time(now * 1000, lookback, now) is None  # µs
    assert lookup_time(now + 1, lookback, now) is None
    assert lookup_time(None, lookback, now) is None
    assert lookup_time(1000, lookback, now) == 0
