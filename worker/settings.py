"""Service configuration, read from ``SIGNAL_WORKER_*`` environment variables (nested with ``__``)
and an optional ``.env`` file.

Every value is validated at start-up; a bad one raises :class:`worker.errors.ConfigError`
whose message names the environment variable, so a misconfigured pod fails fast and says why.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.deadletter import DEAD_LETTER_MAX_BYTES, WORKER_ID_MAX_CHARS
from schemas.forecast import MIN_SAMPLES
from schemas.timeframe import parse_duration_ms, parse_horizons
from worker.errors import ConfigError
from worker.model.registry import CHECKPOINTS, DEFAULT_CHECKPOINT, resolve_checkpoint  # torch-free

ENV_PREFIX = "SIGNAL_WORKER_"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _check_topic(value: str) -> str:
    if not _TOPIC.match(value):
        raise ValueError(f"invalid Kafka topic name {value!r}")
    return value


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (keep it in a Secret).")
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    input_topic: str = Field("candles", description="Topic of candle events (keyed by symbol).")
    output_topic: str = Field("forecasts", description="Topic the forecasts are published to.")
    dead_letter_topic: str = Field("candles.dlq", description="Topic for rejected input records.")
    consumer_group: str = Field("signal-worker", min_length=1, description="Consumer group shared by all replicas.")
    client_id: str = Field("signal-worker", min_length=1, description="Kafka client id prefix.")
    max_message_bytes: int = Field(
        # floor: a valid candle event takes up to ~200 bytes (145 for EURUSD/5m, 172 with a 32-character
        # symbol); a smaller limit would dead-letter valid input as oversized
        4096, ge=1024, le=1_048_576, description="Candle events larger than this are dead-lettered."
    )
    max_poll_records: int = Field(2000, ge=1, le=100_000, description="Records fetched per poll.")
    request_timeout_ms: int = Field(30_000, ge=1000, description="Producer/consumer request timeout.")
    fetch_max_wait_ms: int = Field(
        20, ge=0, le=10_000, description="Longest a fetch waits at the broker for new candles (latency floor)."
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, le=300_000,
        description="A replica silent this long is dropped from the group and its partitions move "
        "(how long a crashed worker's symbols wait).",
    )
    heartbeat_interval_ms: int = Field(
        3000, ge=100, le=100_000, description="Group heartbeat period; below a third of the session timeout."
    )
    max_request_bytes: int = Field(
        1_048_576, ge=DEAD_LETTER_MAX_BYTES, le=100 * 1_048_576,
        description=f"Largest produce request (the producer's max_request_size); at least "
        f"{DEAD_LETTER_MAX_BYTES}, the largest dead letter, and at most what the brokers accept "
        "(message.max.bytes).",
    )
    bootstrap_timeout_s: float = Field(
        60.0, gt=0, le=3600,
        description="At start-up an unreachable broker is retried with backoff this long, then the worker exits.",
    )
    retry_max_backoff_s: float = Field(
        5.0, gt=0, le=300, description="Ceiling of the backoff between retries of a failed publish or commit."
    )

    @field_validator("input_topic", "output_topic", "dead_letter_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _check_topic(value)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _tls_file(cls, value: Path | None) -> Path | None:
        return _readable_file(value)

    @model_validator(mode="after")
    def _distinct_topics(self) -> KafkaSettings:
        # A dead-letter topic equal to the input would read every dead letter back as a candle and
        # reject it again, forever; an output topic equal to either feeds forecasts into them.
        names = {"SIGNAL_WORKER_KAFKA__INPUT_TOPIC": self.input_topic,
                 "SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC": self.output_topic,
                 "SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC": self.dead_letter_topic}
        seen: dict[str, str] = {}
        for var, topic in names.items():
            if topic in seen:
                raise ValueError(f"{var}={topic!r} is also {seen[topic]}: the input, output and dead-letter "
                                 "topics must be three different topics")
            seen[topic] = var
        return self

    @model_validator(mode="after")
    def _heartbeat(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms={self.heartbeat_interval_ms} must be at most a third of "
                f"session_timeout_ms={self.session_timeout_ms}, or one late heartbeat drops the replica"
            )
        return self

    @model_validator(mode="after")
    def _sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError("SASL protocols need sasl_mechanism, sasl_username and sasl_password")
        return self


def _readable_file(value: Path | None) -> Path | None:
    """A TLS file must exist at start-up: otherwise the TLS client fails on every connection, which
    looks like an outage (retried forever) instead of a setting to fix."""
    if value is not None and not value.is_file():
        raise ValueError(f"no such file: {str(value)!r}")
    return value


# A namespace sits between the key prefix and the symbol's hash tag: braces would move the hash tag
# (and so the cluster slot), whitespace and control characters make keys unreadable in redis-cli.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}")
NAMESPACE_RULE = "use 1-128 of [A-Za-z0-9_.:@/+=-] (no braces, no whitespace)"


class RedisSettings(BaseModel):
    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS) URL.")
    username: str | None = Field(None, description="ACL user name (overrides the URL's).")
    password: SecretStr | None = Field(None, description="ACL password (overrides the URL's).")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss:// URLs.")
    key_prefix: str = Field("sw", description="Prefix of every key the worker writes.")
    namespace: str | None = Field(
        None,
        description="This deployment's identity inside the key prefix, so deployments sharing one "
        "Redis (a canary, another timeframe) never share windows or watermarks. Empty: "
        "'<consumer group>@<timeframe>'. Changing it starts from empty windows.",
    )
    window_ttl_s: int = Field(7 * 86_400, ge=60, description="Idle symbol windows expire after this.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Per-command timeout.")
    retry_max_backoff_s: float = Field(10.0, gt=0, description="Ceiling of the reconnect backoff.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if not value.startswith("unix://"):
            parsed = urllib.parse.urlsplit(value)
            try:
                parsed.port  # noqa: B018 - raises on a port that is not a number in range
            except ValueError:
                raise ValueError(f"the port in {value!r} is not a number from 0 to 65535") from None
            db = parsed.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError(f"the database in {value!r} must be a number, e.g. /0 (got {db!r})")
        return value

    @field_validator("ssl_ca_certs")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        return _readable_file(value)

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9:_.-]{1,64}$", value):
            raise ValueError("use 1-64 of [A-Za-z0-9:_.-]")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value and NAMESPACE_PATTERN.fullmatch(value) is None:
            raise ValueError(NAMESPACE_RULE)
        return value or None


class WindowSettings(BaseModel):
    timeframe: str | None = Field(
        None, description="Bar timeframe, e.g. '5m' or '1h'. Empty: the checkpoint's timeframe."
    )
    length: int = Field(256, ge=32, le=10_000, description="Candles kept per symbol in Redis.")
    conflate: bool = Field(
        True, description="After a backlog forecast only the newest bar per symbol in a batch."
    )
    future_tolerance_s: int = Field(
        300, ge=0, le=7 * 86_400,
        description="Candles whose open time is later than now plus this are dead-lettered "
        "(future_open_time): one future bar would make every real bar of its symbol late.",
    )
    restore_max_records: int = Field(
        200_000, ge=0, le=100_000_000,
        description="When Redis comes back empty, each partition's windows are rebuilt from at most "
        "this many input records before the committed offset (0: no rebuild).",
    )
    max_missing_fraction: float = Field(
        0.15,
        ge=0,
        le=1,
        description="A window missing more than this fraction of its bars (weekends excepted) is not "
        "forecast; 0.15 lets a one-day holiday such as Christmas through at 1h bars.",
    )

    @field_validator("timeframe")
    @classmethod
    def _timeframe(cls, value: str | None) -> str | None:
        if value:
            parse_duration_ms(value)
        return value or None


class BatchSettings(BaseModel):
    max_size: int = Field(64, ge=1, le=4096, description="Symbols per micro-batch at most.")
    max_wait_ms: int = Field(20, ge=0, le=60_000, description="Longest a ready symbol waits for a batch.")
    max_in_flight: int = Field(
        2, ge=1, le=64, description="Batches sampling at once; beyond it partitions are paused."
    )


class SamplingSettings(BaseModel):
    checkpoint: Path = Field(
        DEFAULT_CHECKPOINT,
        description=f"Checkpoint: a shipped name ({', '.join(CHECKPOINTS)}) or a directory (safetensors + JSON).",
    )
    scheduler: str = Field(
        "dpmpp", description="Sampler: a name from the sampler registry (worker.model.samplers.SAMPLERS). "
        "The checkpoint's spread calibration was fitted for one scheduler and step count (fx-5m: dpmpp, 10; "
        "fx-5m-unipc5: unipc, 5); another logs calibration_fitted_for_another_sampler at start."
    )
    steps: int = Field(10, ge=1, le=1000, description="Sampler steps (KDPM2 costs 2 NFE per step).")
    samples: int = Field(64, ge=MIN_SAMPLES, le=4096, description="Sample paths per symbol and bar.")
    horizons: str | None = Field(
        None, description="Comma-separated durations, e.g. '15m,1h,4h'. Empty: the checkpoint's."
    )
    seed: int = Field(0, ge=0, description="Base seed; noise is seeded per symbol and bar from it.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present.")
    cuda_streams: int = Field(2, ge=1, le=16, description="CUDA streams in the pool (one per batch).")
    cuda_graphs: bool = Field(
        False, description="On CUDA, replay each micro-batch's whole sampling loop (dpmpp, unipc) as one captured "
        "CUDA graph per stream, batch-size bucket and step count (same samples as eager). Off until `make "
        "gpu-check` has passed on a device (docs/benchmarks.md)."
    )
    torch_threads: int = Field(0, ge=0, le=256, description="CPU threads for torch; 0 keeps torch's.")
    stall_after_s: float = Field(
        120.0, gt=0, le=86_400, description="A micro-batch still sampling after this long is taken for a wedged "
        "sampler (a hung CUDA kernel, a deadlock): /readyz says not ready and the worker exits 1 without committing "
        "it, so the group hands its partitions to a healthy replica. Healthy calls take well under a second to a "
        "few seconds (docs/benchmarks.md); raise it for very large batches on a slow CPU."
    )
    allow_timeframe_mismatch: bool = Field(
        False, description="Serve a timeframe other than the checkpoint's (normally refused)."
    )
    weekend_close: bool = Field(
        True, description="Leave out the horizons that would end after the FX weekend close (Friday 17:00 "
        "New York): no model was trained across it and the weekend gap is in no sample. A bar with none left "
        "is not forecast (skipped, reason `market_closed`). false: forecast them anyway (a feed that trades "
        "through the weekend)."
    )

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, value: str | None) -> str | None:
        if value:
            parse_horizons(value)  # the same parser as Forecaster.load(horizons=...)
        return value or None

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint(cls, value: object) -> object:
        if isinstance(value, str | Path):
            return resolve_checkpoint(value)
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        from worker.model.samplers import SAMPLERS  # the registry is the one list of names

        if value not in SAMPLERS:
            raise ValueError(f"unknown scheduler {value!r}; choose one of {sorted(SAMPLERS)}")
        return value


class ServiceSettings(BaseModel):
    host: str = Field("0.0.0.0", description="Bind address of the metrics/health server.")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz.")
    log_format: Literal["json", "console"] = Field("json", description="Log renderer.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    worker_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=WORKER_ID_MAX_CHARS,
        description="Id written into forecasts and dead letters (non-empty).",
    )
    shutdown_grace_s: float = Field(
        30.0, gt=0, le=3600, description="SIGTERM drain budget before a forced exit."
    )
    online_scoring: bool = Field(True, description="Score forecasts as their horizons realise.")


    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, value: str) -> str:
        # Written into every dead letter and forecast: an empty or unprintable id would make the
        # first of them fail its own contract and stop the worker.
        if not value.strip() or not value.isprintable():
            raise ValueError("must be non-empty printable text")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    window: WindowSettings = Field(default_factory=WindowSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)


def env_name(loc: tuple[int | str, ...]) -> str:
    """``("kafka", "input_topic")`` -> ``SIGNAL_WORKER_KAFKA__INPUT_TOPIC``."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    name = "__".join(p.upper() for p in parts)
    return name if name.startswith(ENV_PREFIX) else ENV_PREFIX + name


# Variables of the test suite share the prefix but are not settings of the worker.
_RESERVED_PREFIX = ENV_PREFIX + "TEST_"


def _dotenv_names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            names.append(line.split("=", 1)[0].removeprefix("export ").strip())
    return names


def unknown_env_names(environ: Mapping[str, str] | None = None, dotenv: Path = Path(".env")) -> list[str]:
    """``SIGNAL_WORKER_*`` variables that are no setting: almost always a typo that would otherwise
    be ignored silently and leave a default in force."""
    known = set(all_env_names())
    names = [*(environ if environ is not None else os.environ), *_dotenv_names(dotenv)]
    return sorted({n.upper() for n in names if n.upper().startswith(ENV_PREFIX)
                   and not n.upper().startswith(_RESERVED_PREFIX) and n.upper() not in known})


def load_settings(**overrides: object) -> Settings:
    """Read the settings or raise :class:`ConfigError` naming each bad variable."""
    lines = []
    for name in unknown_env_names():
        close = difflib.get_close_matches(name, all_env_names(), n=1)
        lines.append(f"{name}: not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        reported = set(unknown_env_names())
        lines += [f"{env_name(err['loc'])}: {err['msg']}" for err in exc.errors()
                  if not (err["type"] == "extra_forbidden" and env_name(err["loc"]) in reported)]
        settings = None
    if lines or settings is None:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return settings


def all_env_names() -> list[str]:
    """Every environment variable the settings model reads (for docs and deploy checks)."""
    names = []
    for section, field in Settings.model_fields.items():
        model = field.default_factory
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name in model.model_fields:
            names.append(env_name((section, name)))
    return names
