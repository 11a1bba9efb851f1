"""When a closed candle triggers a forecast.

A final candle is forecast when it is newer than the symbol's watermark (the last bar whose
forecast was acknowledged, kept in Redis beside the window) and not older than a bar of the same
symbol that came earlier in the stream. Redelivered candles after a crash arrive in stream order,
so they are not "late" and still get their forecast; a candle that really arrives after a newer
one is late: it corrects the window but is not forecast. With conflation on, only the newest bar
per symbol in a batch is forecast and the others are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from worker.errors import SymbolStateCorrupt
from worker.service.jobs import ForecastJob, Received, TriggerPlan
from worker.state.windows import WindowSnapshot


def plan_triggers(
    received: Sequence[Received],
    snapshots: Mapping[str, WindowSnapshot],
    newest_seen: dict[str, int],
    *,
    conflate: bool,
) -> TriggerPlan:
    """``received`` in stream order. Updates ``newest_seen`` (per-process memory of the stream)."""
    plan = TriggerPlan()
    by_symbol: dict[str, dict[int, ForecastJob]] = {}
    for rec in received:
        c = rec.candle
        snap = snapshots.get(c.symbol)
        watermark = snap.watermark if snap is not None and snap.watermark is not None else -1
        seen = newest_seen.get(c.symbol, -1)
        if c.open_time <= watermark or c.open_time < seen:
            plan.late.append(rec)
            continue
        newest_seen[c.symbol] = c.open_time
        jobs = by_symbol.setdefault(c.symbol, {})
        job = jobs.get(c.open_time)
        if job is None:
            jobs[c.open_time] = ForecastJob(c.symbol, c.open_time, rec.ingest_ms, [(rec.tp, rec.offset)],
                                            generation=rec.generation)
        else:  # a duplicate or correction of the same bar within the batch: one forecast
            job.offsets.append((rec.tp, rec.offset))
            job.ingest_ms = max(job.ingest_ms, rec.ingest_ms)
    for jobs in by_symbol.values():
        ordered = [jobs[t] for t in sorted(jobs)]
        if conflate and len(ordered) > 1:
            newest = ordered[-1]
            for older in ordered[:-1]:
                newest.offsets.extend(older.offsets)
            plan.conflated += len(ordered) - 1
            plan.jobs.append(newest)
        else:
            plan.jobs.extend(ordered)
    return plan


def watermarks_ahead(snapshots: Mapping[str, WindowSnapshot], latest_open_ms: int,
                     watermark_key: Callable[[str], str]) -> dict[str, SymbolStateCorrupt]:
    """Symbols whose watermark is newer than any bar the intake can admit (``latest_open_ms``: the
    clock plus its tolerance): every bar would be late, so the symbol would silently never be
    forecast again (the stored mark only ever rises). Either the mark was not written from a
    forecast or this host's clock is behind (the caller skips the check while it suspects its
    clock); the symbol is quarantined like any other unusable key, the detail saying both."""
    return {
        symbol: SymbolStateCorrupt(
            symbol, "bad_watermark",
            f"watermark key {watermark_key(symbol)} holds {snap.watermark}, after the newest bar this worker "
            f"admits ({latest_open_ms}): no bar could be forecast. Either the key was not written from a "
            f"forecast (delete it) or this host's clock is behind (fix its time sync first: deleting the key "
            f"then would forecast bars again)")
        for symbol, snap in snapshots.items()
        if snap.watermark is not None and snap.watermark > latest_open_ms
    }
