from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.observability import configure_logging, get_logger


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield buf
    # Leave logging as it was: later tests must not write into this test's buffer.
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_standard_fields(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    structlog.contextvars.bind_contextvars(partition=3)
    get_logger("worker.test").info("batch_sampled", symbols=12)

    (line,) = _lines(stream)
    assert line["event"] == "batch_sampled"
    assert line["level"] == "info"
    assert line["logger"] == "worker.test"
    assert line["service"] == "signal-worker"
    assert line["symbols"] == 12
    assert line["partition"] == 3
    ts = str(line["timestamp"])
    assert ts.endswith("Z") and "T" in ts


def test_stdlib_loggers_render_as_json_too(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    logging.getLogger("aiokafka.consumer").warning("Heartbeat failed for group %s", "signal-worker")

    (line,) = _lines(stream)
    assert line["event"] == "Heartbeat failed for group signal-worker"
    assert line["level"] == "warning"
    assert line["logger"] == "aiokafka.consumer"
    assert line["service"] == "signal-worker"
    assert "timestamp" in line


def test_level_filters_both_worlds(stream: io.StringIO) -> None:
    configure_logging("json", "warning", stream=stream)
    get_logger("worker.test").info("dropped")
    logging.getLogger("redis").info("dropped too")
    get_logger("worker.test").error("kept")
    assert [line["event"] for line in _lines(stream)] == ["kept"]


def test_exceptions_are_formatted_into_the_json_line(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("worker.test").exception("sampling_failed")
    (line,) = _lines(stream)
    assert line["level"] == "error"
    assert "RuntimeError: boom" in str(line["exception"])


def test_reconfiguring_replaces_the_handler(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=io.StringIO())
    configure_logging("json", "info", stream=stream)
    get_logger("worker.test").info("once")
    assert len(_lines(stream)) == 1


def test_console_format_is_human_readable(stream: io.StringIO) -> None:
    configure_logging("console", "debug", stream=stream)
    get_logger("worker.test").debug("hello", symbol="EURUSD")
    out = stream.getvalue()
    assert "hello" in out and "symbol=EURUSD" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info")  # type: ignore[arg-type]
