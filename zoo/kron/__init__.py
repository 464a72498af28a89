"""Kronecker-factored Gaussian algebra for one layer (knows nothing about nn.Module; docs/method.md §1, §4)."""

from zoo.kron.decomposition import Decomposition
from zoo.kron.extend import extend, isotropic_value, rescale_parts, split_diagonal
from zoo.kron.kl import kl_divergence, kl_to_isotropic
from zoo.kron.precision import DEFAULT_APPROXIMATION, Approximation, KronPrecision

__all__ = [
    "DEFAULT_APPROXIMATION",
    "Approximation",
    "Decomposition",
    "KronPrecision",
    "extend",
    "isotropic_value",
    "kl_divergence",
    "kl_to_isotropic",
    "rescale_parts",
    "split_diagonal",
]
