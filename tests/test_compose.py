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
    assert set(services) == {"kafka", "clickhouse", "models", "worker", "api"}
    for name in ("worker", "api"):
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == deps["clickhouse"]["condition"] == "service_healthy"
        # models are built once, before either reads them (they used to build into one volume at once)
        assert deps["models"]["condition"] == "service_completed_successfully"
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["build"]["dockerfile"] == "scripts/compose/Dockerfile"
    assert all("healthcheck" in services[s] for s in ("kafka", "clickhouse", "worker", "api"))


def test_the_image_is_built_once_not_installed_at_every_start():
    services = load_compose()["services"]
    for name in ("models", "worker", "api"):
        command = " ".join(services[name]["command"])
        assert "pip install" not in command, name
        assert all(":ro" not in v or "/app" not in v for v in services[name].get("volumes", []))
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
    dockerfile = (ROOT / "scripts/compose/Dockerfile").read_text()
    stages = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")  # multi-stage
    # dependencies in a layer of their own, before the sources are copied (cached until pyproject changes)
    assert dockerfile.index("RUN shadowlens-install deps") < dockerfile.index("COPY streams streams")
    assert "USER shadowlens" in dockerfile and "useradd" in dockerfile  # non-root at run time
    assert "COPY --from=build /opt/shadowlens /opt/shadowlens" in dockerfile


def test_the_dockerfile_install_steps_work_in_a_fresh_venv(tmp_path):
    """The same commands the image runs, in the same order, from a copy of exactly what it COPYs."""
    import shutil
    import subprocess

    dockerfile = (ROOT / "scripts/compose/Dockerfile").read_text().split("\nFROM ")[1]  # the build stage
    src = tmp_path / "src"
    src.mkdir()
    venv = tmp_path / "venv"
    install = ROOT / "scripts/compose/install.sh"
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "install.sh" not in line:
            what, _ = line.split()[1:3]
            if (ROOT / what).is_dir():
                shutil.copytree(ROOT / what, src / what, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / what, src / what)
        elif line.startswith("RUN shadowlens-install "):
            step = line.split()[2]
            done = subprocess.run(["sh", str(install), step, str(venv)], cwd=src, capture_output=True, text=True,
                                  timeout=900)  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
    version = subprocess.run([str(venv / "bin/shadowlens"), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("shadowlens "), version.stderr
    imports = subprocess.run([str(venv / "bin/python"), "-c", "import streams.topology, scorers.judge, mirror, "
                              "schemas.wire; print(schemas.wire.SCHEMA_PATH.is_file())"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert imports.stdout.strip() == "True", imports.stderr  # package data (the JSON Schema) installed too


def test_kafka_is_kraft_single_node_reachable_from_host_and_containers(monkeypatch):
    kafka = load_compose()["services"]["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in advertised
    # Host producers use the SDK's and the worker's default bootstrap, 127.0.0.1:19092.
    from mirror.config import MirrorConfig
    from streams.config import KafkaConfig

    assert f"EXTERNAL://{KafkaConfig().bootstrap}" in advertised
    assert "19092:19092" in kafka["ports"]
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)  # the defaults, not the broker this run uses
    assert MirrorConfig().bootstrap_servers == KafkaConfig().bootstrap
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1


def test_worker_and_api_are_wired_by_environment(tmp_path, monkeypatch):
    services = load_compose()["services"]
    for name in ("worker", "api"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["SHADOWLENS_CLICKHOUSE_DSN"] == "http://clickhouse:8123"
        assert "/etc/shadowlens/shadowlens.toml" in services[name]["command"]
    assert services["worker"]["environment"]["SHADOWLENS_API__ENABLED"] == "false"
    assert services["worker"]["environment"]["SHADOWLENS_METRICS__HOST"] == "0.0.0.0"
    assert "8080:8080" in services["api"]["ports"]
    # The config the containers read is valid once its model exists (built by the models service).
    from streams.models import build_digits_models

    models = build_digits_models(tmp_path)
    for key, value in services["api"]["environment"].items():
        monkeypatch.setenv(key, interpolate(str(value), {"SHADOWLENS_API_TOKEN": "compose-token-0123456789"}))
    config = ROOT / "scripts/compose/shadowlens.toml"
    text = config.read_text().replace("/models/digits-good.onnx", str(models["good"]))
    (tmp_path / "shadowlens.toml").write_text(text)
    settings = load_settings(tmp_path / "shadowlens.toml")
    assert settings.clickhouse.dsn == "http://clickhouse:8123"
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.api.host == "0.0.0.0" and settings.api.port == 8080
    assert settings.api.tokens == ["compose-token-0123456789"] and settings.api.exposure_problem() is None


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` (an unset required one raises)."""
    import re

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"required variable {name} is missing a value: {arg}")
        return arg

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def test_the_api_on_every_interface_needs_a_token_and_compose_has_no_default(tmp_path, monkeypatch):
    """The API listens on 0.0.0.0 in compose: `docker compose up` refuses to start without a token
    (a required variable, no default in the file), and the config without one is refused too."""
    import pytest

    from streams.models import build_digits_models

    api = load_compose()["services"]["api"]
    tokens = api["environment"]["SHADOWLENS_API_TOKENS"]
    assert tokens.startswith("${SHADOWLENS_API_TOKEN:?") and "openssl rand" in tokens
    with pytest.raises(LookupError, match="SHADOWLENS_API_TOKEN"):
        interpolate(tokens, {})
    assert "SHADOWLENS_API_TOKENS" not in load_compose()["x-shadowlens"]["environment"]  # no shared default
    models = build_digits_models(tmp_path)
    text = (ROOT / "scripts/compose/shadowlens.toml").read_text()
    (tmp_path / "shadowlens.toml").write_text(text.replace("/models/digits-good.onnx", str(models["good"])))
    monkeypatch.delenv("SHADOWLENS_API_TOKENS", raising=False)
    problem = load_settings(tmp_path / "shadowlens.toml").api.exposure_problem()
    assert problem is not None and "[api] tokens" in problem and "0.0.0.0" in problem
