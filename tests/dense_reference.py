"""Dense brute-force references for a two-layer MLP (modules "0" and "2"): its Jacobian over every parameter and a
Gaussian's full covariance, to check the predictive modes and the width choices against."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import zoo
from zoo.layers import KronLayer


def dense_covariance(prior: zoo.Prior, names: list[str]) -> Tensor:
    """Block-diagonal covariance over the flattened parameters in `names` order (dense inverse of each block)."""
    blocks = []
    for module in ("0", "2"):
        layer = prior.layers[module]
        assert isinstance(layer, KronLayer)
        cov_vec = torch.linalg.inv(layer.precision.dense())  # over vec([W | b]), columns stacked
        out, inn = layer.precision.shape
        # map vec([W|b]) (column-major) to [W row-major, b] as flattened by named_parameters
        perm = []
        for o in range(out):
            perm.extend(i * out + o for i in range(inn - 1))
        perm.extend((inn - 1) * out + o for o in range(out))
        idx = torch.tensor(perm)
        blocks.append(cov_vec[idx][:, idx])
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    return torch.block_diag(*blocks)


def jacobian(model: nn.Module, x: Tensor) -> tuple[Tensor, list[str]]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def f(flat: Tensor) -> Tensor:
        pieces, start = {}, 0
        for k in names:
            n = params[k].numel()
            pieces[k] = flat[start:start + n].reshape(params[k].shape)
            start += n
        return functional_call(model, pieces, (x,))

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return jacrev(f)(flat), names  # (N, C, d)
