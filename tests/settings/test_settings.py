"""Configuration: bad values and unknown variables fail at start-up, naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import KafkaSettings, all_env_names, load_settings


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
        ("SIGNAL_WORKER_SAMPLING__HORIZONS", "15m,0"),  # once passed here and failed at run time
        ("SIGNAL_WORKER_KAFKA__MAX_MESSAGE_BYTES", "160"),  # under a valid candle's size
        ("SIGNAL_WORKER_REDIS__URL", "redis://h:abc/0"),
        ("SIGNAL_WORKER_REDIS__URL", "redis://h/x"),  # once silently database 0
        ("SIGNAL_WORKER_REDIS__SSL_CA_CERTS", "/nonexistent/ca.pem"),
        ("SIGNAL_WORKER_KAFKA__SSL_CAFILE", "/nonexistent/ca.pem"),
        ("SIGNAL_WORKER_KAFKA__CONSUMER_GROUP", ""),
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


@pytest.mark.parametrize(("name", "value", "other"), [
    ("SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC", "candles", "SIGNAL_WORKER_KAFKA__INPUT_TOPIC"),
    ("SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC", "candles", "SIGNAL_WORKER_KAFKA__INPUT_TOPIC"),
    ("SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC", "forecasts", "SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC"),
])
def test_topics_that_collide_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, other: str) -> None:
    """A dead-letter topic equal to the input read every dead letter back as a bad candle, for ever."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"{name}='{value}' is also {other}"):
        load_settings()


def test_the_largest_valid_candle_fits_the_smallest_message_limit() -> None:
    from schemas.candle import CandleEvent, encode_candle

    floor = next(m.ge for m in KafkaSettings.model_fields["max_message_bytes"].metadata if hasattr(m, "ge"))
    candle = CandleEvent(symbol="S" * 32, timeframe="5m", open_time=1_704_067_200_000, open=123456.789012,
                         high=123456.789012, low=0.000123456789, close=1.23456789012, volume=1e15, is_final=True)
    assert 4 * len(encode_candle(candle)) < floor  # room to spare: fields the contract may add


def test_a_window_ttl_shorter_than_a_few_bars_fails_at_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.cli.service_commands import make_worker
    from worker.service.engine import TrivialEngine

    engine = TrivialEngine(timeframe_ms=3_600_000, horizons_ms=[3_600_000])
    monkeypatch.setenv("SIGNAL_WORKER_REDIS__WINDOW_TTL_S", "7200")  # two hourly bars
    with pytest.raises(ConfigError, match=r"SIGNAL_WORKER_REDIS__WINDOW_TTL_S=7200 is shorter than 4 bars of 1h"):
        make_worker(load_settings(), engine)
