"""``shadowlens candidates add|list|show|retire|reset``: the candidate registry from a shell.

The commands talk to Kafka only (the registry topic and the mirror topic's end offsets), so they
run anywhere the broker is reachable; streams/registry/commands.py says what each one writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="The candidate registry (a compacted Kafka topic): add, list, show, retire, reset.",
                  no_args_is_help=True)  # fmt: skip
CONFIG = typer.Option(Path("shadowlens.toml"), "--config", "-c", help="the worker's TOML config (its [kafka])")
MODEL = typer.Option(..., "--model", help="the logical model the candidate shadows")
CANDIDATE = typer.Option(..., "--candidate", help="the candidate's name")


def _json(option: str, text: str | None) -> Any:
    from streams.cli import _fail

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(f"{option}: not JSON ({exc}); e.g. {option} '{{\"abs_tolerance\": 0.5}}'")
    if not isinstance(value, dict):
        _fail(f"{option}: a JSON object is needed, e.g. {option} '{{}}'")
    return value


def _do(config: Path, make):
    """Run one registry command; its errors as one line, exit 2."""
    from streams.cli import _fail, _settings
    from streams.config import ConfigError
    from streams.registry.store import RegistryError, run

    settings = _settings(config)
    try:
        return settings, run(make(settings))
    except (RegistryError, ConfigError, OSError) as exc:
        _fail(exc)


@app.command("add")
def add(
    model: str = MODEL, candidate: str = CANDIDATE,
    path: str = typer.Option(None, "--path", help="the artifact (a local path or file://); needed for a new candidate"),
    sha256: str = typer.Option(None, "--sha256", help="its SHA-256 (default: computed from the file)"),
    runtime: str = typer.Option(None, "--runtime", help="onnx or torch (default: from the file's suffix)"),
    kind: str = typer.Option(None, "--kind", help="classification, regression, multilabel, ranking or embedding"),
    kind_params: str = typer.Option(None, "--kind-params", help="JSON object of the kind's parameters"),
    adapter: str = typer.Option(None, "--adapter", help="JSON object: rename / cast / scale / shift of inputs"),
    cast: str = typer.Option(None, "--cast", help="no, safe or same_kind"),
    output: str = typer.Option(None, "--output", help="the candidate's output compared"),
    baseline_output: str = typer.Option(None, "--baseline-output", help="the baseline's output in the request"),
    from_logits: bool = typer.Option(None, "--from-logits/--no-from-logits"),
    policy: str = typer.Option(None, "--policy", help="JSON object of JudgePolicy fields"),
    noise_reference: bool = typer.Option(None, "--noise-reference/--no-noise-reference"),
    config: Path = CONFIG,
) -> None:
    """Register a candidate (scored from the mirror's end offsets now), or change one: options left out
    keep the registered values; a new artifact or I/O spec is a new version, a new policy a new policy version."""
    from streams.registry.commands import add as add_
    from streams.judge.retire import who

    fields = dict(path=path, sha256=sha256, runtime=runtime, kind=kind, kind_params=_json("--kind-params", kind_params),
                  adapter=_json("--adapter", adapter), cast=cast, output=output, baseline_output=baseline_output,
                  from_logits=from_logits, policy=_json("--policy", policy), noise_reference=noise_reference)  # fmt: skip
    _, rec = _do(config, lambda s: add_(s, model, candidate, fields, who()))
    typer.echo(f"{rec.key}: version {rec.version} (pair {rec.pair}), policy version {rec.policy_version}, {rec.state}, "
               f"scored from mirror offsets {_offsets(rec.start_offsets)}")  # fmt: skip


@app.command("list")
def list_(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every candidate's current version and state."""
    from streams.registry.store import describe, read_all

    _, (specs, statuses) = _do(config, read_all)
    rows = [describe(rec, statuses.get(key), statuses.get(rec.verdict_key))
            for key, rec in sorted(specs.items()) if "@v" not in key]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['model']}/{r['candidate']}\tv{r['version']}\tpolicy v{r['policy_version']}\t{r['state']}\t"
                   f"{r['sha256'][:12]}\t{r['path']}")  # fmt: skip


@app.command("show")
def show(model: str = MODEL, candidate: str = CANDIDATE, config: Path = CONFIG) -> None:
    """One candidate's record as JSON: state (refused: with the reason), offsets, versions."""
    from streams.registry.store import describe, read_all

    _, (specs, statuses) = _do(config, read_all)
    key = f"{model}/{candidate}"
    if key not in specs:
        from streams.cli import _fail

        _fail(f"{key} is not registered; `shadowlens candidates list` shows what is")
    out = describe(specs[key], statuses.get(key), statuses.get(specs[key].verdict_key))
    out["earlier_versions"] = [describe(r, None) for k, r in sorted(specs.items()) if k.startswith(f"{key}@v")]
    typer.echo(json.dumps(out, indent=2))


@app.command("retire")
def retire(model: str = MODEL, candidate: str = CANDIDATE, config: Path = CONFIG,
           reason: str = typer.Option("retired by an operator", help="why")) -> None:  # fmt: skip
    """Stop replaying it from the mirror's end offsets now; its verdict becomes final, its data stays."""
    from streams.registry.commands import retire as retire_
    from streams.judge.retire import who

    _, rec = _do(config, lambda s: retire_(s, model, candidate, reason, who()))
    typer.echo(f"{rec.key}: retired; not scored from mirror offsets {_offsets(rec.stop_offsets or {})}")


@app.command("reset")
def reset(model: str = MODEL, candidate: str = CANDIDATE, config: Path = CONFIG) -> None:
    """Back to registered from now on: refused (same version), retired (a new version), or pending offsets."""
    from streams.registry.commands import reset as reset_
    from streams.judge.retire import who

    _, rec = _do(config, lambda s: reset_(s, model, candidate, who()))
    typer.echo(f"{rec.key}: version {rec.version} (pair {rec.pair}) {rec.state}, scored from mirror offsets "
               f"{_offsets(rec.start_offsets)}")  # fmt: skip


def _offsets(offsets: dict[int, int]) -> str:
    return ", ".join(f"p{p}@{o}" for p, o in sorted(offsets.items())) or "the beginning"
