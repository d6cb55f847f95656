"""Input adapter: map a v1 request's inputs onto what the v2 candidate expects.

A model migration changes input contracts (renamed inputs, dtype, normalisation); the adapter
lets the old traffic drive the new model without touching production callers. Applied in this
order per input: rename -> cast -> ``x * scale + shift``. Inputs the candidate does not take are
dropped with ``drop``; everything else passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas import SUPPORTED_DTYPES


class AdapterError(ValueError):
    """A request's inputs cannot be mapped (missing input, impossible cast)."""


class AdapterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rename: dict[str, str] = Field(default_factory=dict, description="v1 input name -> v2 input name")
    cast: dict[str, str] = Field(default_factory=dict, description="v2 input name -> dtype")
    scale: dict[str, float] = Field(default_factory=dict, description="v2 input name -> multiplier")
    shift: dict[str, float] = Field(default_factory=dict, description="v2 input name -> offset added after scale")
    drop: list[str] = Field(default_factory=list, description="v1 inputs the candidate does not take")

    @field_validator("cast")
    @classmethod
    def _known_dtypes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, dtype in value.items():
            if dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"cast.{name}: {dtype!r} is not a dtype; use one of {', '.join(SUPPORTED_DTYPES)}")
        return value


class InputAdapter:
    def __init__(self, config: AdapterConfig | None = None):
        self.config = config or AdapterConfig()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        missing = [name for name in cfg.rename if name not in inputs]
        if missing:
            raise AdapterError(f"inputs: {', '.join(missing)} expected by the adapter's rename but not in the request")
        out: dict[str, np.ndarray] = {}
        for name, array in inputs.items():
            if name in cfg.drop:
                continue
            out[cfg.rename.get(name, name)] = array
        for name, dtype in cfg.cast.items():
            if name in out:
                out[name] = out[name].astype(dtype, copy=False)
        for name in set(cfg.scale) | set(cfg.shift):
            if name not in out:
                continue
            arr = out[name] * cfg.scale.get(name, 1.0) + cfg.shift.get(name, 0.0)
            out[name] = arr.astype(cfg.cast.get(name, out[name].dtype), copy=False)
        return out
