"""Worker state in Redis: per-symbol rolling candle windows and forecast watermarks."""

from worker.state.connection import make_redis
from worker.state.keys import KeyLayout, deployment_namespace
from worker.state.windows import (
    ApplyResult,
    BatchResult,
    CandleRow,
    EpochClaim,
    MarkResult,
    SymbolState,
    WindowSnapshot,
    WindowStore,
)

__all__ = [
    "ApplyResult",
    "BatchResult",
    "CandleRow",
    "EpochClaim",
    "KeyLayout",
    "MarkResult",
    "SymbolState",
    "WindowSnapshot",
    "WindowStore",
    "deployment_namespace",
    "make_redis",
]
