"""``shadowlens init``: a commented starter ``shadowlens.toml`` for the ONNX models it is pointed at.

The candidates' outputs and inputs are read from the model files (onnxruntime), paths are written
relative to the config file (that is how the worker reads them), and the result is loaded once
with the worker's own validation before it is written, so what ``init`` writes always starts.

``--kind`` (scorers/kinds) says what the candidates answer: the config names it and lists the
kind's parameters with their defaults, commented out, beside what its disagreement means.
"""

from __future__ import annotations

import os
from pathlib import Path

from streams.config import ConfigError, KafkaConfig, load_settings

PREFERRED_OUTPUTS = ("probabilities", "probs", "output_probability", "softmax", "logits")
# What other kinds' outputs are usually called (skl2onnx names a regressor's output "variable").
PREFERRED_BY_KIND = {
    "regression": ("variable", "predictions", "prediction", "output"),
    "multilabel": ("probabilities", "probs", "sigmoid", "logits"),
    "ranking": ("scores", "score", "variable", "logits"),
    "embedding": ("embedding", "embeddings", "variable", "output"),
}


def describe_model(path: Path) -> tuple[list[str], list[str]]:
    """(output names, input descriptions 'name: dtype[shape]') of an ONNX file."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    inputs = [f"{i.name}: {i.type}{list(i.shape)}" for i in session.get_inputs()]
    return outputs, inputs


def pick_output(outputs: list[str], kind: str = "classification") -> str:
    preferred = PREFERRED_BY_KIND.get(kind, PREFERRED_OUTPUTS)
    return next((o for p in preferred for o in outputs if o == p), outputs[-1])


def kind_lines(kind: str) -> list[str]:
    """The candidate's ``kind`` line and its parameters with their defaults, commented out."""
    import dataclasses

    from scorers.judge import toml_value
    from scorers.kinds import KIND_NAMES, KINDS

    cls = KINDS[kind]
    params = ", ".join(f"{f.name} = {toml_value(f.default)}" for f in dataclasses.fields(cls))
    if kind == "classification":
        return [f'# kind = "classification"   # what the model answers: {", ".join(KIND_NAMES)} (README, Output kinds)']
    return [
        f'kind = "{kind}"                # what the model answers (README, Output kinds)',
        f"# kind_params = {{ {params} }}   # the defaults; disagreement: {cls.disagree_doc}",
    ]


def policy_block() -> list[str]:
    """The ``[candidates.policy]`` block: every ``JudgePolicy`` field with its default and meaning,
    commented out (so the defaults apply), from the same source as the README's table
    (``scorers.judge.policy_defaults``)."""
    from scorers.judge import policy_defaults

    lines = ["[candidates.policy]   # scorers.judge.JudgePolicy: every line is the default; uncomment one to change it"]
    for name, default, doc, example in policy_defaults():
        if default is None:
            lines.append(f"# {name} = {example}   # (unset by default) {doc}")
        else:
            lines.append(f"# {name} = {default}   # {doc}")
    return lines


def _candidate_lines(out: Path, path: Path, name: str, model_name: str, baseline_output: str | None,
                     kind: str = "classification") -> list[str]:  # fmt: skip
    outputs, inputs = describe_model(path)
    output = pick_output(outputs, kind)
    rel = os.path.relpath(path.resolve(), out.resolve().parent)
    return [
        "[[candidates]]",
        f'name = "{name}"',
        f'model = "{model_name}"                 # MirroredRequest.model this candidate shadows',
        f'path = "{rel}"',
        f'output = "{output}"                    # outputs of this file: {", ".join(outputs)}',
        f'baseline_output = "{baseline_output or output}"   # the MirroredRequest.baseline_output entry to compare with',
        f"# inputs of this file: {'; '.join(inputs)}",
        "# adapter = { rename = { pixels = \"image\" }, cast = { image = \"float32\" } }  # if production's inputs differ",
        *kind_lines(kind),
    ]


def starter_config(out: Path, models: list[Path], model_name: str, baseline_output: str | None,
                   baseline: Path | None = None, kind: str = "classification") -> str:
    """The config text. ``baseline``: the production model's own file, replayed as a
    ``noise_reference`` candidate (latency on the same hardware, and the noise floor)."""
    k = KafkaConfig()
    lines = [
        "# shadowlens worker config (written by `shadowlens init`; every value shown is the default unless",
        "# it is about your models). Run:  shadowlens worker -c " + out.name,
        "# Any field can be overridden by SHADOWLENS_<SECTION>__<FIELD>, e.g. SHADOWLENS_KAFKA__BOOTSTRAP.",
        "",
        "[kafka]",
        f'bootstrap = "{k.bootstrap}"        # scripts/kafka.sh starts a broker here; env KAFKA_BOOTSTRAP',
        f'topic = "{k.topic}"           # the mirror SDK publishes here (MirrorClient / mirror backfill --topic)',
        f'dead_letter_topic = "{k.dead_letter_topic}"',
        "",
        "[clickhouse]",
        'dsn = "chdb:///./shadowlens-data/chdb"  # relative to this file; or http://user:pass@host:8123',
        "retention_days = 30",
        "",
        "[windows]",
        "size_s = 60           # tumbling windows on sent_at; a verdict is written when one closes",
        "",
        "[api]",
        'host = "127.0.0.1"',
        "port = 8080            # GET /v1/verdicts/{model}/{candidate}: what Argo Rollouts / Flagger poll",
        "# tokens = []          # bearer tokens (>= 16 chars); env SHADOWLENS_API_TOKENS=a,b",
        "",
        "[metrics]",
        "port = 9464            # Prometheus /metrics; one port per worker process on a machine (0: any)",
        "",
    ]
    for i, path in enumerate(models):
        lines += _candidate_lines(out, path, path.stem, model_name, baseline_output, kind)
        if i == 0:
            lines += policy_block()
        else:
            lines += ["# [candidates.policy]   # the same fields as under the first candidate, e.g.",
                      "# min_span_s = 86400.0   # one traffic cycle observed before a promote"]
        if baseline is None and i == len(models) - 1:
            lines += [
                "",
                "# Without a candidate marked noise_reference (the production model's own file, replayed here:",
                "# `shadowlens init ... --baseline PROD.onnx` adds it), latency is compared with the latency",
                "# production recorded, on other hardware, and is reported only (latency_gates_without_reference).",
            ]
        lines.append("")
    if baseline is not None:
        names = {p.stem for p in models}
        name = baseline.stem if baseline.stem not in names else f"{baseline.stem}-replay"
        lines += [
            "# The production model itself, replayed beside the candidates on this worker's hardware:",
            "# - latency: each candidate's is compared with this replay's on the same machine and the same",
            "#   requests (paired), not with what production recorded elsewhere (another machine, another path,",
            "#   another load: reported only);",
            "# - noise floor: its diffs against production's answers (numeric noise of the runtime, provider,",
            "#   threads) are subtracted from the candidates' flip and confidence rates.",
            "# Its own verdict is not a decision about anything.",
            *_candidate_lines(out, baseline, name, model_name, baseline_output, kind),
            "noise_reference = true",
            "",
        ]
    return "\n".join(lines)


def write_starter(out: Path, models: list[Path], model_name: str, baseline_output: str | None, force: bool,
                  baseline: Path | None = None, kind: str = "classification") -> Path:
    """Write the starter config. ``baseline`` (``shadowlens init ... --baseline PROD.onnx``): the
    production model's file, added as the replayed baseline (``noise_reference = true``); a model
    given both as a candidate and as the baseline is the baseline only. ``kind``: what the models
    answer (scorers.kinds); an unknown one is a ConfigError naming the kinds."""
    from scorers.kinds import KIND_NAMES

    if kind not in KIND_NAMES:
        raise ConfigError(f"--kind: {kind!r} is not an output kind; use one of {', '.join(KIND_NAMES)}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or --out another path")
    for m in [*models, *([baseline] if baseline is not None else [])]:
        if not m.is_file():
            raise FileNotFoundError(f"{m}: no such model file; pass the ONNX files of the candidates")
    if baseline is not None:
        models = [m for m in models if m.resolve() != baseline.resolve()]
        if not models:
            raise FileNotFoundError(f"{baseline} is the baseline; pass the ONNX files of the candidates too")
    text = starter_config(out, models, model_name, baseline_output, baseline, kind)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    try:
        load_settings(tmp)  # what init writes must start
    finally:
        tmp.unlink()
    out.write_text(text)
    return out
