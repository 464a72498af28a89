"""Per-module curvature blocks: the values returned by the curvature passes (K-FAC, K-FOC)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class KronBlock:
    """Kronecker block of a Linear / Conv2d (groups == 1): Fisher ≈ kron(A, G), docs/method.md §1 convention.

    A is in × in with the bias folded in as the last row and column (absent when the layer has no bias),
    G is out × out. A conv's in is in_channels·kh·kw (+1 for the bias).
    """

    A: Tensor
    G: Tensor


@dataclass
class DiagonalBlock:
    """Diagonal Fisher of a module's own parameters, keyed by local parameter name (shaped like each)."""

    diagonal: dict[str, Tensor] = field(default_factory=dict)


Block = KronBlock | DiagonalBlock
