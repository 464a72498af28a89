"""Certificates with a data-dependent prior (zoo.certified): valid on held-out data, and far tighter than against
the pretrained mean."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_support import cli
from digits_task import CLASSES, batches, downstream, gibbs_test_error, save_image_folder, upstream_prior_dir
from intra_op import one_intra_op_thread

import zoo
from zoo.certified import PRIOR_SCALE_GRID, CertifiedRun, certify_data_dependent, recentred_prior, split_batches
from zoo.layers import IsoLayer, KronLayer
from zoo.tuning import isotropic_prior


def task(seed: int, n_train: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """n_train digits 5–9 (relabelled 0–4) for training in batches of 25, every other one for testing."""
    train, x, y = downstream(n_train // CLASSES, seed)
    return batches(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]), 25), x, y


def test_split_batches_is_a_seeded_partition() -> None:
    x = torch.arange(30.0)[:, None]
    y = torch.arange(30)
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)]
    first, rest = split_batches(loader, 0.4, torch.Generator().manual_seed(0))
    a = torch.cat([b[1] for b in first])
    b = torch.cat([b[1] for b in rest])
    assert a.numel() == 12 and b.numel() == 18
    assert sorted(torch.cat([a, b]).tolist()) == list(range(30))
    again, _ = split_batches(loader, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([b[1] for b in again]), a)
    with pytest.raises(zoo.ZooError, match="both sides"):
        split_batches(loader[:1], 0.01, torch.Generator())


def test_recentred_head_prior_is_isotropic_around_the_head() -> None:
    model, prior = zoo.load(str(upstream_prior_dir()), num_classes=CLASSES, reset_head=True)
    head = next(name for name, layer in prior.layers.items() if isinstance(layer, IsoLayer))
    lam = prior.layers[head].lam
    with torch.no_grad():
        dict(model.named_modules())[head].weight.add_(0.3)
    centred = recentred_prior(prior, model)
    assert isinstance(centred.layers[head], KronLayer)
    # a Gaussian with the same precision, shifted by d in the head only: KL = ½ λ ‖d‖² (and 0 elsewhere)
    shift = {k: v + (0.1 if k.startswith(head + ".") else 0.0) for k, v in centred.mean.items()}
    moved = zoo.Prior(shift, dict(centred.layers), {})
    d2 = sum(0.01 * v.numel() for k, v in centred.mean.items() if k.startswith(head + "."))
    assert moved.kl(centred).item() == pytest.approx(0.5 * lam * d2, rel=1e-6)
    weight = dict(model.named_modules())[head].weight
    assert torch.equal(centred.mean[head + ".weight"], weight.detach())


SEEDS = (0, 1)
"""The seeds of the data-dependent certificate tests, on the same 200 digits each."""


@pytest.fixture(scope="module")
def data_dependent_runs() -> Iterator[dict[tuple[str, int], tuple[CertifiedRun, zoo.Prior]]]:
    """(run, prior) of the learned and the isotropic prior, re-centred on the same half at κ = 100, per seed; built
    once for the tests that read them, on one thread (few-shot fine-tunes are chaotic in the last bits)."""
    runs = {}
    with one_intra_op_thread():
        for seed in SEEDS:
            train, _, _ = task(seed, 200)
            for name in ("learned", "isotropic"):
                torch.manual_seed(seed)
                model, prior = zoo.load(str(upstream_prior_dir()), num_classes=CLASSES, reset_head=True)
                prior = isotropic_prior(prior) if name == "isotropic" else prior
                runs[name, seed] = (certify_data_dependent(model, prior, train, grid=(100.0,), epochs=20, samples=20,
                                                           generator=torch.Generator().manual_seed(seed)), prior)
    yield runs


def test_data_dependent_certificate_holds_on_held_out_data_and_is_informative(
        data_dependent_runs: dict[tuple[str, int], tuple[CertifiedRun, zoo.Prior]]) -> None:
    """Two seeds: each certificate bounds the held-out Gibbs error and is informative, and the re-centred prior is
    what makes it so (Q's KL against the pretrained mean is orders of magnitude larger)."""
    for seed in SEEDS:
        _, x, y = task(seed, 200)
        run, prior = data_dependent_runs["learned", seed]
        cert = run.certificate
        held_out = gibbs_test_error(run.posterior, x, y, 20, seed + 10)
        assert cert.n == 100 and run.prefix_n == 100 and cert.hypotheses == 1
        assert held_out <= cert.bound, f"seed {seed}: held-out Gibbs error {held_out} above {cert.bound}"
        assert cert.bound < 0.9, f"seed {seed}: certificate {cert.bound} (KL {cert.kl}) is near vacuous"
        assert "data-dependent prior" in run.posterior.meta["certificate_kind"]
        pretrained = prior.scaled(dict.fromkeys(prior.layers, run.kappa))
        assert run.posterior.kl(pretrained).item() > 100 * cert.kl


def test_learned_prior_certifies_tighter_than_isotropic_where_it_says_something(
        data_dependent_runs: dict[tuple[str, int], tuple[CertifiedRun, zoo.Prior]]) -> None:
    """The paper's claim, where a certificate is informative: re-centred on the same half of 200 digits, at the same
    strength κ = 100, the learned prior's shape gives an informative certificate, tighter than an isotropic prior's
    at its λ.

    Measured, seeds 0–1, learned against isotropic: 0.788 against 0.956 and 0.550 against 0.574 on one CPU machine;
    0.882 against 1.000 and 0.546 against 0.960 on another (seeds 2–5 there: 0.818/1.000, 0.567/0.971,
    0.658/1.000, 0.625/1.000; the isotropic Q's Gibbs risk was 0.37–0.58 on every seed, its draws too wide for the
    network). The isotropic certificate is near or at vacuous depending on the machine, so only the learned one is
    held to informative; the test used to hold both to < 0.99 and failed on the second machine. At κ = 1000 the two
    nearly tie: Q sits on the prefix fit and the shape stops mattering, README "Certificates that say
    something"."""
    for seed in SEEDS:
        bounds = {name: data_dependent_runs[name, seed][0].certificate.bound for name in ("learned", "isotropic")}
        assert bounds["learned"] < 0.9, f"seed {seed}: the learned prior's certificate says nothing: {bounds}"
        assert bounds["learned"] < bounds["isotropic"], f"seed {seed}: {bounds}"


def test_cli_finetune_with_a_data_dependent_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, _, _ = task(0, 60)
    root = tmp_path / "data"
    save_image_folder(root, torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]), prefix="class")
    out = tmp_path / "run"
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(root), "--out", str(out), "--epochs", "2",
               "--lr", "1e-2", "--samples", "5", "--certificate", "data-dependent") == 0
    record = json.loads((out / "certificate.json").read_text())
    assert record["n"] == 30 and record["hypotheses"] == len(PRIOR_SCALE_GRID)  # on the half the prior never saw
    capsys.readouterr()
    assert cli("certify", str(out)) == 0
    assert "prior: data-dependent prior" in capsys.readouterr().out
    assert "## Certificate" in (out / "README.md").read_text()
