"""The shipped checkpoints by name: the one place that says which checkpoint is the default.

Torch-free, so settings and the CLI can resolve a name without loading the model. ``--checkpoint``
and ``SIGNAL_WORKER_SAMPLING__CHECKPOINT`` accept one of these names or a directory.
"""

from __future__ import annotations

from pathlib import Path

_MODEL_DIR = Path(__file__).resolve().parent
CHECKPOINTS: dict[str, Path] = {
    # 5-minute bars, trained on five FX pairs, forecasts 15m / 1h / 4h: the default.
    "fx-5m": _MODEL_DIR / "default_checkpoint",
    # The first 5-minute model (2026-12-01: returns-EWMA scaling, i.i.d. noise), kept so that what it
    # forecast can still be reproduced and compared.
    "fx-5m-v1": _MODEL_DIR / "checkpoints" / "fx-5m-v1",
    # The second (2026-12-02: range-EWMA scaling, stratified noise, one intraday profile for the
    # whole year), the default until the profile became per season; kept for the same reason.
    "fx-5m-v2": _MODEL_DIR / "checkpoints" / "fx-5m-v2",
    # fx-5m's weights with the spread calibration refitted for UniPC at 5 steps (2026-12-02): the
    # capacity setting, about half the default's sampling cost. Serve it with scheduler unipc, 5 steps.
    "fx-5m-unipc5": _MODEL_DIR / "checkpoints" / "fx-5m-unipc5",
    # Hourly EURUSD (2017) with the spread calibration fitted on its validation quarter (format 2).
    "eurusd-1h": _MODEL_DIR / "checkpoints" / "eurusd-1h",
    # The same hourly weights exactly as first shipped (format 1, uncalibrated).
    "eurusd-1h-v1": _MODEL_DIR / "checkpoints" / "eurusd-1h-v1",
}
DEFAULT_CHECKPOINT_NAME = "fx-5m"
DEFAULT_CHECKPOINT = CHECKPOINTS[DEFAULT_CHECKPOINT_NAME]


def resolve_checkpoint(name_or_path: str | Path | None) -> Path:
    """A registered name or a directory; None or empty: the default checkpoint. An existing
    directory of the same name as a registered checkpoint wins (an explicit path is never hijacked)."""
    if name_or_path is None or str(name_or_path) == "":
        return DEFAULT_CHECKPOINT
    text = str(name_or_path)
    if text in CHECKPOINTS and not Path(text).is_dir():
        return CHECKPOINTS[text]
    return Path(name_or_path)
