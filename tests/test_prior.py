"""zoo.Prior, the repository format (zoo.artifact), zoo.load and the PAC-Bayes scale fit (zoo.scales)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from olah_server import olah  # noqa: F401  (a fixture)
from safetensors import safe_open

import zoo
from zoo import ArtifactError, ConfigError
from zoo.artifact import PRIOR, PRIOR_CONFIG, WEIGHTS, sha256_file
from zoo.curvature import KronBlock, kfac
from zoo.layers import DiagLayer, IsoLayer, KronLayer, kron_matrix
from zoo.scales import LayerSpectrum, evaluate, fit_scales, fixed_scales_bound

ARCH = "test_resnet"


def tiny_model(seed: int = 0, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=num_classes).eval()


def loader(seed: int = 0, n: int = 16, batch: int = 8, num_classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, zoo.Prior, Path]:
    model = tiny_model()
    prior = zoo.build_prior(model, loader(), holdout=0, progress=False, smoke=True, dataset="random-16px",
                            generator=torch.Generator().manual_seed(0))
    path = prior.save(str(tmp_path_factory.mktemp("prior") / "tiny-prior"))  # the contract's form: no model=
    return model, prior, path


def test_every_trainable_parameter_has_a_block(built) -> None:
    model, prior, _ = built
    covered = set()
    for name, layer in prior.layers.items():
        prefix = f"{name}." if name else ""
        params = layer.precision.keys() if isinstance(layer, DiagLayer) else layer.params
        covered |= {prefix + p for p in params}
    assert covered == {k for k, p in model.named_parameters() if p.requires_grad}


def test_quadratic_is_zero_at_the_mean_and_matches_dense(built) -> None:
    model, prior, _ = built
    assert prior.quadratic(model).item() == 0.0
    moved = tiny_model(seed=1)
    moved.load_state_dict(model.state_dict())
    name = next(n for n, layer in prior.layers.items() if isinstance(layer, KronLayer))
    module = dict(moved.named_modules())[name]
    with torch.no_grad():
        module.weight.add_(0.01 * torch.randn_like(module.weight))
    layer = prior.layers[name]
    delta = (kron_matrix(module, layer.params) - kron_matrix(dict(model.named_modules())[name], layer.params)).double()
    v = delta.T.reshape(-1)
    expected = (v @ layer.precision.dense() @ v).item()
    q = prior.quadratic(moved)
    assert q.item() == pytest.approx(expected, rel=1e-6)
    q.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_scales_enter_the_precision_as_documented(built) -> None:
    model, prior, _ = built
    blocks = kfac(model, loader(), progress=False, generator=torch.Generator().manual_seed(0))
    lam, t = prior.meta["lambda"], prior.meta["precision_multiplier"]
    assert t == 1.0  # no held-out data here; test_build_predictive checks t ≠ 1
    for name, block in blocks.items():
        s = prior.meta["scales"][name or "<root>"]
        layer = prior.layers[name]
        if isinstance(block, KronBlock):
            p = layer.precision  # precision = (β/τ)·A⊗G + (αλ/τ)·I, factors as the curvature pass made them
            assert len(p.terms) == 1
            assert torch.equal(p.A[0], block.A.double()) and torch.equal(p.G[0], block.G.double())
            assert p.scales[0].item() == pytest.approx(s["beta"] / s["tau"], rel=1e-12)
            assert p.damping == pytest.approx(s["alpha"] * lam / s["tau"], rel=1e-12)
        else:
            for local, f in block.diagonal.items():
                prec = (s["beta"] * f.double() + s["alpha"] * lam) / s["tau"]
                assert torch.allclose(layer.precision[local], prec, rtol=1e-5)


def test_repository_files_and_metadata(built) -> None:
    path = built[2]
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "prior.safetensors", "prior_config.json"]
    config = json.loads((path / PRIOR_CONFIG).read_text())
    for key in ("format_version", "curvature", "scales", "library_version", "model_sha256", "bound", "lambda"):
        assert key in config
    assert config["curvature"]["n"] == 16 and config["curvature"]["fisher"] == "mc"
    assert config["model_sha256"] == sha256_file(path / WEIGHTS)
    assert config["prior_sha256"] == sha256_file(path / PRIOR)
    with safe_open(str(path / PRIOR), framework="pt") as f:
        header = json.loads(f.metadata()["prior_zoo"])
        assert header["scales"] == config["scales"]
        factors = [k for k in f.keys() if k.endswith("::A.0") or k.endswith("::G.0")]  # noqa: SIM118
        assert factors and all(f.get_tensor(k).dtype == torch.float32 for k in factors)
    card = (path / "README.md").read_text()
    assert "prior-zoo" in card


def test_save_needs_the_model_that_carries_the_mean(built, tmp_path: Path) -> None:
    prior = built[1]
    detached = zoo.Prior(prior.mean, prior.layers, prior.meta)
    with pytest.raises(zoo.ModelError, match="model="):
        detached.save(str(tmp_path / "p"))
    other = tiny_model(seed=3)
    with pytest.raises(ArtifactError, match="differs from the prior's mean"):
        prior.save(str(tmp_path / "q"), model=other)
    assert not (tmp_path / "q").exists()


def test_timm_alone_loads_the_weights(built) -> None:
    model, _, path = built
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == ARCH
    overlay = dict(config["pretrained_cfg"], file=str(path / WEIGHTS), num_classes=config["num_classes"])
    other = timm.create_model(ARCH, num_classes=config["num_classes"], pretrained=True, pretrained_cfg_overlay=overlay)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def _no_eigh(*args: object, **kwargs: object) -> None:
    raise AssertionError("loading a prior must not eigendecompose")


def test_load_round_trip_is_lazy_exact_and_needs_no_eigendecomposition(built, monkeypatch: pytest.MonkeyPatch) -> None:
    model, prior, path = built
    monkeypatch.setattr(torch.linalg, "eigh", _no_eigh)
    loaded_model, loaded = zoo.load(str(path))
    assert len(loaded.layers._cache) == 0  # nothing read yet
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    v = None
    for name, layer in prior.layers.items():
        other = loaded.layers[name]
        if isinstance(layer, KronLayer):
            assert torch.equal(layer.precision.A[0].float(), other.precision.A[0].float())
            assert torch.equal(layer.precision.G[0].float(), other.precision.G[0].float())
            v = torch.randn(layer.precision.shape, dtype=torch.float64)
            expected = layer.precision.solve(v)  # float32 eigenvectors on disk: agreement in norm to 1e-4
            assert torch.linalg.norm(other.precision.solve(v) - expected) <= 1e-4 * torch.linalg.norm(expected)
        else:
            for local, prec in layer.precision.items():
                assert torch.allclose(other.precision[local], prec, rtol=1e-6)
    assert v is not None
    kl = loaded.kl(prior).item()
    assert 0 <= kl < 1e-3  # float32 on disk (eigenvectors re-orthonormalised on load) is the only difference


def test_new_head_gets_an_isotropic_prior(built) -> None:
    _, prior, path = built
    model, head_prior = zoo.load(str(path), num_classes=7)
    head = model.pretrained_cfg["classifier"]
    assert isinstance(head_prior.layers[head], IsoLayer)
    assert head_prior.layers[head].lam == pytest.approx(prior.meta["lambda"])
    assert head_prior.mean[f"{head}.weight"].shape == (7, model.get_classifier().in_features)
    draw = head_prior.sample(model, generator=torch.Generator().manual_seed(0))
    assert draw[f"{head}.weight"].shape == (7, model.get_classifier().in_features)
    with torch.no_grad():
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.zero_()
    assert head_prior.quadratic(model).item() == pytest.approx(0.0, abs=1e-9)
    same_size = zoo.load(str(path), reset_head=True)[1]
    assert isinstance(same_size.layers[head], IsoLayer)


def test_a_new_heads_initialisation_follows_the_generator_not_the_global_rng(built) -> None:
    _, _, path = built

    def head(seed: int | None) -> torch.Tensor:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        model, _ = zoo.load(str(path), num_classes=7, generator=generator)
        return model.get_classifier().weight.detach().clone()

    torch.manual_seed(123)
    first = head(0)
    torch.manual_seed(999)  # another global state: the same generator seed gives the same head
    assert torch.equal(head(0), first)
    assert not torch.equal(head(1), first)
    torch.manual_seed(123)  # without a generator, the global state decides, as in timm
    unseeded = head(None)
    torch.manual_seed(123)
    assert torch.equal(head(None), unseeded) and not torch.equal(unseeded, first)


def test_a_replaced_head_lives_where_the_network_does(built) -> None:
    """timm builds a new classifier in float32 on the CPU; a float64 (or GPU) network must get one like itself,
    and the head's prior mean stays on the CPU with the rest of the Gaussian."""
    from zoo.continual import set_head
    from zoo.loading import replace_head

    trained, prior, _ = built
    model = tiny_model()
    model.load_state_dict(trained.state_dict())
    model.double()
    head = model.pretrained_cfg["classifier"]
    new = replace_head(model, prior, 3, 1.0)
    assert model.get_classifier().weight.dtype == torch.float64
    assert new.mean[f"{head}.weight"].device.type == "cpu"
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).shape == (2, 3)
    set_head(model, {"weight": torch.zeros(5, model.get_classifier().in_features, dtype=torch.float64),
                     "bias": torch.zeros(5, dtype=torch.float64)})
    assert model.get_classifier().weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).shape == (2, 5)


def test_kl_by_layer_sums_to_the_kl(built) -> None:
    _, prior, _ = built
    moved = tiny_model(seed=1)
    wider = prior.scaled(dict.fromkeys(prior.layers, 0.5))
    other = zoo.Prior({k: v + 0.01 for k, v in prior.mean.items()}, dict(wider.layers), {}, model=moved)
    parts = other.kl_by_layer(prior)
    assert set(parts) == set(prior.layers)
    assert all(v > 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(other.kl(prior).item(), rel=1e-12)


def test_tampered_or_mismatched_files_are_refused(built, tmp_path: Path) -> None:
    _, _, path = built
    import shutil

    for victim in (PRIOR, WEIGHTS):
        copy = tmp_path / victim
        shutil.copytree(path, copy)
        data = bytearray((copy / victim).read_bytes())
        data[-10] ^= 0xFF
        (copy / victim).write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="sha256"):
            zoo.load(str(copy))
    other = timm.create_model("resnet10t", num_classes=4)
    with pytest.raises(ArtifactError, match=r"does not match|built for"):
        zoo.Prior.load(str(path), model=other)
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / PRIOR_CONFIG).unlink()
    with pytest.raises(ArtifactError, match=PRIOR_CONFIG):
        zoo.load(str(bare))
    with pytest.raises(ConfigError):
        zoo.load(str(path), num_classes=0)


def test_round_trip_through_olah_with_the_real_hub_client(built, olah, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.hub_mirror import publish_to_mirror

    model, prior, path = built
    publish_to_mirror(path, olah.mirror_root, "zoo-test/tiny-prior")
    monkeypatch.setenv("HF_ENDPOINT", olah.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loaded_model, loaded = zoo.load("hf-hub:zoo-test/tiny-prior", cache_dir=tmp_path / "cache")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.meta["model_sha256"] == prior.meta["model_sha256"]
    # Offline, from the cache the first load filled.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    again = zoo.load("hf-hub:zoo-test/tiny-prior", cache_dir=tmp_path / "cache")[1]
    assert set(again.layers) == set(prior.layers)


# ---- scales -------------------------------------------------------------------------------------------------


def test_closed_form_kl_and_taylor_term_match_dense() -> None:
    """(β F + α λ I)/τ against N(0, λ⁻¹I): the fit's closed forms equal dense linear algebra."""
    g = torch.Generator().manual_seed(0)
    a = (lambda x: x @ x.T)(torch.randn(4, 2, generator=g, dtype=torch.float64))
    gg = (lambda x: x @ x.T)(torch.randn(3, 5, generator=g, dtype=torch.float64))
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    lam, alpha, beta, tau = 2.0, 0.7, 3.0, 0.4
    f = torch.kron(a, gg)
    post = (beta * f + alpha * lam * torch.eye(12, dtype=torch.float64)) / tau
    cov = torch.linalg.inv(post)
    m = mean.T.reshape(-1)
    kl = 0.5 * (lam * torch.trace(cov) + lam * m @ m - 12 + torch.logdet(post) - 12 * math.log(lam))
    trace = 0.5 * torch.trace(f @ cov)
    la, lg = torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(gg)
    spec = LayerSpectrum("l", torch.outer(lg, la).reshape(-1) / lam, lam * (m @ m).item())
    logs = torch.tensor([[math.log(alpha), math.log(beta), math.log(tau)]], dtype=torch.float64)
    risk, kl_fit = evaluate([spec], logs, n=10, nll_sum=3.0)
    assert kl_fit.item() == pytest.approx(kl.item(), rel=1e-10)
    assert risk.item() == pytest.approx((0.3 + trace.item() / 10) / math.log(2), rel=1e-10)


def test_fitted_scales_beat_fixed_scales() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20_000
    spectra = [LayerSpectrum(f"l{i}", n * torch.rand(300, generator=g, dtype=torch.float64) ** 3, 5.0)
               for i in range(4)]
    for objective in ("catoni", "mcallester"):
        fixed = fixed_scales_bound(spectra, n=n, nll_sum=0.2 * n, objective=objective)
        fit = fit_scales(spectra, n=n, nll_sum=0.2 * n, objective=objective, steps=150, rounds=2)
        assert fit.bound < fixed < 1.0
        assert set(fit.scales) == {"l0", "l1", "l2", "l3"}


def test_fit_refuses_bad_input() -> None:
    spec = [LayerSpectrum("l", torch.ones(3, dtype=torch.float64), 0.0)]
    with pytest.raises(ConfigError):
        fit_scales(spec, n=0, nll_sum=1.0)
    with pytest.raises(ConfigError):
        fit_scales(spec, n=10, nll_sum=1.0, objective="bogus")
    with pytest.raises(zoo.ZooError):
        fit_scales([LayerSpectrum("l", torch.tensor([-1.0], dtype=torch.float64), 0.0)], n=10, nll_sum=1.0)


def test_single_precision_quadratic_matches_float64_value_and_gradient(built) -> None:
    model, prior, _ = built
    moved = tiny_model(seed=1)
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = []
    values = []
    for single in (False, True):
        moved.zero_grad()
        q = prior.quadratic(moved, single=single)
        q.backward()
        values.append(q.item())
        grads.append(torch.cat([p.grad.flatten() for p in moved.parameters()]))
    assert values[0] > 0
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())


def test_a_channels_last_network_saves_samples_and_predicts_in_its_layout(built, tmp_path: Path) -> None:
    # timm users convert convnets with .to(memory_format=torch.channels_last) (1.5–4× faster on CPU for
    # efficientnets); safetensors refuses such weights, and draws in the default layout made every conv convert
    model, prior, _ = built
    fast = tiny_model().to(memory_format=torch.channels_last)
    fast.load_state_dict(model.state_dict())
    prior_cl = zoo.Prior(prior.mean, prior.layers, prior.meta, model=fast)
    saved = prior_cl.save(str(tmp_path / "cl"), model=fast)
    loaded_model, _ = zoo.load(str(saved))
    for (name, a), b in zip(model.state_dict().items(), loaded_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    conv = [k for k, p in fast.named_parameters() if p.ndim == 4]
    draw = prior_cl.sample(fast, torch.Generator().manual_seed(0))
    reference = prior.sample(model, torch.Generator().manual_seed(0))
    assert conv and all(draw[k].is_contiguous(memory_format=torch.channels_last) for k in conv)
    assert all(torch.equal(draw[k], reference[k]) for k in reference)  # the same draw, only laid out differently
    x = loader()[0][0]
    for mode in ("glm", "nn"):
        ours = prior_cl.predict(x, samples=4, generator=torch.Generator().manual_seed(1), mode=mode)
        theirs = prior.predict(x, samples=4, generator=torch.Generator().manual_seed(1), mode=mode)
        assert torch.allclose(ours.probs, theirs.probs, atol=1e-5), mode
