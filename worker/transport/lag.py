"""Consumer lag arithmetic, kept apart from the client so it is testable without a broker."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import TopicPartition

__all__ = ["compute_lag", "total_lag"]


def compute_lag(
    highwater: Mapping[TopicPartition, int | None], position: Mapping[TopicPartition, int | None]
) -> dict[TopicPartition, int]:
    """Records not yet handed to the application, per partition: ``highwater - position``.

    Partitions missing either number (not fetched yet, or revoked meanwhile) are left out rather
    than reported as zero, so a gauge does not claim "caught up" when it simply does not know.
    A position past the highwater (the highwater is refreshed only by fetches) counts as zero.
    """
    lags: dict[TopicPartition, int] = {}
    for tp, hw in highwater.items():
        pos = position.get(tp)
        if hw is None or pos is None:
            continue
        lags[tp] = max(0, hw - pos)
    return lags


def total_lag(lags: Mapping[TopicPartition, int]) -> int:
    return sum(lags.values())
