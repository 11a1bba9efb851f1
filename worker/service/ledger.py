"""What the worker knows about each partition it owns and each symbol it serves, in one place.

aiokafka keeps one ``TopicPartitionState`` per assigned partition; the service keeps its own beside
it, so that the questions a rebalance raises have one answer each:

* **Is this work still mine?** Every assignment of a partition gets a new *generation*. A record,
  a forecast job and a window write carry the generation they were fetched under; once the
  partition is revoked (or revoked and assigned again), :meth:`SymbolLedger.owns` is false for
  them and their results are dropped: no publish, no watermark, no per-symbol state refilled for a
  partition another replica now serves.
* **What may the watermark cover?** Per symbol: the open times of its jobs queued or sampling and
  the newest bar forecast. The watermark may only cover bars below the oldest open job, so a
  replay after a crash does not take an unfinished older bar for a late one.
* **What happens to a symbol when its partition goes?** :meth:`SymbolLedger.revoke` forgets it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from worker.service.jobs import ForecastJob, Received, TriggerPlan
from worker.service.triggers import plan_triggers
from worker.state.windows import WindowSnapshot

__all__ = ["PartitionState", "SymbolLedger"]


@dataclass(slots=True)
class PartitionState:
    generation: int
    symbols: set[str] = field(default_factory=set)
    applied_upto: int | None = None  # one past the highest offset whose window write succeeded
    last_timestamp: int | None = None  # that record's Kafka timestamp (ms; arrival time if it had none)


class SymbolLedger:
    def __init__(self) -> None:
        self._generations = itertools.count(1)
        self._partitions: dict[TopicPartition, PartitionState] = {}
        # Per symbol, flat dicts rather than one object per symbol: they are read for every candle.
        self.newest_seen: dict[str, int] = {}
        self._open_jobs: dict[str, Counter[int]] = {}
        self._forecast_upto: dict[str, int] = {}
        self._partition_of: dict[str, TopicPartition] = {}
        self.quarantined: dict[str, float] = {}  # symbol -> monotonic time until which its bars are skipped

    # -- partitions -----------------------------------------------------------------------
    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self._partitions:
                self._partitions[tp] = PartitionState(next(self._generations))

    def revoke(self, partitions: Iterable[TopicPartition]) -> set[str]:
        """Forget the partitions and every symbol they carried; returns those symbols."""
        symbols: set[str] = set()
        for tp in partitions:
            st = self._partitions.pop(tp, None)
            if st is not None:
                symbols |= st.symbols
        for s in symbols:
            self.newest_seen.pop(s, None)
            self._open_jobs.pop(s, None)
            self._forecast_upto.pop(s, None)
            self._partition_of.pop(s, None)
            self.quarantined.pop(s, None)
        return symbols

    def owned(self) -> frozenset[TopicPartition]:
        return frozenset(self._partitions)

    def generation(self, tp: TopicPartition) -> int | None:
        st = self._partitions.get(tp)
        return None if st is None else st.generation

    def owns(self, tp: TopicPartition, generation: int) -> bool:
        st = self._partitions.get(tp)
        return st is not None and st.generation == generation

    def owns_job(self, job: ForecastJob) -> bool:
        return self.owns(job.offsets[0][0], job.generation)

    def partition_state(self, tp: TopicPartition) -> PartitionState | None:
        return self._partitions.get(tp)

    def applied(self, received: Sequence[Received]) -> None:
        """Record how far each partition's window writes went (for a rebuild after a state loss)."""
        for r in received:
            st = self._partitions.get(r.tp)
            if st is None or st.generation != r.generation:
                continue
            if st.applied_upto is None or r.offset + 1 > st.applied_upto:
                st.applied_upto = r.offset + 1
                st.last_timestamp = r.ingest_ms

    # -- symbols --------------------------------------------------------------------------
    def bind(self, symbol: str, tp: TopicPartition) -> None:
        """``symbol`` arrives on ``tp`` (keys are symbols, so one partition per symbol)."""
        if self._partition_of.get(symbol) != tp:
            old = self._partition_of.get(symbol)
            if old is not None and old in self._partitions:
                self._partitions[old].symbols.discard(symbol)
            self._partition_of[symbol] = tp
            st = self._partitions.get(tp)
            if st is not None:
                st.symbols.add(symbol)

    def quarantine(self, symbol: str, until: float) -> bool:
        """Skip ``symbol``'s bars until the monotonic time ``until``; True if it was not quarantined."""
        first = symbol not in self.quarantined
        self.quarantined[symbol] = until
        return first

    def quarantined_count(self, now: float) -> int:
        """Symbols quarantined at ``now`` (an expired entry no longer counts, even before its next bar)."""
        return sum(1 for until in tuple(self.quarantined.values()) if now < until)

    def is_quarantined(self, symbol: str, now: float) -> bool:
        """Whether ``symbol`` is quarantined at ``now``; an expired quarantine ends here, so the next
        write tells whether the keys are usable again (an operator may have reset them)."""
        until = self.quarantined.get(symbol)
        if until is None:
            return False
        if now < until:
            return True
        del self.quarantined[symbol]
        return False

    def plan(self, received: Sequence[Received], snapshots: Mapping[str, WindowSnapshot], *,
             conflate: bool) -> TriggerPlan:
        """Which of the written candles to forecast; the jobs are opened (see :meth:`release`)."""
        plan = plan_triggers(received, snapshots, self.newest_seen, conflate=conflate)
        for job in plan.jobs:
            open_times = self._open_jobs.get(job.symbol)
            if open_times is None:
                open_times = self._open_jobs[job.symbol] = Counter()
            open_times[job.open_time] += 1
        return plan

    def release(self, jobs: Iterable[ForecastJob], done: Iterable[ForecastJob]) -> dict[str, int]:
        """Close finished (or abandoned) jobs; return the watermark each touched symbol may have now.

        Jobs of partitions no longer owned are ignored: their symbols were forgotten at the revoke
        and must not be brought back.
        """
        touched: set[str] = set()
        for j in jobs:
            if not self.owns_job(j):
                continue
            touched.add(j.symbol)
            open_times = self._open_jobs.get(j.symbol)
            if open_times is not None:
                open_times[j.open_time] -= 1
                if open_times[j.open_time] <= 0:
                    del open_times[j.open_time]
                if not open_times:
                    del self._open_jobs[j.symbol]
        for j in done:
            if self.owns_job(j) and j.open_time > self._forecast_upto.get(j.symbol, -1):
                self._forecast_upto[j.symbol] = j.open_time
        marks: dict[str, int] = {}
        for symbol in touched:
            upto = self._forecast_upto.get(symbol)
            if upto is None:
                continue
            open_times = self._open_jobs.get(symbol)
            if open_times:
                upto = min(upto, min(open_times) - 1)
            marks[symbol] = upto
        return marks

    def open_jobs(self) -> int:
        return sum(sum(c.values()) for c in self._open_jobs.values())
