"""zoo.build_prior: curvature pass, then PAC-Bayes-fitted scales, then a Prior (docs/method.md §2–§3, §5)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo import __version__
from zoo.calibration import select_precision_multiplier
from zoo.curvature import DiagonalBlock, KronBlock, kfac
from zoo.errors import ConfigError, ModelError
from zoo.kron import KronPrecision
from zoo.kron.exact import EIGH_FALLBACKS
from zoo.layers import DiagLayer, KronLayer, Layer, kron_params
from zoo.marglik import choose_strength
from zoo.predictive import check_mode
from zoo.prior import Prior
from zoo.scales import LayerSpectrum, ScaleFit, fit_scales

FORMAT_VERSION = 1


def isotropic_lambda(model: nn.Module) -> float:
    """λ = d / ‖θ‖²: the maximum-likelihood precision of N(0, λ⁻¹I) for the pretrained weights (default λ)."""
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    total = sum(p.square().sum().item() for p in params)
    count = sum(p.numel() for p in params)
    if total <= 0:
        raise ModelError("all trainable weights are zero; pass lam= explicitly")
    return count / total


def build_prior(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: str = "mc",
    *,
    lam: float | None = None,
    holdout: float = 0.1,
    mode: str | None = None,
    samples: int = 16,
    objective: str = "catoni",
    delta: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool = True,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    dataset: str = "unknown",
    smoke: bool = False,
    timm_name: str | None = None,
    approx: str = "expand",
) -> Prior:
    """The Bayesian counterpart of a trained model on the data it was trained on.

    Every `round(1/holdout)`-th batch of `loader` is held out (its labels must be real class indices). One K-FAC
    pass (`zoo.curvature.kfac`, resumable and distributed) over the rest gives F per layer and the data's N and
    summed NLL. λ of the reference N(0, λ⁻¹I) is, unless given, the grid value (times d/‖θ‖²) of highest Laplace
    evidence; the per-layer scales of P = (β·F + α·λ·I)/τ around the weights are then fitted by minimising the
    PAC-Bayes bound against that reference. Last, the whole precision is multiplied by the t that predicts best on
    the held-out batches in `mode` without losing to the network (zoo.calibration); the held-out figures are
    recorded in the metadata. Factor eigendecompositions are computed once here (float64) and stored.
    """
    fallbacks_before = len(EIGH_FALLBACKS)
    t0 = time.perf_counter()
    if lam is not None and not (math.isfinite(float(lam)) and float(lam) > 0):
        raise ConfigError(f"lam must be positive and finite, got {lam}")
    if not (isinstance(holdout, int | float) and 0 <= holdout < 1):
        raise ConfigError(f"holdout must lie in [0, 1), e.g. 0.1; got {holdout!r}")
    fit_part, held_part = holdout_split(loader, holdout)
    blocks = kfac(model, fit_part, fisher, approx=approx, generator=generator, progress=progress,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume)
    t_curv = time.perf_counter() - t0
    modules = dict(model.named_modules())
    curvature: list[LayerSpectrum] = []  # raw eigenvalues of F and ‖θ‖² per layer, before λ is known
    bases: dict[str, KronPrecision] = {}
    items = tqdm(blocks.items(), desc="eigendecomposing", unit="layer", disable=not progress)
    for name, block in items:
        module = modules[name]
        if isinstance(block, KronBlock):
            base = KronPrecision([(block.A, block.G)], check_psd=False)  # factor_eigh checks the eigenvalues
            (la, _), (lg, _) = base.factor_eigh()
            bases[name] = base
            mean_sq = sum(getattr(module, p).detach().double().square().sum().item() for p in kron_params(module))
            curvature.append(LayerSpectrum(name or "<root>", torch.outer(lg, la).reshape(-1).cpu(), mean_sq))
        else:
            assert isinstance(block, DiagonalBlock)
            values = torch.cat([v.detach().double().reshape(-1) for v in block.diagonal.values()]).cpu()
            mean_sq = sum(dict(module.named_parameters(recurse=False))[k].detach().double().square().sum().item()
                          for k in block.diagonal)
            curvature.append(LayerSpectrum(name or "<root>", values, mean_sq))
    lam_value, evidence = (float(lam), None) if lam is not None else evidence_lambda(model, curvature)
    spectra = [LayerSpectrum(c.name, c.ratios / lam_value, lam_value * c.mahalanobis) for c in curvature]
    fit = fit_scales(spectra, n=blocks.n, nll_sum=blocks.nll_sum, objective=objective, delta=delta)
    layers: dict[str, Layer] = {}
    for name, block in blocks.items():
        s = fit.scales[name or "<root>"]
        beta_t, damping_t = s["beta"] / s["tau"], s["alpha"] * lam_value / s["tau"]
        if isinstance(block, KronBlock):
            params = kron_params(modules[name])
            layers[name] = KronLayer(bases[name].rescaled(scales=[beta_t], damping=damping_t), params)
        else:
            assert isinstance(block, DiagonalBlock)
            layers[name] = DiagLayer({k: (beta_t * v.detach().double() + damping_t).cpu()
                                      for k, v in block.diagonal.items()})
    mean = {k: v.detach().clone().cpu() for k, v in model.named_parameters() if v.requires_grad}
    prior = Prior(mean, layers, {}, model=model)
    calibrated, t = None, 1.0
    if held_part is not None:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item())
                                            if generator is not None else 0)
        t, calibrated = select_precision_multiplier(prior, held_part, mode=check_mode(mode), samples=samples,
                                                    generator=gen)
        prior = prior.scaled(dict.fromkeys(prior.layers, t))
    meta = prior_meta(model, fit, lam_value, blocks.n, fisher, approx, dataset, time.perf_counter() - t0, t_curv,
                      smoke, timm_name)
    meta["lambda_evidence"] = evidence
    meta["precision_multiplier"] = t  # precision = t·[(β/τ)·F + (αλ/τ)·I], t from the held-out check
    meta["numerics"] = {"eigh_fallbacks": EIGH_FALLBACKS[fallbacks_before:]}
    meta["holdout"] = calibrated if calibrated is not None else {"n": 0, "note": "no held-out data (holdout=0 or "
                                                                 "fewer than two batches); width not checked"}
    prior.meta = meta
    return prior


class _Batches:
    """Every batch of a loader whose index i has (i % every == 0) == held; re-iterable, streaming."""

    def __init__(self, loader: Iterable[Any], every: int, held: bool) -> None:
        self.loader, self.every, self.held = loader, every, held

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if (i % self.every == 0) == self.held:
                yield batch


def holdout_split(loader: Iterable[Any], holdout: float) -> tuple[Iterable[Any], Iterable[Any] | None]:
    """(batches to fit on, held-out batches or None): every round(1/holdout)-th batch, starting with the first."""
    if holdout == 0:
        return loader, None
    every = max(2, round(1 / holdout))
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        count = None
    if count is not None and count < 2:
        return loader, None
    return _Batches(loader, every, held=False), _Batches(loader, every, held=True)


def evidence_lambda(model: nn.Module, curvature: list[LayerSpectrum]) -> tuple[float, dict[str, Any]]:
    """λ = κ·d/‖θ‖², κ on LAMBDA_GRID maximising the Laplace evidence of N(0, λ⁻¹I) (curvature: eigenvalues, ‖θ‖²)."""
    base = isotropic_lambda(model)
    spectra = [LayerSpectrum(c.name, c.ratios / base, base * c.mahalanobis) for c in curvature]
    kappa, rows = choose_strength(spectra, LAMBDA_GRID)
    return kappa * base, {"base": base, "kappa": kappa, "grid": rows}


LAMBDA_GRID: tuple[float, ...] = tuple(10.0 ** k for k in range(-2, 7))
"""Multipliers of d/‖θ‖² for λ; the evidence picks one (the build's own data, so nothing to pay for)."""


def prior_meta(
    model: nn.Module, fit: ScaleFit, lam: float, n: int, fisher: str, approx: str, dataset: str, seconds: float,
    curvature_seconds: float, smoke: bool, timm_name: str | None,
) -> dict[str, Any]:
    """The JSON metadata of a prior (prior_config.json and the safetensors header); model_sha256 is set on save."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    tag = cfg.get("tag")
    name = timm_name or (f"{arch}.{tag}" if tag else arch)
    return {
        "format_version": FORMAT_VERSION,
        "kind": "prior",
        "library": "prior-zoo",
        "library_version": __version__,
        "architecture": arch,
        "timm_name": name,
        "num_classes": getattr(model, "num_classes", None),
        "curvature": {"type": "kfac", "fisher": fisher, "approx": approx, "n": n, "dataset": dataset,
                      "seconds": round(curvature_seconds, 3)},
        "build_seconds": round(seconds, 3),
        "objective": fit.objective,
        "lambda": lam,
        "bound": {
            "kind": f"{fit.objective} PAC-Bayes bound on the source data's Taylor NLL risk in bits "
                    f"(the paper's approximate bound; reference prior N(0, λ⁻¹I))",
            "value": fit.bound, "delta": fit.delta, "c": fit.c, "kl": fit.kl, "emp_risk_bits": fit.emp_risk_bits,
        },
        "scales": fit.scales,
        "scales_summary": fit.summary(),
        "model_sha256": None,
        "smoke": smoke,
        "base_model": cfg.get("hf_hub_id") or None,
        "datasets": [dataset],
        "license": cfg.get("license", "apache-2.0"),
    }
