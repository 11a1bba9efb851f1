"""Structs that flow through the service: fetched candles, forecast jobs, and the trigger plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from aiokafka import TopicPartition

from schemas import CandleFields
from worker.features.candles import CandleSeries

Offset = tuple[TopicPartition, int]


class Received(NamedTuple):
    """A valid final candle and where it came from."""

    candle: CandleFields
    tp: TopicPartition
    offset: int
    ingest_ms: int  # the record's Kafka timestamp (when the feed published the bar), else arrival time
    generation: int  # the partition's assignment generation it was fetched under (see ledger)


@dataclass(slots=True)
class ForecastJob:
    symbol: str
    open_time: int
    ingest_ms: int
    offsets: list[Offset]  # completed when this job's forecast is acknowledged
    candles: CandleSeries | None = None  # the window up to and including the origin bar
    generation: int = 0  # the partition's assignment generation (see ledger): stale once revoked

    @property
    def partitions(self) -> set[TopicPartition]:
        return {tp for tp, _ in self.offsets}


@dataclass
class TriggerPlan:
    jobs: list[ForecastJob] = field(default_factory=list)
    late: list[Received] = field(default_factory=list)  # older than a bar already seen or forecast
    conflated: int = 0  # bars superseded by a newer bar of the same symbol in this batch
