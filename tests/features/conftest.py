"""Fixtures for the feature tests: the real EURUSD hourly year (2017) shipped in the package."""

from __future__ import annotations

from pathlib import Path

import pytest

import worker
from worker.features.candles import CandleSeries, load_csv


@pytest.fixture(scope="session")
def shared_csv() -> Path:
    return Path(worker.__file__).parent / "data" / "eurusd_h1_2017_ask.csv"


@pytest.fixture(scope="session")
def eurusd(shared_csv: Path) -> CandleSeries:
    return load_csv(shared_csv)
