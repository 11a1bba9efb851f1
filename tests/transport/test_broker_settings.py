"""kafka_client_kwargs and lag arithmetic (no broker needed)."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import TopicPartition

from worker.settings import KafkaSettings
from worker.transport import compute_lag, kafka_client_kwargs, total_lag


def settings(**values: Any) -> KafkaSettings:
    return KafkaSettings.model_validate(values)


def test_plaintext() -> None:
    kw = kafka_client_kwargs(settings(bootstrap_servers="a:9092, b:9092", client_id="w1"))
    assert kw == {
        "bootstrap_servers": ["a:9092", "b:9092"],
        "client_id": "w1",
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 30_000,
    }


def test_sasl_ssl() -> None:
    kw = kafka_client_kwargs(
        settings(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="worker",
            sasl_password="pw",
        )
    )
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("worker", "pw")
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    assert kw["ssl_context"].check_hostname


def test_sasl_plaintext_has_no_tls() -> None:
    kw = kafka_client_kwargs(
        settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p")
    )
    assert "ssl_context" not in kw
    assert kw["sasl_mechanism"] == "PLAIN"


def test_lag_skips_unknowns_and_clamps() -> None:
    a, b, c, d = (TopicPartition("t", i) for i in range(4))
    lags = compute_lag({a: 10, b: None, c: 5, d: 3}, {a: 4, b: 2, c: 9})
    assert lags == {a: 6, c: 0}
    assert total_lag(lags) == 6
