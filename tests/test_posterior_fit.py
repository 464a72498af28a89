"""zoo.posterior_fit: Böhning's bound for a new head's curvature, checked against softmax Hessians and a dense Q."""

from __future__ import annotations

import pytest
import torch
from digits_task import CLASSES, downstream, upstream_prior_dir

import zoo
from zoo.curvature import KronBlock, kfac
from zoo.posterior_fit import bohning_factor, new_classifier, with_bohning_heads
from zoo.tuning import isotropic_prior


def softmax_hessian(p: torch.Tensor) -> torch.Tensor:
    return torch.diag(p) - torch.outer(p, p)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_bohning_factor_bounds_every_softmax_hessian(classes: int) -> None:
    """½(I − 11ᵀ/C) − (diag(p) − ppᵀ) is PSD for any p on the simplex, peaked or flat; equality at C = 2, p = ½."""
    g = torch.Generator().manual_seed(classes)
    bound = bohning_factor(classes)
    torch.testing.assert_close(bound, bound.T)
    torch.testing.assert_close(bound @ torch.ones(classes, dtype=torch.float64),
                               torch.zeros(classes, dtype=torch.float64))
    for scale in (0.1, 1.0, 5.0, 30.0):  # from near-uniform to near one-hot
        for _ in range(50):
            p = torch.softmax(scale * torch.randn(classes, generator=g, dtype=torch.float64), 0)
            assert torch.linalg.eigvalsh(bound - softmax_hessian(p)).min().item() >= -1e-12
    if classes == 2:
        torch.testing.assert_close(bound, softmax_hessian(torch.tensor([0.5, 0.5], dtype=torch.float64)))
    # the bound is not slack by a constant: its top eigenvalue ½ is approached by a softmax Hessian for every C
    top = max(torch.linalg.eigvalsh(softmax_hessian(torch.tensor([0.5, 0.5] + [0.0] * (classes - 2),
                                                                  dtype=torch.float64))).max().item(), 0.0)
    assert top == pytest.approx(torch.linalg.eigvalsh(bound).max().item())


def head_inputs(model: torch.nn.Module, head: str, batches: list) -> torch.Tensor:
    """Σ [φ; 1][φ; 1]ᵀ over the training images, by a hook on the head: the dense input factor, not K-FAC's."""
    seen = []
    handle = dict(model.named_modules())[head].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    phi = torch.cat(seen).double()
    phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=torch.float64)], 1)
    return phi.T @ phi


@pytest.mark.parametrize("head_curvature", ["bohning", "fisher"])
def test_a_new_heads_q_is_its_curvature_on_its_inputs_plus_the_evidence_prior(head_curvature: str) -> None:
    """Q's head precision, densely: (kron(A, G) + α·κ·λ·I)/τ with A the head's training inputs and G Böhning's
    bound by default, K-FAC's output factor with head_curvature='fisher'; the body is not touched by the choice."""
    train, _, _ = downstream(5, 0)
    torch.manual_seed(0)
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
    post = zoo.finetune(model, prior, train, epochs=3, progress=False, head_curvature=head_curvature,
                        generator=torch.Generator().manual_seed(0))
    (head,) = new_classifier(post.model, prior)
    assert post.meta["head_curvature"]["heads"] == ([head] if head_curvature == "bohning" else [])
    a = head_inputs(post.model, head, train)
    g = bohning_factor(CLASSES) if head_curvature == "bohning" else None
    scales = post.meta["scales"][head]
    kappa = post.meta["strength"]["kappa"]["head"]
    lam = prior.layers[head].lam
    dense = post.layers[head].precision.dense()
    identity = torch.eye(dense.shape[0], dtype=torch.float64)
    if g is None:  # fisher: recover G from Q itself and check it is K-FAC's (PSD, far below the bound)
        rest = dense * scales["tau"] - scales["alpha"] * kappa * lam * identity
        g = rest[: CLASSES, : CLASSES] / a[0, 0]  # kron(A, G)'s first block is A[0, 0]·G
        assert torch.linalg.eigvalsh(g).min().item() >= -1e-9
        assert torch.linalg.eigvalsh(g).max().item() < 0.5 * 0.5  # a fitted head's mean Λ: well inside the bound
    expected = (torch.kron(a, g) + scales["alpha"] * kappa * lam * identity) / scales["tau"]
    # A is accumulated in float32 by the K-FAC pass: agreement to float32 rounding of the largest entry
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-7 * expected.diagonal().max().item())


def test_bohning_replaces_only_the_new_classifier_even_under_an_isotropic_prior() -> None:
    """isotropic_prior gives every layer an isotropic prior; only the classifier's outputs are logits."""
    train, _, _ = downstream(5, 0)
    torch.manual_seed(0)
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
    iso = isotropic_prior(prior)
    (head,) = new_classifier(model, iso)
    assert head == model.pretrained_cfg["classifier"]
    assert new_classifier(model, zoo.load(upstream_prior_dir())[1]) == []  # a pretrained head keeps its K-FAC
    blocks = kfac(model, train, "mc", generator=torch.Generator().manual_seed(0), progress=False)
    replaced = with_bohning_heads(blocks, [head])
    assert replaced.n == blocks.n and replaced.nll_sum == blocks.nll_sum
    for name, block in blocks.items():
        if name == head:
            assert torch.equal(replaced[name].A, block.A)
            torch.testing.assert_close(replaced[name].G, bohning_factor(CLASSES, dtype=block.G.dtype))
        else:
            assert replaced[name] is block
    assert isinstance(replaced[head], KronBlock)
