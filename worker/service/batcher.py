"""Collects ready forecast jobs into micro-batches: up to ``max_size`` jobs, or whatever is ready
once the oldest has waited ``max_wait_ms``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_size: int, max_wait_ms: int) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        self._items.append((time.monotonic(), item))
        self._changed.set()

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out (and return) the queued items matching ``predicate`` — e.g. of revoked partitions."""
        kept: deque[tuple[float, T]] = deque()
        removed: list[T] = []
        for stamp, item in self._items:
            (removed.append(item) if predicate(item) else kept.append((stamp, item)))
        self._items = kept
        return removed

    def take_all(self) -> list[T]:
        items = [item for _, item in self._items]
        self._items.clear()
        return items

    async def next_batch(self) -> list[T]:
        """Wait for a batch: full, or the oldest item's wait is over."""
        while True:
            if len(self._items) >= self.max_size:
                return self._pop(self.max_size)
            if self._items:
                remaining = self._items[0][0] + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    return self._pop(self.max_size)
            else:
                remaining = None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)

    def _pop(self, n: int) -> list[T]:
        return [self._items.popleft()[1] for _ in range(min(n, len(self._items)))]
