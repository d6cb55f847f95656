"""compose.yaml structure: no container engine runs here, so check the wiring instead."""

from __future__ import annotations

from pathlib import Path

import yaml

from streams.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_and_dependencies():
    services = load_compose()["services"]
    assert set(services) == {"kafka", "clickhouse", "worker", "api"}
    for name in ("worker", "api"):
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == deps["clickhouse"]["condition"] == "service_healthy"
    assert all("healthcheck" in services[s] for s in ("kafka", "clickhouse", "api"))


def test_kafka_is_kraft_single_node():
    env = load_compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1


def test_worker_and_api_are_wired_by_environment(tmp_path, monkeypatch):
    services = load_compose()["services"]
    for name in ("worker", "api"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["SHADOWLENS_CLICKHOUSE_DSN"] == "http://clickhouse:8123"
        assert "/app/scripts/compose/shadowlens.toml" in services[name]["command"]
    assert services["worker"]["environment"]["SHADOWLENS_API__ENABLED"] == "false"
    assert "8080:8080" in services["api"]["ports"]
    # The config the containers read is valid once its model exists (built at container start).
    from streams.models import build_digits_models

    models = build_digits_models(tmp_path)
    for key, value in services["api"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    config = ROOT / "scripts/compose/shadowlens.toml"
    text = config.read_text().replace("/models/digits-good.onnx", str(models["good"]))
    (tmp_path / "shadowlens.toml").write_text(text)
    settings = load_settings(tmp_path / "shadowlens.toml")
    assert settings.clickhouse.dsn == "http://clickhouse:8123"
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.api.host == "0.0.0.0" and settings.api.port == 8080
