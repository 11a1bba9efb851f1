"""Time ``WindowStore.apply`` / ``mark_forecast`` on the worker's shape of traffic, against an
embedded valkey (so nobody else's load is in the figures).

    python -m worker.dev.state_bench                        # this tree's store
    python -m worker.dev.state_bench --baseline old.py      # and another windows.py, interleaved

Each round writes batches of ``--symbols`` x ``--bars`` candles into full ``--length``-bar
windows, then marks every symbol; rounds of the store(s) alternate so drift hits both alike.
Prints medians per batch (ms) and, with a baseline, the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import redis.asyncio as aredis

from worker.dev.embedded import EmbeddedRedis
from worker.state import windows as current

T0 = 1_700_000_000_000
STEP = 60_000


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


async def _round(
    store: Any, symbols: list[str], bars: int, start: int, batches: int
) -> tuple[list[float], list[float]]:
    row = current.CandleRow
    applies, marks = [], []
    for b in range(batches):
        i0 = start + b * bars
        batch = [row(s, T0 + (i0 + k) * STEP, 1.0, 2.0, 0.5, 1.5, 3.0) for k in range(bars) for s in symbols]
        t = time.perf_counter()
        await store.apply(batch)
        applies.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await store.mark_forecast({s: T0 + (i0 + bars - 1) * STEP for s in symbols})
        marks.append((time.perf_counter() - t) * 1000)
    return applies, marks


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modules = {"current": current}
    if args.baseline:
        modules["baseline"] = _load(Path(args.baseline))
    symbols = [f"S{i:03d}" for i in range(args.symbols)]
    results: dict[str, dict[str, list[float]]] = {name: {"apply": [], "mark": []} for name in modules}
    with EmbeddedRedis() as server:
        client = aredis.Redis.from_url(server.url)
        try:
            stores = {name: m.WindowStore(client, prefix=f"bench-{name}", length=args.length, ttl_s=3600)
                      for name, m in modules.items()}
            for store in stores.values():  # fill the windows: the steady state is full windows
                await store.load_scripts()
                await _round(store, symbols, args.length, 0, 1)
            start = args.length
            for _ in range(args.rounds):
                for name, store in stores.items():
                    applies, marks = await _round(store, symbols, args.bars, start, args.batches)
                    results[name]["apply"] += applies
                    results[name]["mark"] += marks
                start += args.bars * args.batches
        finally:
            await client.aclose()
    summary: dict[str, Any] = {
        "symbols": args.symbols, "bars_per_symbol_per_batch": args.bars, "length": args.length,
        "batches_per_store": args.rounds * args.batches,
    }
    for name, r in results.items():
        summary[name] = {"apply_ms_median": round(statistics.median(r["apply"]), 3),
                         "mark_ms_median": round(statistics.median(r["mark"]), 3)}
    if "baseline" in results:
        summary["apply_ratio_current_to_baseline"] = round(
            summary["current"]["apply_ms_median"] / summary["baseline"]["apply_ms_median"], 3)
        summary["mark_ratio_current_to_baseline"] = round(
            summary["current"]["mark_ms_median"] / summary["baseline"]["mark_ms_median"], 3)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--symbols", type=int, default=50)
    p.add_argument("--bars", type=int, default=10, help="bars per symbol per batch")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="batches per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--baseline", default=None, help="path of another windows.py to time alongside")
    print(json.dumps(asyncio.run(run(p.parse_args())), indent=2))


if __name__ == "__main__":
    main()
