"""``shadowlens init`` writes a starter config the worker accepts; paths resolve against the config file;
env-var mistakes are blamed on the environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from streams.config import load_settings
from streams.models import build_digits_models

CLI = [sys.executable, "-m", "streams.cli"]


def test_init_writes_a_config_that_loads_with_paths_relative_to_it(tmp_path):
    models = build_digits_models(tmp_path / "models")
    out = tmp_path / "conf" / "shadowlens.toml"
    out.parent.mkdir()
    done = subprocess.run([*CLI, "init", str(models["good"]), str(models["baseline"]), "--model", "digits",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = tomllib.loads(out.read_text())
    assert [c["path"] for c in raw["candidates"]] == ["../models/digits-good.onnx", "../models/digits-baseline.onnx"]
    assert raw["candidates"][0]["output"] == "probabilities"  # read from the ONNX file
    settings = load_settings(out)
    assert all(c.path.is_file() for c in settings.candidates)
    # The chDB path is relative to the file too, wherever the worker is started.
    assert settings.clickhouse.dsn == f"chdb://{(out.parent / 'shadowlens-data/chdb').resolve()}"
    again = subprocess.run([*CLI, "init", str(models["good"]), "--model", "digits", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out} exists; pass --force to overwrite it, " \
                                                              f"or --out another path"


def test_a_bad_environment_variable_is_blamed_on_itself(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text("[api]\nport = 8080\n")
    env = {**os.environ, "SHADOWLENS_API__PORT": "eighty"}
    done = subprocess.run([*CLI, "worker", "-c", str(cfg)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith(f"config error: environment variable SHADOWLENS_API__PORT (not {cfg}): api.port")
