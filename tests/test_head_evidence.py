"""zoo.head_evidence: the new head's evidence against a brute-force Hessian, its MAP re-fit, and the edge rule."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from cli_support import cli
from digits_task import CLASSES, downstream, save_image_folder, upstream_prior_dir
from torch import Tensor, nn

import zoo
from zoo import width
from zoo.calibration import (
    JOINT_LOGLIK_SLACK,
    TRAIN_LOGLIK_SLACK,
    VALIDATION_PER_CLASS,
    VALIDATION_WIDTH_PER_CLASS,
)
from zoo.errors import DataError
from zoo.head_evidence import (
    ALPHA_GRID,
    EVIDENCE_MARGIN,
    head_slack,
    log_evidence,
    no_evidence_for_a_head,
    reduce_features,
    refit,
    refit_new_heads,
)
from zoo.layers import IsoLayer
from zoo.predictive import PinnedHeadWarning, Predictor
from zoo.prior import Prior


def brute_log_evidence(phi: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    """−loss + ½P log α − ½ log det ∇²loss, the Hessian by autograd on the dense (C·D) vector."""
    shape = w.shape

    def loss(flat: torch.Tensor) -> torch.Tensor:
        v = flat.reshape(shape)
        return F.cross_entropy(phi @ v.T, y, reduction="sum") + 0.5 * alpha * (v * v).sum()

    hess = torch.autograd.functional.hessian(loss, w.reshape(-1))
    return (-loss(w.reshape(-1)) + 0.5 * w.numel() * math.log(alpha) - 0.5 * torch.linalg.slogdet(hess)[1]).item()


@pytest.mark.parametrize("n", [2, 9])  # N·C below and above P = C·D: both forms of the log-determinant
def test_log_evidence_matches_a_dense_hessian(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    phi = torch.cat([torch.randn(n, 3, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    y = torch.randint(0, 3, (n,), generator=g)
    for alpha in (0.1, 3.0):
        w = refit(phi, y, alpha, torch.zeros(3, 4, dtype=torch.float64))
        assert log_evidence(phi, y, w, alpha) == pytest.approx(brute_log_evidence(phi, y, w, alpha), abs=1e-8)


def test_refit_is_the_map() -> None:
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (20,), generator=g)
    w = refit(phi, y, 0.5, torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss = F.cross_entropy(phi @ w.T, y, reduction="sum") + 0.25 * (w * w).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max().item() < 1e-5  # of a loss summed over 20 points


def test_fewer_examples_than_features_reduce_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    z, back = reduce_features(phi)
    assert z.shape == (4, 4) and torch.allclose(z @ z.T, phi @ phi.T, atol=1e-10)
    w = refit(phi, y, 0.7, torch.zeros(3, 7, dtype=torch.float64))
    w_z = refit(z, y, 0.7, torch.zeros(3, 4, dtype=torch.float64))
    assert torch.allclose(w_z @ back, w, atol=1e-6)  # the same MAP
    assert log_evidence(z, y, w_z, 0.7) == pytest.approx(log_evidence(phi, y, w, 0.7), abs=1e-7)


class Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def head_prior(net: Net, lam: float) -> Prior:
    mean = {k: v.detach().clone() for k, v in net.named_parameters()}
    return Prior(mean, {"head": IsoLayer(lam, ("head.weight", "head.bias"))}, {})


def test_separable_data_gets_the_evidence_optimal_head() -> None:
    torch.manual_seed(0)
    net = Net(3)
    centres = torch.randn(3, 4) * 3
    y = torch.arange(3).repeat(10)
    x = centres[y] + 0.3 * torch.randn(30, 4)
    before = net.head.weight.detach().clone()
    (record,) = refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu")).values()
    assert record["refit"] is True and len(record["table"]) == len(ALPHA_GRID)
    best = max(record["table"], key=lambda r: r["log_evidence"])
    assert record["alpha"] == best["alpha"]
    assert not torch.equal(net.head.weight, before)
    # the new head is the MAP at the chosen α on the body's features
    with torch.no_grad():
        phi = torch.cat([torch.tanh(net.body(x)), torch.ones(30, 1)], 1).double()
    w = torch.cat([net.head.weight, net.head.bias[:, None]], 1).double().detach().requires_grad_(True)
    loss = F.cross_entropy(phi @ w.T, y, reduction="sum") + 0.5 * record["alpha"] * (w * w).sum()
    assert torch.autograd.grad(loss, w)[0].abs().max().item() < 1e-4  # float32 weights


def test_no_evidence_for_a_head_shrinks_it_as_far_as_the_training_likelihood_allows() -> None:
    """One point per class: the evidence prefers a zero head. The head taken is the strongest re-fit that keeps
    every training point right and the total log-likelihood within the joint region of the head and Q's width
    (JOINT_LOGLIK_SLACK: the head's spread is pinned, so its shrinkage is what tempers it)."""
    torch.manual_seed(1)
    net = Net(3)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    opt = torch.optim.Adam(net.head.parameters(), lr=0.1)
    for _ in range(200):  # a confident, unregularised head, as likelihood-only fine-tuning leaves it
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        trained_nll = F.cross_entropy(net(x), y, reduction="sum").item()
        trained_norm = net.head.weight.norm().item()
    (record,) = refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu")).values()
    table = record["table"]
    assert max(table, key=lambda r: r["log_evidence"]) is table[-1]  # the strongest edge
    assert record["refit"] is True and record["rule"] == "likelihood-ratio"
    tolerated = [r for r in table if r["train_correct"] == 3 and r["train_nll_sum"] <= trained_nll + JOINT_LOGLIK_SLACK]
    assert record["alpha"] == max(r["alpha"] for r in tolerated) < table[-1]["alpha"]
    assert record["loglik_slack"] == head_slack(1) == JOINT_LOGLIK_SLACK
    with torch.no_grad():
        nll = F.cross_entropy(net(x), y, reduction="sum").item()
        assert (net(x).argmax(-1) == y).all()
    assert trained_nll < nll <= trained_nll + JOINT_LOGLIK_SLACK + 1e-4  # float32 weights
    assert net.head.weight.norm().item() < trained_norm
    # what the shrinkage gave up is recorded, so that Q's width gets only the rest of the joint region
    assert record["loglik_given_up"] == pytest.approx(nll - trained_nll, abs=1e-4)


def test_a_flat_evidence_near_no_head_is_no_evidence_for_one() -> None:
    """The evidence's maximum a few rows in from the strongest α, by thousandths of a nat: taken literally, that
    head predicted the training points almost uniformly (3.06 nats over three points, 3·ln 3 = 3.30). It must count
    as no evidence, and the likelihood-ratio rule set the scale."""
    torch.manual_seed(7)  # one of 11 in 200 seeds of this setup where the flat evidence peaks off the edge
    net = Net(3)
    x, y = torch.randn(3, 4) * 2, torch.tensor([0, 1, 2])
    opt = torch.optim.Adam(net.head.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        trained_nll = F.cross_entropy(net(x), y, reduction="sum").item()
    (record,) = refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu")).values()
    table = record["table"]
    peak = max(table, key=lambda r: r["log_evidence"])
    assert peak is not table[-1] and peak["log_evidence"] - table[-1]["log_evidence"] < EVIDENCE_MARGIN
    assert no_evidence_for_a_head(table)
    assert record["rule"] == "likelihood-ratio" and record["alpha"] < peak["alpha"]
    assert peak["train_nll_sum"] > trained_nll + JOINT_LOGLIK_SLACK  # the literal peak: rejected by the data
    with torch.no_grad():
        assert F.cross_entropy(net(x), y, reduction="sum").item() <= trained_nll + JOINT_LOGLIK_SLACK + 1e-4


def test_several_unidentified_heads_share_the_joint_region() -> None:
    assert head_slack(1) == pytest.approx(JOINT_LOGLIK_SLACK)
    assert head_slack(2) == pytest.approx(0.5 * 7.814728 / 2, abs=1e-5)  # ½χ²₃(0.95), halved
    assert head_slack(1) > TRAIN_LOGLIK_SLACK


def test_evidence_well_above_no_head_keeps_the_evidence_rule() -> None:
    rows = [{"log_evidence": v} for v in (-9.0, -5.0, -7.0, -8.0)]
    assert not no_evidence_for_a_head(rows)  # 3 nats above the strongest α
    assert no_evidence_for_a_head([{"log_evidence": v} for v in (-9.0, -7.5, -8.0)])  # half a nat: a bare mention
    assert no_evidence_for_a_head([{"log_evidence": v} for v in (-9.0, -8.0)])  # the strongest edge itself


def test_finetune_records_the_refit_of_a_timm_head() -> None:
    train, _, _ = downstream(5, 0)
    torch.manual_seed(0)
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
    post = zoo.finetune(model, prior, train, epochs=3, progress=False, generator=torch.Generator().manual_seed(0))
    record = post.meta["head_refit"]
    assert record["enabled"] is True and set(record["heads"]) == {model.pretrained_cfg["classifier"]}
    (head,) = record["heads"].values()
    assert "table" in head and (head["refit"] or "edge" in head["reason"])
    off = zoo.finetune(*zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True), train, epochs=3,
                       progress=False, refit_head=False, generator=torch.Generator().manual_seed(0))
    assert off.meta["head_refit"] == {"enabled": False, "heads": {}, "note": record["note"]}


def test_one_shot_pins_the_new_heads_spread_and_certifies_the_pinned_q(monkeypatch) -> None:
    """At one shot per class the likelihood-ratio rule sets the head's scale; its spread is pinned at
    PINNED_HEAD_WIDTH × T, so the head-only `fast` predictive is nearly the mean network, and the certificate's KL is
    the KL of that Q (τ = T·PINNED_HEAD_WIDTH for the head, T for the body)."""
    train, x, _ = downstream(1, 0)

    def fit() -> zoo.Posterior:
        torch.manual_seed(0)
        model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
        return zoo.finetune(model, prior, train, epochs=3, progress=False, generator=torch.Generator().manual_seed(0))

    post = fit()
    (name, head), = post.meta["head_refit"]["heads"].items()
    assert head["refit"] is True and head["rule"] == "likelihood-ratio"
    assert 0.0 < head["loglik_given_up"] <= JOINT_LOGLIK_SLACK + 1e-6
    selection = post.meta["width"]["selection"]
    assert selection["slack"] == pytest.approx(JOINT_LOGLIK_SLACK - head["loglik_given_up"])
    assert post.meta["width"]["pinned_heads"] == {name: width.PINNED_HEAD_WIDTH}
    scales = post.meta["scales"]
    body = [s["tau"] for label, s in scales.items() if label != name]
    assert scales[name]["tau"] == pytest.approx(selection["T"] * width.PINNED_HEAD_WIDTH)
    assert body and all(t == pytest.approx(selection["T"]) for t in body)
    assert post.kl(post.prior).item() == pytest.approx(post.meta["bound"]["kl"], rel=1e-6)

    def head_spread(p: zoo.Posterior) -> float:
        _, deviations = Predictor(p, mode="fast", samples=16, seed=0).linear_parts(x[:64])
        return deviations.std().item()

    with pytest.warns(PinnedHeadWarning, match="no epistemic uncertainty; use mode='glm'"):
        pinned = head_spread(post)
    monkeypatch.setattr(width, "PINNED_HEAD_WIDTH", 1.0)
    unpinned = fit()
    assert unpinned.meta["width"]["pinned_heads"] == {name: 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PinnedHeadWarning)  # a head at full width is not pinned: no warning
        assert pinned < 0.01 * head_spread(unpinned)


def one_shot_head(seed: int, scale: float = 1.0) -> tuple[Net, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A confident, unregularised head on one point per class (likelihood-only fine-tuning leaves it so), and the
    class centres the points were drawn around."""
    torch.manual_seed(seed)
    net = Net(3)
    centres = torch.randn(3, 4) * scale
    x, y = centres + 0.5 * torch.randn(3, 4), torch.tensor([0, 1, 2])
    opt = torch.optim.Adam(net.head.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y, centres


def brute_head(phi: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin Σ CE + ½α‖W‖² on the unreduced features, by L-BFGS (independent of zoo's Newton re-fit)."""
    w = torch.zeros(3, phi.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(phi @ w.T, y, reduction="sum") + 0.5 * alpha * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def test_validation_images_set_an_unidentified_heads_scale() -> None:
    """Where the evidence cannot choose (one point per class), enough labelled validation images choose the head's
    scale: the α whose re-fit has the lowest validation NLL, checked against L-BFGS re-fits on the raw features.
    Here they want a less shrunk head than the likelihood-ratio rule takes from the three shots alone."""
    net, x, y, centres = one_shot_head(3, scale=2.0)
    g = torch.Generator().manual_seed(0)
    y_val = torch.arange(3).repeat(5)
    x_val = centres[y_val] + 1.5 * torch.randn(15, 4, generator=g)
    with torch.no_grad():
        phi = torch.cat([torch.tanh(net.body(x)), torch.ones(3, 1)], 1).double()
        phi_val = torch.cat([torch.tanh(net.body(x_val)), torch.ones(15, 1)], 1).double()
    (by_rule,) = refit_new_heads(copy.deepcopy(net), head_prior(net, 1.0), [(x, y)], torch.device("cpu")).values()
    (record,) = refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu"),
                                validation=[(x_val[:7], y_val[:7]), (x_val[7:], y_val[7:])]).values()
    assert record["refit"] is True and record["rule"] == "validation"
    brute = [F.cross_entropy(phi_val @ brute_head(phi, y, row["alpha"]).T, y_val, reduction="sum").item()
             for row in record["table"]]
    for row, nll in zip(record["table"], brute, strict=True):
        assert row["validation_nll_sum"] == pytest.approx(nll, rel=1e-6)  # L-BFGS at the weakest α: ~1e-7
    assert record["alpha"] == record["table"][min(range(len(brute)), key=brute.__getitem__)]["alpha"]
    assert record["alpha"] < by_rule["alpha"]  # the validation images changed the choice
    # the head is still unidentified by the shots: its spread is pinned and Q's width gets what is left
    assert width.unidentified_heads({"head": record}) == {"head": 1.0 / width.PINNED_HEAD_WIDTH}
    assert record["loglik_given_up"] < by_rule["loglik_given_up"]  # a weaker head gives up less


def test_too_few_validation_images_leave_the_likelihood_ratio_rule() -> None:
    net, x, y, centres = one_shot_head(3, scale=2.0)
    few = [(centres[:2] + 0.1, torch.tensor([0, 1]))] * 7  # 14 images, under 5 per class for 3 classes
    (by_rule,) = refit_new_heads(copy.deepcopy(net), head_prior(net, 1.0), [(x, y)], torch.device("cpu")).values()
    (record,) = refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu"), validation=few).values()
    assert record["rule"] == "likelihood-ratio" and record["alpha"] == by_rule["alpha"]
    assert "14 validation images" in record["validation_unused"]
    with pytest.raises(DataError, match="validation labels must be class indices"):
        refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu"),
                        validation=[(x.repeat(5, 1), torch.tensor([0, 1, 3]).repeat(5))])
    with pytest.raises(DataError, match="the validation loader yielded no batches"):
        refit_new_heads(net, head_prior(net, 1.0), [(x, y)], torch.device("cpu"), validation=[])


def test_finetune_sets_a_one_shot_heads_scale_on_its_val_loader() -> None:
    """zoo.finetune passes `val_loader` to the re-fit: with five held-out images per class the one-shot head's α is
    the grid's best on them, its spread stays pinned, and Q's width takes the rest of the joint region (too few
    images to choose T on, and the record says so); with twenty per class T is the one whose predictive is best
    on them (every body layer's τ); with fewer than five both fall back to the training data's rules."""
    train, x, y = downstream(1, 0)

    def fit(per_class: int, step: int = 1) -> tuple[zoo.Posterior, str, dict, dict, Tensor]:
        chosen = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(CLASSES)])[::step]
        torch.manual_seed(0)
        model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
        post = zoo.finetune(model, prior, train, val_loader=[(x[chosen], y[chosen])], epochs=3, progress=False,
                            generator=torch.Generator().manual_seed(0))
        (name, head), = post.meta["head_refit"]["heads"].items()
        return post, name, head, post.meta["width"]["selection"], chosen

    post, name, head, selection, per_class = fit(VALIDATION_PER_CLASS)
    assert head["refit"] is True and head["rule"] == "validation"
    best = min(head["table"], key=lambda r: r["validation_nll_sum"])
    assert head["alpha"] == best["alpha"]
    assert post.meta["width"]["pinned_heads"] == {name: width.PINNED_HEAD_WIDTH}
    assert selection["rule"] == "training likelihood" and "25 validation images" in selection["validation_unused"]
    assert selection["slack"] == pytest.approx(max(JOINT_LOGLIK_SLACK - head["loglik_given_up"], 0.0))
    with torch.no_grad():  # the network now carries that head: its validation NLL is the table's
        logits = post.model(x[per_class]).double()
    assert F.cross_entropy(logits, y[per_class], reduction="sum").item() == pytest.approx(
        best["validation_nll_sum"], rel=1e-4)  # float32 weights

    post, name, head, selection, _ = fit(VALIDATION_WIDTH_PER_CLASS)
    assert head["rule"] == "validation" and selection["rule"] == "validation"
    assert selection["n"] == VALIDATION_WIDTH_PER_CLASS * CLASSES and "validation_unused" not in selection
    assert selection["antithetic"] is True
    assert selection["T"] == min(selection["grid"], key=lambda r: r["nll"])["T"]
    assert {s["tau"] for layer, s in post.meta["scales"].items() if not layer.startswith(name)} == {selection["T"]}

    post, name, head, selection, _ = fit(VALIDATION_PER_CLASS, step=2)  # 13 images, 3 or 2 per class
    assert head["rule"] == "likelihood-ratio" and "13 validation images" in head["validation_unused"]
    assert selection["rule"] == "training likelihood" and "13 validation images" in selection["validation_unused"]
    assert selection["slack"] == pytest.approx(max(JOINT_LOGLIK_SLACK - head["loglik_given_up"], 0.0))


def test_cli_finetune_scales_a_one_shot_head_on_val(tmp_path, capsys) -> None:
    """`zoo finetune --val DIR`: held-out images with the same class folders reach zoo.finetune, set the one-shot
    head's scale and, at 20 per class, Q's width, each named in a note; mismatched class folders are a usage
    error, not a traceback."""
    train, x, y = downstream(1, 3)
    per_class = torch.cat([torch.nonzero(y == c).flatten()[:VALIDATION_WIDTH_PER_CLASS] for c in range(CLASSES)])
    save_image_folder(tmp_path / "data", *[torch.cat(t) for t in zip(*train, strict=True)], prefix="class")
    save_image_folder(tmp_path / "val", x[per_class], y[per_class], prefix="class")
    out = tmp_path / "run"
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(tmp_path / "data"), "--val", str(tmp_path / "val"),
               "--out", str(out), "--epochs", "2", "--samples", "4", "--lr-retries", "1") == 0
    printed = capsys.readouterr().out
    n = VALIDATION_WIDTH_PER_CLASS * CLASSES
    assert f"was scaled on the {n} --val images" in printed
    record = json.loads((out / "prior_config.json").read_text())["finetune"]
    assert record["lr"] == 3e-4 and record["requested_lr"] == 3e-4  # the CLI's default, and it trained
    assert record["lr_retries"]["allowed"] == 1 and [a["lr"] for a in record["lr_retries"]["attempts"]] == [3e-4]
    chosen = json.loads((out / "prior_config.json").read_text())["width"]["selection"]
    assert chosen["rule"] == "validation" and f"width T = {chosen['T']:g} was chosen on the {n} --val images" in printed
    (head,) = json.loads((out / "prior_config.json").read_text())["head_refit"]["heads"].values()
    assert head["rule"] == "validation"
    save_image_folder(tmp_path / "other", x[per_class], y[per_class], prefix="digit")
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(tmp_path / "data"), "--val",
               str(tmp_path / "other"), "--out", str(tmp_path / "x"), "--epochs", "1") == 2
    assert "use the same class folder names" in capsys.readouterr().out
