"""Service settings: one frozen value built from flags and `ZOO_*` environment variables, passed to create_app."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError

SERVE_MODES = ("fast", "nn", "glm", "map")
"""The predictive modes of zoo.predictive, plus "map": the network's own softmax (one pass, no uncertainty split),
the baseline a plain timm model would give."""

DEFAULT_SERVE_MODE = "fast"
"""One forward pass: the service default, because its latency is the network's own (benchmarks/service.py)."""

ENV_PREFIX = "ZOO_"
SETTINGS_ENV = "ZOO_SERVE_SETTINGS"
"""JSON of the settings, handed to `--workers` processes (the token stays in ZOO_API_TOKEN, never in this JSON)."""


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to start; each limit has a flag and a `ZOO_<NAME>` environment variable."""

    refs: tuple[str, ...] = ()  # repository directories or hf-hub refs; empty: the embedded default
    mode: str = DEFAULT_SERVE_MODE
    samples: int = 32
    seed: int = 0
    max_batch: int = 32  # images per micro-batch
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # inference requests admitted at once (reading, decoding, queued, running)
    max_body_bytes: int = 16 * 2**20
    max_files: int = 16  # images per request (files in /v1 predict, N in /v2 infer)
    max_pixels: int = 4096 * 3072  # decoded pixels per image (12.6 MP, a phone photo)
    max_samples: int = 256  # largest ?samples=
    predictor_cache: int = 4  # predictors kept per model for other ?samples= than the default
    decode_threads: int = 2  # images decoded at once; bounds decoding memory
    api_token: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in SERVE_MODES:
            raise ConfigError(f"--mode must be one of {', '.join(SERVE_MODES)}, got {self.mode!r}")
        for name in ("samples", "max_batch", "queue_size", "max_body_bytes", "max_files", "max_pixels",
                     "max_samples", "predictor_cache", "decode_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"max_wait_ms must be zero or positive, got {self.max_wait_ms!r}")
        if self.samples > self.max_samples:
            raise ConfigError(f"--samples {self.samples} exceeds --max-samples {self.max_samples}; raise the latter")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `ZOO_<FIELD>` variables, then explicit overrides (flags; None means "not given")."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "refs":
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("refs", "cors_origins"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_json(self) -> str:
        """The settings without the token, for worker processes."""
        data = dataclasses.asdict(self)
        data.pop("api_token")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, environ: Mapping[str, str] | None = None) -> Settings:
        """Inverse of to_json; the token comes from ZOO_API_TOKEN."""
        data = json.loads(text)
        env = os.environ if environ is None else environ
        data["api_token"] = env.get("ZOO_API_TOKEN") or None
        data["refs"] = tuple(data["refs"])
        data["cors_origins"] = tuple(data["cors_origins"])
        return cls(**data)


def _parse(name: str, raw: str, default: object) -> object:
    """An environment string as the type of the field's default."""
    if name == "cors_origins":
        return tuple(o.strip() for o in raw.split(",") if o.strip())
    if isinstance(default, float):
        kind: type = float
    elif isinstance(default, int):
        kind = int
    else:
        return raw
    try:
        return kind(raw)
    except ValueError as err:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from err
