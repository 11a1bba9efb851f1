"""Worker state in Redis: per-symbol rolling candle windows and forecast watermarks."""

from worker.state.connection import make_redis
from worker.state.windows import CandleRow, WindowSnapshot, WindowStore

__all__ = ["CandleRow", "WindowSnapshot", "WindowStore", "make_redis"]
