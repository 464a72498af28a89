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

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "HubError",
    "InvalidFactorError",
    "ModelError",
    "NumericalError",
    "SingularPrecisionError",
    "ZooError",
    "__version__",
]
