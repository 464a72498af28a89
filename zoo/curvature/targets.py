"""Output-gradient vectors of the three Fisher types, and per-batch seeds that make MC labels reproducible.

The loss of example n is its NLL ℓ_n = -log softmax(f_n)_y, summed (not averaged) over the batch, so
∂ℓ_n/∂f_n = p_n - e_y. Backpropagating these vectors from the logits gives each layer's g.

- "mc": y ~ p(y | x_n), one sample per example (the paper's Fisher);
- "exact": one vector √p_c (p - e_c) per class c, so Σ_c of the outer products is the exact
  expectation over the model's predictive;
- "empirical": y is the loader's label.

MC labels come from a generator seeded by (base seed, global batch index), not from one running
stream, so a resumed or sharded pass draws exactly the labels of an uninterrupted single process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FISHER_TYPES = ("mc", "exact", "empirical")
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def batch_seed(base_seed: int, batch_index: int) -> int:
    """A seed for one batch, derived from the pass's base seed (a splitmix-style mix, fits int64)."""
    z = (base_seed + (batch_index + 1) * _MIX) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def sample_labels(probs: Tensor, seed: int) -> Tensor:
    """One label per row of ``probs`` by inverse-CDF sampling with CPU uniforms (same draws on any device)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64)
    cdf = probs.double().cumsum(dim=1).cpu()
    labels = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_max(probs.shape[1] - 1)
    return labels.to(probs.device)


def output_grads(logits: Tensor, fisher: str, labels: Tensor, seed: int) -> list[Tensor]:
    """The vectors to backpropagate from ``logits`` (B, C): one for "mc"/"empirical", C for "exact"."""
    probs = torch.softmax(logits.detach().double(), dim=1)
    classes = probs.shape[1]
    if fisher == "exact":
        eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
        return [(probs[:, c : c + 1].sqrt() * (probs - eye[c])).to(logits.dtype) for c in range(classes)]
    y = sample_labels(probs, seed) if fisher == "mc" else labels
    return [(probs - F.one_hot(y, classes).to(probs.dtype)).to(logits.dtype)]
