"""zoo.Posterior on the digits transfer task: certificates, predictive, publishing, sequential learning, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import cli
from digits_task import (
    CLASSES,
    HEAD_LAMBDA,
    downstream,
    gibbs_test_error,
    save_image_folder,
    upstream_prior_dir,
)

import zoo
from zoo import ConfigError, DataError
from zoo.posterior import Posterior
from zoo.tuning import finetune, isotropic_prior

SHOTS, EPOCHS, LR, SAMPLES = 20, 30, 1e-2, 50


Run = tuple[Posterior, object, torch.Tensor, torch.Tensor]


def run(seed: int, *, isotropic: bool = False, shots: int = SHOTS, prior_dir: Path | None = None,
        **choices: str) -> Run:
    train, x_test, y_test = downstream(shots, seed)
    source = prior_dir if prior_dir is not None else upstream_prior_dir()
    model, prior = zoo.load(source, num_classes=CLASSES, reset_head=True, lam=HEAD_LAMBDA)
    if isotropic:
        prior = isotropic_prior(prior)
    post = finetune(model, prior, train, epochs=EPOCHS, lr=LR, progress=False,
                    generator=torch.Generator().manual_seed(seed), **choices)
    return post, train, x_test, y_test


@pytest.fixture(scope="module")
def learned() -> tuple[Posterior, object, torch.Tensor, torch.Tensor]:
    return run(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certificate_bounds_the_held_out_gibbs_error(seed: int, learned) -> None:
    post, train, x_test, y_test = learned if seed == 0 else run(seed)
    cert = post.certificate(train, samples=SAMPLES, generator=torch.Generator().manual_seed(100 + seed))
    test_error = gibbs_test_error(post, x_test, y_test, samples=20, seed=seed)
    assert 0 <= cert.empirical_risk <= cert.bound <= 1
    assert cert.bound >= test_error
    assert cert.n == CLASSES * SHOTS and cert.samples == SAMPLES and cert.delta == 0.05
    assert cert.kl == pytest.approx(post.kl(post.prior).item()) and cert.kl >= 0
    assert cert.taylor_bound is not None and "Taylor" in cert.taylor_kind
    assert "kl-bound" in cert.kind and post.meta["certificate"]["bound"] == cert.bound


def test_predict_returns_probabilities_and_the_entropy_split(learned) -> None:
    post, _, x_test, _ = learned
    pred = post.predict(x_test[:40], samples=8, generator=torch.Generator().manual_seed(0))
    assert pred.probs.shape == (40, CLASSES)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(40), atol=1e-5, rtol=0)
    assert (pred.probs >= 0).all()
    torch.testing.assert_close(pred.entropy, pred.expected_entropy + pred.mutual_information)
    assert (pred.mutual_information > -1e-9).all() and (pred.entropy <= torch.log(torch.tensor(5.0)) + 1e-9).all()
    again = post.predict(x_test[:40], samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred.probs, again.probs)
    with pytest.raises(DataError):
        post.predict(torch.empty(0, 3, 16, 16))


def test_saved_posterior_is_the_prior_of_a_second_task(learned, tmp_path: Path) -> None:
    post, train, _, _ = learned
    path = post.save(str(tmp_path / "posterior"))
    loaded = Posterior.load(str(path))
    assert loaded.meta["kind"] == "posterior" and loaded.meta["prior"]["timm_name"] == post.meta["timm_name"]
    assert loaded.stored_certificate is None or loaded.stored_certificate.bound == post.meta["certificate"]["bound"]
    with pytest.raises(ConfigError, match="prior"):
        loaded.certificate(train, samples=2)
    # second task: the same classes relabelled in reverse order, with the posterior as the prior
    model, prior = zoo.load(str(path), num_classes=CLASSES, reset_head=True, lam=HEAD_LAMBDA)
    second = [(x, CLASSES - 1 - y) for x, y in downstream(10, 5)[0]]
    post2 = finetune(model, prior, second, epochs=10, lr=LR, progress=False, sharpen=(1.0, 100.0),
                     generator=torch.Generator().manual_seed(3))
    cert2 = post2.certificate(second, samples=10, generator=torch.Generator().manual_seed(4))
    assert 0 <= cert2.bound <= 1 and cert2.kl > 0
    assert post2.meta["prior"]["kind"] == "posterior"
    post2.save(str(tmp_path / "second"))
    assert zoo.load(str(tmp_path / "second"))[1].meta["kind"] == "posterior"


def test_a_posterior_saves_and_loads_without_an_eigendecomposition(learned, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fitted posterior's layers are sums (the data's term and the prior's); they are used through their
    decomposition, which the fit made, so saving writes that and no term's own eigenpairs, and loading
    checks those factors by Cholesky instead of the eigensolver."""
    from safetensors import safe_open

    from zoo.layers import KronLayer

    post = learned[0]
    sums = [name for name, layer in post.layers.items()
            if isinstance(layer, KronLayer) and len(layer.precision.terms) > 1]
    assert sums
    for name in sums:
        post.layers[name].precision.decomposition()  # made by the fit already (sampling and the KL use it)

    def no_eigh(*args: object, **kwargs: object) -> None:
        raise AssertionError("saving or loading a fitted posterior must not eigendecompose")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    path = post.save(str(tmp_path / "posterior"))
    with safe_open(str(path / "prior.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for name in sums:
        assert not [k for k in keys if k.startswith(f"{name}::eig.")], name
        assert f"{name}::dec.weights" in keys
    loaded = Posterior.load(str(path))
    v = None
    for name in sums:
        ours, theirs = post.layers[name].precision, loaded.layers[name].precision
        v = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(theirs.solve(v), ours.solve(v), rtol=1e-4, atol=1e-8)
    assert v is not None


def test_cli_finetune_and_certify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, _, _ = downstream(4, 9)
    root = tmp_path / "data"
    save_image_folder(root, *[torch.cat(t) for t in zip(*train, strict=True)], prefix="class")
    out = tmp_path / "run"
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(root), "--out", str(out), "--epochs", "3",
               "--lr", "1e-2", "--shots", "3", "--samples", "5", "--norm-statistics", "adapt",
               "--resolution", "12", "--head-curvature", "fisher", "--no-head-refit") == 0
    assert (out / "certificate.json").is_file() and (out / "prior_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 12, 12]
    record = json.loads((out / "prior_config.json").read_text())
    assert record["finetune"]["norm_statistics"]["method"] == "adapt"
    assert record["head_curvature"] == {"method": "fisher", "heads": [], "note": record["head_curvature"]["note"]}
    assert record["head_refit"]["enabled"] is False and record["head_refit"]["heads"] == {}  # --no-head-refit
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
    capsys.readouterr()
    assert cli("certify", str(out)) == 0
    assert "certificate:" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(empty), "--out", str(tmp_path / "x")) == 2
    assert "ImageFolder" in capsys.readouterr().out or not (tmp_path / "x").exists()
