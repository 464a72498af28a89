"""Kronecker-factored Gaussian algebra for one layer (knows nothing about nn.Module; METHOD.md §1, §4)."""

from zoo.kron.decomposition import Decomposition
from zoo.kron.kl import kl_divergence, kl_to_isotropic
from zoo.kron.precision import DEFAULT_APPROXIMATION, Approximation, KronPrecision

__all__ = [
    "DEFAULT_APPROXIMATION",
    "Approximation",
    "Decomposition",
    "KronPrecision",
    "kl_divergence",
    "kl_to_isotropic",
]
