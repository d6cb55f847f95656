"""``shadowlens init``: a commented starter ``shadowlens.toml`` for the ONNX models it is pointed at.

The candidates' outputs and inputs are read from the model files (onnxruntime), paths are written
relative to the config file (that is how the worker reads them), and the result is loaded once
with the worker's own validation before it is written, so what ``init`` writes always starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from streams.config import KafkaConfig, load_settings

PREFERRED_OUTPUTS = ("probabilities", "probs", "output_probability", "softmax", "logits")


def describe_model(path: Path) -> tuple[list[str], list[str]]:
    """(output names, input descriptions 'name: dtype[shape]') of an ONNX file."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    inputs = [f"{i.name}: {i.type}{list(i.shape)}" for i in session.get_inputs()]
    return outputs, inputs


def pick_output(outputs: list[str]) -> str:
    return next((o for p in PREFERRED_OUTPUTS for o in outputs if o == p), outputs[-1])


def starter_config(out: Path, models: list[Path], model_name: str, baseline_output: str | None) -> str:
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
        outputs, inputs = describe_model(path)
        output = pick_output(outputs)
        rel = os.path.relpath(path.resolve(), out.resolve().parent)
        lines += [
            "[[candidates]]",
            f'name = "{path.stem}"',
            f'model = "{model_name}"                 # MirroredRequest.model this candidate shadows',
            f'path = "{rel}"',
            f'output = "{output}"                    # outputs of this file: {", ".join(outputs)}',
            f'baseline_output = "{baseline_output or output}"   # the MirroredRequest.baseline_output entry to compare with',
            f"# inputs of this file: {'; '.join(inputs)}",
            "# adapter = { rename = { pixels = \"image\" }, cast = { image = \"float32\" } }  # if production's inputs differ",
            "# margins per metric; min_span_s: one traffic cycle observed before a promote (86400: a day)",
            "# policy = { label_flip_rate_margin = 0.02, abs_confidence_delta_margin = 0.05, min_samples = 500, "
            "min_span_s = 86400 }",
            "# noise_reference = true   # for the baseline model itself, replayed: its diffs are the noise floor",
            "",
        ]
    return "\n".join(lines)


def write_starter(out: Path, models: list[Path], model_name: str, baseline_output: str | None, force: bool) -> Path:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or --out another path")
    for m in models:
        if not m.is_file():
            raise FileNotFoundError(f"{m}: no such model file; pass the ONNX files of the candidates")
    text = starter_config(out, models, model_name, baseline_output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    try:
        load_settings(tmp)  # what init writes must start
    finally:
        tmp.unlink()
    out.write_text(text)
    return out
