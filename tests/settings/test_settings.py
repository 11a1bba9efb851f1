"""Configuration: bad values and unknown variables fail at start-up, naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import all_env_names, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SIGNAL_WORKER_") and not name.startswith("SIGNAL_WORKER_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_load() -> None:
    s = load_settings()
    assert s.sampling.scheduler == "dpmpp" and s.kafka.input_topic == "candles"


def test_cuda_graphs_reach_the_forecaster(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli.service_commands import build_engine

    assert not build_engine(load_settings()).forecaster.cuda_graphs  # off until checked on a device
    monkeypatch.setenv("SIGNAL_WORKER_SAMPLING__CUDA_GRAPHS", "true")
    assert build_engine(load_settings()).forecaster.cuda_graphs


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIGNAL_WORKER_BATCH__MAX_SIZE", "0"),
        ("SIGNAL_WORKER_KAFKA__INPUT_TOPIC", "bad topic!"),
        ("SIGNAL_WORKER_SAMPLING__SCHEDULER", "lms"),
        ("SIGNAL_WORKER_SAMPLING__HORIZONS", "1h,soon"),
        ("SIGNAL_WORKER_WINDOW__TIMEFRAME", "5 minutes"),
        ("SIGNAL_WORKER_REDIS__URL", "http://x"),
        ("SIGNAL_WORKER_SERVICE__LOG_FORMAT", "xml"),
        ("SIGNAL_WORKER_KAFKA__SESSION_TIMEOUT_MS", "500"),
        ("SIGNAL_WORKER_SAMPLING__CUDA_GRAPHS", "sometimes"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_sasl_without_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNAL_WORKER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_KAFKA"):
        load_settings()


def test_a_heartbeat_too_slow_for_the_session_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNAL_WORKER_KAFKA__SESSION_TIMEOUT_MS", "6000")
    monkeypatch.setenv("SIGNAL_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS", "3000")
    with pytest.raises(ConfigError, match=r"SIGNAL_WORKER_KAFKA.*heartbeat_interval_ms=3000 must be at most a third"):
        load_settings()
    monkeypatch.setenv("SIGNAL_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS", "2000")
    assert load_settings().kafka.session_timeout_ms == 6000


def test_a_misspelt_variable_is_refused_with_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNAL_WORKER_KAFKA__INPUT_TOPICS", "x")
    with pytest.raises(ConfigError, match=r"SIGNAL_WORKER_KAFKA__INPUT_TOPICS: not a setting \(did you mean "
                                           r"SIGNAL_WORKER_KAFKA__INPUT_TOPIC\?\)"):
        load_settings()


def test_dotenv_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SIGNAL_WORKER_WINDOW__LENGTH=300\n")
    assert load_settings().window.length == 300
    (tmp_path / ".env").write_text("SIGNAL_WORKER_WINDOW__LENGHT=300\n")
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_WINDOW__LENGHT"):
        load_settings()


def test_every_documented_variable_is_a_setting() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for name in all_env_names():
        assert name in doc
