"""zoo.curvature.kfac on the five reference timm architectures: full coverage, and the model left as found."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from zoo.curvature import DiagonalBlock, KronBlock, kfac

ARCHS = {
    "resnet18": {},
    "resnet50": {},
    "efficientnet_lite0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}


def covered(model: nn.Module, blocks: dict) -> dict[str, tuple[int, ...]]:
    """Fully-qualified parameter name -> shape, for every parameter a block accounts for (checking shapes)."""
    out = {}
    for owner, block in blocks.items():
        module = model.get_submodule(owner)
        prefix = f"{owner}." if owner else ""
        if isinstance(block, KronBlock):
            w, b = module.weight, module.bias
            has_bias = b is not None and b.requires_grad
            assert block.A.shape == (w[0].numel() + has_bias,) * 2
            assert block.G.shape == (w.shape[0],) * 2
            if block.A.shape[0] <= 1024:
                torch.testing.assert_close(block.A, block.A.T)
            out[prefix + "weight"] = tuple(w.shape)
            if has_bias:
                out[prefix + "bias"] = tuple(b.shape)
        else:
            assert isinstance(block, DiagonalBlock)
            for local, value in block.diagonal.items():
                assert tuple(value.shape) == tuple(module.get_parameter(local).shape)
                assert bool((value >= 0).all())
                out[prefix + local] = tuple(value.shape)
    return out


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not m._backward_pre_hooks


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_coverage_and_state(arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, **ARCHS[arch])
    model.train()
    params = list(model.parameters())
    params[1].requires_grad_(False)  # a frozen parameter is skipped
    params[-1].grad = torch.randn_like(params[-1])  # an existing gradient is kept
    before = snapshot(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g))]
    blocks = kfac(model, data, progress=False, generator=torch.Generator().manual_seed(0))
    assert_unchanged(model, before)
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert covered(model, blocks) == want  # 100% of the trainable parameters, each once
    assert blocks.n == 2 and blocks.nll_sum > 0
    for block in blocks.values():
        values = [block.A, block.G] if isinstance(block, KronBlock) else list(block.diagonal.values())
        assert all(bool(torch.isfinite(v).all()) for v in values)
