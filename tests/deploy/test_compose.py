"""deploy/compose: parsed and checked offline (no Docker daemon needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
SERVICES = {"kafka", "redis", "topics", "worker", "replay", "prometheus", "grafana"}
TOPICS = {"candles", "forecasts", "candles.dlq"}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text):
        total += float(value) * units[unit]
    return total


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_services_present(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= SERVICES


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert not [k for k in env if "ZOOKEEPER" in k]
    assert "zookeeper" not in compose["services"]
    assert kafka["healthcheck"]["test"]


def test_dependencies_wait_for_health_and_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert isinstance(spec, dict) and "condition" in spec, f"{name} -> {dep} needs a condition"
            if spec["condition"] == "service_healthy":
                check = services[dep].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{dep} has no healthcheck"
    worker = services["worker"]["depends_on"]
    assert worker["kafka"]["condition"] == "service_healthy"
    assert worker["redis"]["condition"] == "service_healthy"
    assert worker["topics"]["condition"] == "service_completed_successfully"
    assert services["replay"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_topics_job_creates_every_topic_with_partitions(compose: dict[str, Any]) -> None:
    topics = compose["services"]["topics"]
    script = _interpolate(
        " ".join(topics["command"]) if isinstance(topics["command"], list) else topics["command"]
    )
    created = {}
    for line in script.replace("\\\n", " ").splitlines():
        match = re.search(r"--create .*--topic (\S+).*--partitions (\d+)", line)
        if match:
            assert "--if-not-exists" in line, "topic creation must be idempotent"
            created[match.group(1)] = int(match.group(2))
    assert set(created) == TOPICS
    assert all(n >= 1 for n in created.values())
    env = _env(compose["services"]["worker"])
    assert {
        env["SIGNAL_WORKER_KAFKA__INPUT_TOPIC"],
        env["SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC"],
        env["SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC"],
    } == TOPICS
    assert topics.get("restart", "no") == "no"


def test_every_signal_worker_variable_is_a_real_setting(compose: dict[str, Any], env_names: set[str]) -> None:
    files = [compose, yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text())]
    for data in files:
        for name, service in data["services"].items():
            for var in _env(service):
                if var.startswith("SIGNAL_WORKER_"):
                    assert var in env_names, f"{name}: {var} is not a setting"


@pytest.mark.parametrize("service", ["worker", "replay"])
def test_worker_environment_is_a_valid_configuration(
    compose: dict[str, Any], service: str, isolated_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.settings import load_settings

    for name, value in _env(compose["services"][service]).items():
        monkeypatch.setenv(name, _interpolate(value))
    settings = load_settings()
    assert settings.window.timeframe == "1h"  # the bundled checkpoint and sample data are hourly
    assert settings.kafka.bootstrap_servers == "kafka:9092"


def test_worker_drains_within_the_stop_grace_period(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = _duration_s(worker["stop_grace_period"])
    assert grace > float(_env(worker)["SIGNAL_WORKER_SERVICE__SHUTDOWN_GRACE_S"])


def test_worker_health_uses_its_port_and_readiness(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    port = _env(worker)["SIGNAL_WORKER_SERVICE__METRICS_PORT"]
    test = " ".join(worker["healthcheck"]["test"])
    assert f":{port}/readyz" in test


@pytest.mark.parametrize("service", ["worker", "replay"])
def test_containers_run_hardened(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    assert spec["read_only"] is True
    assert any(t.startswith("/tmp") for t in spec["tmpfs"])
    assert spec["cap_drop"] == ["ALL"]
    assert spec["build"]["context"] == "../.."
    assert (COMPOSE_DIR / spec["build"]["context"] / spec["build"]["dockerfile"]).is_file()


def test_replay_sends_the_bundled_sample(compose: dict[str, Any], root: Path) -> None:
    command = compose["services"]["replay"]["command"]
    assert command[0] == "replay"
    args = dict(zip(command[1::2], command[2::2], strict=False))
    assert args["--candles"] == "/app/data/eurusd_h1_2017_ask.csv"
    assert args["--symbol"] == "EURUSD"
    assert command[-1] == "--max-rate"
    # The Dockerfile copies worker/data/ to /app/data/.
    assert re.search(r"^COPY\s+worker/data/?\s+/app/data/?\s*$", (root / "Dockerfile").read_text(), re.M)
    sample = root / "worker" / "data" / "eurusd_h1_2017_ask.csv"
    if not sample.exists():
        pytest.skip(f"{sample.relative_to(root)} is not in the tree yet")


def test_gpu_override_reserves_an_nvidia_gpu() -> None:
    gpu = yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text())
    worker = gpu["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert _interpolate(worker["build"]["args"]["TORCH_VARIANT"]).startswith("cu")


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def test_third_party_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image} to a version"


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def testbind_mounts_exist(compose: dict[str, Any]) -> None:
    mounted = 0
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"
            mounted += 1
    assert mounted >= 4  # prometheus.yml, two provisioning folders, the dashboards


def test_prometheus_scrapes_every_worker_replica(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    config_file = bind_mounts(prometheus)[flags["--config.file"]]
    assert config_file == COMPOSE_DIR / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (discovery,) = job["dns_sd_configs"]  # every replica of `--scale worker=N`, not one address
    assert discovery["type"] == "A" and discovery["names"] == ["worker"]
    assert str(discovery["port"]) == _env(compose["services"]["worker"])["SIGNAL_WORKER_SERVICE__METRICS_PORT"]
    # The CRPS baseline (dashboard and alert) reads 7 days, 1 day back.
    assert _duration_s(flags["--storage.tsdb.retention.time"]) >= 8 * 86400


def test_grafana_credentials_come_from_the_environment(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["grafana"])
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_USER:-\w+\}", env["GF_SECURITY_ADMIN_USER"])
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-\w+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_monitoring_containers_drop_capabilities(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert spec["healthcheck"]["test"]
