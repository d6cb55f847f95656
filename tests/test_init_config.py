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


def _policy_lines(text: str) -> list[str]:
    """The first candidate's ``[candidates.policy]`` block: the commented lines after its header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[candidates.policy]"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    return block


def test_init_writes_the_policy_defaults_and_they_are_the_judges(tmp_path):
    """Every JudgePolicy field, with the default the judge uses, in a form the worker accepts: the block
    is commented out (the defaults apply), and uncommenting every set line changes nothing."""
    from dataclasses import fields

    from scorers.judge import JudgePolicy
    from streams.init_config import write_starter

    models = build_digits_models(tmp_path / "models")
    out = write_starter(tmp_path / "shadowlens.toml", [models["good"], models["degraded"]], "digits", None, False)
    text = out.read_text()
    block = _policy_lines(text)
    defaults = JudgePolicy()
    written = {}
    for line in block:
        setting, _, meaning = line.partition("   # ")
        name = setting.split(" = ")[0]
        assert meaning, line
        if getattr(defaults, name) is None:
            assert meaning.startswith("(unset by default)"), line
            continue
        written[name] = tomllib.loads(setting)[name]
    assert [line.split(" = ")[0] for line in block] == [f.name for f in fields(JudgePolicy)]
    for name, value in written.items():
        want = getattr(defaults, name)
        assert value == (list(want) if isinstance(want, tuple) else want), name
    # The margins the README's old example showed differently are the judge's here.
    assert (written["label_flip_rate_margin"], written["abs_confidence_delta_margin"], written["min_samples"],
            written["latency_p99_ratio_margin"], written["max_error_rate"], written["min_labelled"]) == (
        defaults.label_flip_rate_margin, defaults.abs_confidence_delta_margin, defaults.min_samples,
        defaults.latency_p99_ratio_margin, defaults.max_error_rate, defaults.min_labelled)
    assert load_settings(out).candidates[0].judge_policy() == defaults
    # Uncommented, the same values load, and are the defaults.
    uncommented = text.replace("\n".join(f"# {line}" for line in block),
                               "\n".join(line for line in block if "(unset by default)" not in line))
    out.write_text(uncommented)
    settings = load_settings(out)
    assert settings.candidates[0].policy and settings.candidates[0].judge_policy() == defaults


def test_init_with_the_baseline_adds_it_replayed_as_the_noise_reference(tmp_path):
    from streams.init_config import write_starter

    models = build_digits_models(tmp_path / "models")
    out = tmp_path / "conf" / "shadowlens.toml"
    out.parent.mkdir()
    # The baseline given among the candidates too: it is the replayed baseline only.
    write_starter(out, [models["good"], models["baseline"]], "digits", None, False, baseline=models["baseline"])
    text = out.read_text()
    raw = tomllib.loads(text)
    assert [(c["name"], c.get("noise_reference", False)) for c in raw["candidates"]] == [
        ("digits-good", False), ("digits-baseline", True)]
    assert raw["candidates"][1]["path"] == "../models/digits-baseline.onnx"
    # Why it is there, said where it is: same hardware for latency, and the noise floor.
    comment = text[:text.index('name = "digits-baseline"')].rsplit("\n\n", 1)[-1]
    assert "same machine" in comment and "noise floor" in comment and "reported only" in comment
    settings = load_settings(out)
    assert [c.noise_reference for c in settings.candidates] == [False, True]
    # Without it, the file says what latency is then compared with, and how to add the baseline.
    plain = tmp_path / "plain.toml"
    write_starter(plain, [models["good"]], "digits", None, False)
    assert "--baseline PROD.onnx" in plain.read_text() and "noise_reference = true" not in plain.read_text()


def test_init_baseline_option_on_the_command_line(tmp_path):
    models = build_digits_models(tmp_path / "models")
    out = tmp_path / "shadowlens.toml"
    done = subprocess.run([*CLI, "init", str(models["good"]), "--baseline", str(models["baseline"]), "--model",
                           "digits", "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = tomllib.loads(out.read_text())
    assert [c.get("noise_reference", False) for c in raw["candidates"]] == [False, True]


def test_the_readme_policy_table_is_the_judges_defaults():
    """The README's policy table is generated from JudgePolicy; a default changed in one place only fails here."""
    from pathlib import Path

    from scorers.judge import policy_defaults_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert policy_defaults_table() in readme
