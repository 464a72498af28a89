"""How a module's parameters map onto the Gaussian blocks of a Prior (knows nn.Module; zoo.kron does not)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo.kron import KronPrecision


def kron_params(module: nn.Module) -> tuple[str, ...]:
    """The parameters a K-FAC block covers: the weight, and the bias when it exists and is trained."""
    bias = getattr(module, "bias", None)
    return ("weight", "bias") if bias is not None and bias.requires_grad else ("weight",)


def kron_matrix(module: nn.Module, params: tuple[str, ...] = ("weight", "bias")) -> Tensor:
    """[W | b] as (out, in·kh·kw [+1]): the layout of a K-FAC block (bias as the last column), differentiable."""
    w = module.weight.reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias[:, None]], dim=1) if "bias" in params else w


def split_matrix(module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
    """Inverse of kron_matrix: local parameter name → tensor shaped like that parameter."""
    weight = module.weight
    cols = weight[0].numel()
    out = {"weight": matrix[:, :cols].reshape(weight.shape)}
    if matrix.shape[1] > cols:
        out["bias"] = matrix[:, cols]
    return out


def in_layout_of(value: Tensor, reference: Tensor) -> Tensor:
    """`value` with `reference`'s strides: a draw for a channels_last conv weight must be channels_last too, or
    every convolution with it converts (measured: a channels_last efficientnet_lite0 runs 1.5–4× faster on CPU).
    Strides, not is_contiguous: a depthwise (C, 1, k, k) weight counts as both layouts, but oneDNN reads strides."""
    if reference.ndim != 4 or value.stride() == reference.stride():
        return value
    return torch.empty_like(reference, dtype=value.dtype, device=value.device).copy_(value)


@dataclass
class KronLayer:
    """A Linear / Conv2d's [W | b] ~ N(mean, precision⁻¹) with a Kronecker-factored precision."""

    precision: KronPrecision
    params: tuple[str, ...]  # local names, ("weight",) or ("weight", "bias")


@dataclass
class DiagLayer:
    """Other parameters of a module: independent Gaussians, one precision per entry."""

    precision: dict[str, Tensor]  # local name → elementwise precision, shaped like the parameter


@dataclass
class IsoLayer:
    """A head without pretrained curvature (a new task's classifier): N(0, λ⁻¹I)."""

    lam: float
    params: tuple[str, ...]


Layer = KronLayer | DiagLayer | IsoLayer


def isotropic_kron(lam: float, out: int, inn: int) -> KronPrecision:
    """λI over an (out × inn) [W | b] as one Kronecker term λ(I ⊗ I): a new head's prior in K-FAC form."""
    return KronPrecision([(torch.eye(inn, dtype=torch.float64), torch.eye(out, dtype=torch.float64))], [lam])


class LazyLayers(Mapping[str, Layer]):
    """Layers loaded on first access, so opening a large prior reads nothing it does not use."""

    def __init__(self, names: list[str], load: Callable[[str], Layer]) -> None:
        self._names = names
        self._load = load
        self._cache: dict[str, Layer] = {}

    def __getitem__(self, name: str) -> Layer:
        if name not in self._cache:
            if name not in self._names:
                raise KeyError(name)
            self._cache[name] = self._load(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
