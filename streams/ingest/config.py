"""``[ingest]`` and ``[[ingest.kserve]]``: what ``shadowlens ingest`` listens on and how a serving
layer's calls become mirrored requests."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from schemas import MAX_NAME_CHARS, SUPPORTED_DTYPES
from streams.candidate_config import Section
from streams.config_tokens import path_safe_tokens, split_tokens


class KServeRoute(Section):
    """One InferenceService whose payload logger feeds the mirror topic."""

    inference_service: str = Field(min_length=1, description="the InferenceService's name (Ce-Inferenceservicename)")
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="MirroredRequest.model its calls become")
    baseline_version: str = Field(default="", max_length=MAX_NAME_CHARS,
                                  description="the production version; empty: the response's model_version, else "
                                  "the InferenceService's name")  # fmt: skip
    input: str = Field(default="input", min_length=1, description="V1 protocol: the input tensor `instances` become "
                       "(V2 requests name their own)")  # fmt: skip
    input_dtype: str = Field(default="float32", description="V1 protocol: the dtype of `instances`")
    output: str = Field(default="output", min_length=1, description="V1 protocol: the output tensor `predictions` "
                        "become; the candidates' baseline_output names it")  # fmt: skip
    output_dtype: str = Field(default="float32", description="V1 protocol: the dtype of `predictions`")
    attributes: dict[str, str] = Field(default_factory=dict,
                                       description="request header (in the logger's metadataHeaders) -> attribute "
                                       "key, e.g. {\"x-country\" = \"country\"}")  # fmt: skip
    sample_key_header: str = Field(default="", description="request header whose value is the sample key (a user "
                                   "or session id; in the logger's metadataHeaders)")  # fmt: skip

    @field_validator("input_dtype", "output_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in SUPPORTED_DTYPES:
            raise ValueError(f"{value!r} is not a tensor dtype; use one of {', '.join(SUPPORTED_DTYPES)}")
        return value


class IngestConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535, description="where KServe's logger posts (logger.url)")
    tokens: list[str] = Field(default_factory=list, description="accepted as the URL's last path segment "
                              "(KServe's logger sends no headers of its own: logger.url = "
                              "http://host:8090/v1/ingest/kserve/<token>) or as a bearer header")  # fmt: skip
    insecure: bool = Field(default=False, description="listen on a non-loopback host without tokens, on purpose")
    halves_topic: str = Field(default="", description="the logged events as received; empty: '<mirror topic>.kserve'")
    group_id: str = Field(default="", description="the pairing consumer group; empty: '<group_id>-ingest'")
    pair_timeout_s: float = Field(default=60.0, gt=0, description="a request event without its response this long "
                                  "after it (or a response without its request) is a dead letter")  # fmt: skip
    max_body_bytes: int = Field(default=8 << 20, ge=1024, le=64 << 20, description="a larger event is refused (413)")
    kserve: list[KServeRoute] = Field(default_factory=list)

    def exposure_problem(self) -> str | None:
        """Why the endpoint must not listen: on a non-loopback host without tokens, anyone who reaches it
        could write requests into the mirror topic."""
        from streams.config import _is_loopback

        if self.tokens or self.insecure or _is_loopback(self.host):
            return None
        return (f"[ingest] host = {self.host!r} is reachable from other machines and [ingest] tokens is empty, so "
                "anyone who reaches it could write mirrored requests; set [ingest] tokens (logger.url = "
                "http://<host>:<port>/v1/ingest/kserve/<token>), listen on 127.0.0.1, or set [ingest] insecure = "
                "true on a network you trust")  # fmt: skip

    @property
    def configured(self) -> bool:
        return bool(self.kserve)

    @model_validator(mode="after")
    def _unique(self) -> IngestConfig:
        names = [r.inference_service for r in self.kserve]
        if len(names) != len(set(names)):
            raise ValueError("kserve: an inference_service appears twice; each InferenceService maps to one model")
        return self

    _split = field_validator("tokens", mode="before")(split_tokens)
    _path_safe = field_validator("tokens")(path_safe_tokens)
