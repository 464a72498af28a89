"""prior-zoo: learned Kronecker-factored Bayesian priors for timm models."""

from __future__ import annotations

from zoo.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    HubError,
    InvalidFactorError,
    ModelError,
    NumericalError,
    SingularPrecisionError,
    ZooError,
)

__version__ = "0.1.0"

_LAZY = {
    "build_prior": "zoo.build",
    "load": "zoo.loading",
    "Prior": "zoo.prior",
    "finetune": "zoo.tuning",
    "Posterior": "zoo.posterior",
    "certify_data_dependent": "zoo.certified",
}


def __getattr__(name: str) -> object:
    """Import the heavy entry points (torch, timm) on first use, so `zoo --help` stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "HubError",
    "InvalidFactorError",
    "ModelError",
    "NumericalError",
    "Posterior",
    "Prior",
    "SingularPrecisionError",
    "ZooError",
    "__version__",
    "build_prior",
    "certify_data_dependent",
    "finetune",
    "load",
]
