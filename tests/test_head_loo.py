"""zoo.head_loo: a new head's leave-one-out logits against dense removal, and the width test on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from digits_task import CLASSES, downstream, upstream_prior_dir

import zoo
from zoo.head_loo import HeadLeaveOneOut, head_leave_one_out, select_width_leave_one_out
from zoo.layers import KronLayer
from zoo.posterior_fit import bohning_factor


def fit(shots: int) -> tuple[zoo.Posterior, list]:
    train, _, _ = downstream(shots, 0)
    torch.manual_seed(0)
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
    post = zoo.finetune(model, prior, train, epochs=3, progress=False, generator=torch.Generator().manual_seed(0))
    return post, train


def head_inputs(post: zoo.Posterior, head: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's inputs with the bias's 1 appended, its logits), float64, by a hook: nothing of zoo.head_loo."""
    seen: list[torch.Tensor] = []
    module = dict(post.model.named_modules())[head]
    handle = module.register_forward_hook(lambda _m, inputs, out: seen.append(inputs[0].reshape(len(x), -1)))
    with torch.no_grad():
        logits = post.model.eval()(x).double()
    handle.remove()
    phi = seen[0].double()
    return torch.cat([phi, torch.ones(len(x), 1, dtype=phi.dtype)], 1), logits


def test_leave_one_out_matches_removing_the_example_from_the_dense_precision() -> None:
    """Q's head precision at T = 1 is Σᵢ āᵢāᵢᵀ ⊗ B + cI (checked here, dense); removing example i's term and taking
    one Newton step from the mean gives its logit covariance J Λ₋ᵢ⁻¹ Jᵀ and mean f + J Λ₋ᵢ⁻¹ Jᵀ (p − y), which the
    per-direction Sherman–Morrison form must reproduce."""
    post, train = fit(5)
    head = post.model.pretrained_cfg["classifier"]
    assert post.meta["width"]["pinned_heads"] == {}
    tau = post.meta["scales"][head]["tau"]
    q = post.scaled({head: tau})  # the Laplace posterior, T = 1, in the head
    layer = q.layers[head]
    assert isinstance(layer, KronLayer)
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    a, f = head_inputs(q, head, x)
    b = bohning_factor(CLASSES)
    data = sum(torch.kron(a[i : i + 1].T @ a[i : i + 1], b) for i in range(len(x)))
    precision = layer.precision.dense()
    prior_part = precision - data
    c = prior_part.diagonal().mean()
    torch.testing.assert_close(prior_part, c * torch.eye(len(precision), dtype=torch.float64), rtol=0,
                               atol=1e-6 * precision.abs().max().item())  # A summed in float32
    loo = head_leave_one_out(q, q.model, head, train)
    assert isinstance(loo, HeadLeaveOneOut)
    p = torch.softmax(f, -1)
    for i in range(0, len(x), 4):
        jac = torch.kron(a[i : i + 1], torch.eye(CLASSES, dtype=torch.float64))  # vec(W) = W.T.reshape(-1)
        removed = precision - torch.kron(a[i : i + 1].T @ a[i : i + 1], b)
        cov = jac @ torch.linalg.solve(removed, jac.T)
        mean = f[i] + cov @ (p[i] - F.one_hot(y[i], CLASSES).double())
        torch.testing.assert_close(loo.rotation @ torch.diag(loo.variance[i]) @ loo.rotation.T, cov,
                                   rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(loo.mean[i], mean, rtol=1e-6, atol=1e-8)
        in_sample = jac @ torch.linalg.solve(precision, jac.T)
        assert torch.trace(cov) > torch.trace(in_sample)  # leaving the example out widens its own logits
    assert torch.equal(loo.labels, y)


def test_the_rule_takes_the_widest_width_within_the_slack() -> None:
    """Examples whose left-out logits are right but close call: a wide T costs them log-likelihood, so the widest T
    within `slack` nats of the mean's wins; with no slack only the narrowest meets it, and accuracy lost rules a
    width out whatever the slack."""
    mean = torch.tensor([[2.0, 0.0, -2.0], [0.0, 1.5, 0.0], [-1.0, -1.0, 1.0]], dtype=torch.float64).repeat(4, 1)
    labels = torch.tensor([0, 1, 2]).repeat(4)
    loo = HeadLeaveOneOut(mean, torch.full_like(mean, 4.0), torch.eye(3, dtype=torch.float64), labels)
    grid = (1.0, 0.3, 0.1, 0.03, 0.01)
    t, record = select_width_leave_one_out(loo, grid, slack=1.92, generator=torch.Generator().manual_seed(0))
    rows = {r["T"]: r for r in record["grid"]}
    assert [rows[w]["nll"] for w in grid] == sorted(rows[w]["nll"] for w in grid)[::-1]  # wider, worse
    within = [w for w in grid if rows[w]["nll"] <= record["mean"]["nll"] + 1.92 / 12
              and rows[w]["accuracy"] >= record["mean"]["accuracy"]]
    assert t == max(within) and 0.01 <= t < 1.0 and record["met"] is True
    narrow, none = select_width_leave_one_out(loo, grid, slack=0.0, generator=torch.Generator().manual_seed(0))
    assert narrow == 0.01 and none["met"] is False  # nothing within zero nats: the narrowest, and it says so
    again, _ = select_width_leave_one_out(loo, grid, slack=1.92, generator=torch.Generator().manual_seed(0))
    assert again == t  # seeded


def test_finetune_checks_q_on_left_out_examples_and_skips_a_pinned_head() -> None:
    """At 5 shots the head's leave-one-out test is recorded and T is no wider than either test allows; at one shot
    the head's spread is pinned, so there is no head spread to test."""
    post, _ = fit(5)
    head = post.model.pretrained_cfg["classifier"]
    selection = post.meta["width"]["selection"]
    loo = selection["leave_one_out"][head]
    assert loo["rule"] == "head leave-one-out likelihood" and loo["n"] == 5 * CLASSES
    assert selection["T"] <= loo["T"] and selection["T"] == post.meta["scales"][head]["tau"]
    in_sample = max((r["T"] for r in selection["grid"] if r["meets"]), default=min(r["T"] for r in selection["grid"]))
    assert selection["T"] == min(in_sample, loo["T"])
    assert selection["rule"].startswith("training likelihood")
    assert selection["antithetic"] is True and selection["samples"] % 2 == 0  # mirrored draws: half the products
    one_shot, _ = fit(1)
    assert "leave_one_out" not in one_shot.meta["width"]["selection"]


def test_a_precision_without_the_examples_in_it_is_refused_with_a_reason() -> None:
    """The removal is exact only when the head's precision holds each example's term: at a thousandth of the
    Laplace precision (a Q tempered wider, passed as if T were 1) 1 − b·v falls to ≤ 0, and the rule says why
    instead of returning a negative variance."""
    post, train = fit(5)
    head = post.model.pretrained_cfg["classifier"]
    tau = post.meta["scales"][head]["tau"]
    assert isinstance(head_leave_one_out(post.scaled({head: tau}), post.model, head, train), HeadLeaveOneOut)
    result = head_leave_one_out(post.scaled({head: tau * 1e-3}), post.model, head, train)
    assert isinstance(result, str) and "not built from these batches" in result
