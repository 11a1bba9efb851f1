"""``signal-worker state show|reset --symbol S``: inspect or clear one symbol's window and watermark.

Both act on this deployment's namespace only (the same ``SIGNAL_WORKER_*`` settings as ``run``,
so the same keys), through :class:`~worker.state.WindowStore`, never raw Redis commands. ``reset``
asks nothing (it runs in scripts and ``kubectl exec``) but refuses without ``--yes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.candle import SYMBOL_PATTERN
from schemas.timeframe import format_duration
from worker.errors import ConfigError
from worker.features.candles import iso
from worker.settings import Settings, load_settings
from worker.state import SymbolState, WindowStore, make_redis

__all__ = ["HANDLERS", "format_state"]

def _timeframe(settings: Settings, given: str | None) -> str:
    if given:
        return given
    if settings.window.timeframe:
        return settings.window.timeframe
    # The service serves the checkpoint's timeframe when none is configured; read it the same way.
    from worker.model.checkpoint import MANIFEST, _read_manifest

    manifest = _read_manifest(Path(settings.sampling.checkpoint) / MANIFEST)
    return format_duration(manifest.features.timeframe_ms)


def _check_symbol(symbol: str) -> str:
    if re.fullmatch(SYMBOL_PATTERN, symbol) is None:
        raise ConfigError(f"--symbol {symbol!r} does not match {SYMBOL_PATTERN}")
    return symbol


async def _with_store(args: argparse.Namespace, action: Callable[[WindowStore], Any]) -> Any:
    settings = load_settings()
    timeframe = _timeframe(settings, args.timeframe)
    redis = make_redis(settings.redis, max_connections=2)
    try:
        return await action(WindowStore.from_settings(redis, settings, timeframe))
    finally:
        await redis.aclose()


def _when(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    ahead_s = (ms - now_ms) // 1000
    # A bar stamped ahead of the clock is what poisons a window (issue 9, B6): say so.
    note = f"  ({ahead_s} s in the FUTURE)" if ahead_s > 0 else ""
    return f"{iso(ms)}  ({ms}){note}"


def _ttl(value: int | None) -> str:
    return "-" if value is None else f"{value} s"


def format_state(state: SymbolState, now_ms: int | None = None) -> str:
    """The readable table of ``state show``."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    rows = [
        ("symbol", state.symbol),
        ("namespace", state.namespace or "-"),
        ("window key", f"{state.window_key}  [{state.window_type}, TTL {_ttl(state.window_ttl_s)}]"),
        ("watermark key", f"{state.watermark_key}  [{state.watermark_type}, TTL {_ttl(state.watermark_ttl_s)}]"),
        ("window length", f"{state.length} of {state.configured_length} bars"),
        ("oldest open time", _when(state.oldest_open_time, now)),
        ("newest open time", _when(state.newest_open_time, now)),
        ("watermark", _when(state.watermark, now) if state.problem is None else (state.watermark_raw or "-")),
        ("configured TTL", f"{state.configured_ttl_s} s"),
        ("status", "healthy" if state.problem is None else f"QUARANTINED: {state.problem}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _show(args: argparse.Namespace) -> int:
    symbol = _check_symbol(args.symbol)
    state: SymbolState = asyncio.run(_with_store(args, lambda store: store.describe(symbol)))
    print(json.dumps(state.as_dict(), indent=2) if args.json else format_state(state))
    return 0


def _reset(args: argparse.Namespace) -> int:
    symbol = _check_symbol(args.symbol)
    if not args.yes:
        raise ConfigError(f"state reset deletes {symbol}'s window and watermark; add --yes to do it")

    async def reset(store: WindowStore) -> dict[str, Any]:
        deleted = await store.reset(symbol)
        return {"symbol": symbol, "namespace": store.namespace, "deleted": list(deleted),
                "keys": [store.window_key(symbol), store.watermark_key(symbol)]}

    outcome = asyncio.run(_with_store(args, reset))
    if args.json:
        print(json.dumps(outcome, indent=2))
    elif outcome["deleted"]:
        print(f"deleted {', '.join(outcome['deleted'])} (namespace {outcome['namespace']})")
    else:
        print(f"nothing to delete: {', '.join(outcome['keys'])} do not exist (namespace {outcome['namespace']})")
    return 0


def _state(args: argparse.Namespace) -> int:
    return {"show": _show, "reset": _reset}[args.state_command](args)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"state": _state}
