"""Tiny seeded models and loaders shared by the curvature tests and their subprocess workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def mlp(classes: int = 3, seed: int = 0) -> nn.Module:
    """Linear-tanh-Linear-tanh-Linear, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, classes)).double()


def tiny_cnn(classes: int = 3, seed: int = 0) -> nn.Module:
    """Two convs (one strided, padded) and a Linear head, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, bias=True), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, classes),
    ).double()


def batches(n_batches: int, batch: int, shape: tuple[int, ...], classes: int, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


class SlowLoader:
    """Yields fixed batches with a delay, so a test can kill the pass in the middle."""

    def __init__(self, data: list[tuple[Tensor, Tensor]], delay: float) -> None:
        self.data, self.delay = data, delay

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for item in self.data:
            time.sleep(self.delay)
            yield item


def mixed_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU, a depthwise conv, GroupNorm and a Linear head (float32): every accumulator kind but root."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes),
    )


def flatten_blocks(blocks: dict) -> dict[str, Tensor]:
    """Blocks as a flat name -> tensor dict (for safetensors and comparisons)."""
    out = {}
    for name, block in blocks.items():
        if hasattr(block, "A"):
            out[f"{name}/A"], out[f"{name}/G"] = block.A.contiguous(), block.G.contiguous()
        else:
            out.update({f"{name}/diag/{k}": v.contiguous() for k, v in block.diagonal.items()})
    return out
