"""zoo.build_prior: curvature pass, then PAC-Bayes-fitted scales, then a Prior (METHOD.md §2–§3, §5)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo import __version__
from zoo.curvature import DiagonalBlock, KronBlock, kfac
from zoo.errors import ConfigError, ModelError
from zoo.kron import KronPrecision
from zoo.layers import DiagLayer, KronLayer, Layer, kron_params
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

    One K-FAC pass (`zoo.curvature.kfac`, resumable and distributed) gives F per layer and the data's N and summed
    NLL; the per-layer scales of P = (β·F + α·λ·I)/τ around the weights are then fitted by minimising the
    PAC-Bayes bound against the reference N(0, λ⁻¹I) on the same data. Factor eigendecompositions are computed
    once here (float64) and stored with the prior.
    """
    t0 = time.perf_counter()
    lam_value = isotropic_lambda(model) if lam is None else float(lam)
    if not (math.isfinite(lam_value) and lam_value > 0):
        raise ConfigError(f"lam must be positive and finite, got {lam}")
    blocks = kfac(model, loader, fisher, approx=approx, generator=generator, progress=progress,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume)
    t_curv = time.perf_counter() - t0
    modules = dict(model.named_modules())
    spectra: list[LayerSpectrum] = []
    bases: dict[str, KronPrecision] = {}
    items = tqdm(blocks.items(), desc="eigendecomposing", unit="layer", disable=not progress)
    for name, block in items:
        module = modules[name]
        if isinstance(block, KronBlock):
            base = KronPrecision([(block.A, block.G)], check_psd=False)  # factor_eigh checks the eigenvalues
            (la, _), (lg, _) = base.factor_eigh()
            bases[name] = base
            mean_sq = sum(getattr(module, p).detach().double().square().sum().item() for p in kron_params(module))
            ratios = torch.outer(lg, la).reshape(-1).cpu() / lam_value
            spectra.append(LayerSpectrum(name, ratios, lam_value * mean_sq))
        else:
            assert isinstance(block, DiagonalBlock)
            values = torch.cat([v.detach().double().reshape(-1) for v in block.diagonal.values()]).cpu()
            mean_sq = sum(dict(module.named_parameters(recurse=False))[k].detach().double().square().sum().item()
                          for k in block.diagonal)
            spectra.append(LayerSpectrum(name or "<root>", values / lam_value, lam_value * mean_sq))
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
    meta = prior_meta(model, fit, lam_value, blocks.n, fisher, approx, dataset, time.perf_counter() - t0, t_curv,
                      smoke, timm_name)
    return Prior(mean, layers, meta, model=model)


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
