"""The per-layer pieces of a fine-tuned posterior: F_new + P in the prior's basis, its spectra, and Q's layers.

`posterior_pieces` extends each prior layer by the training data's K-FAC term (zoo.kron.extend, exact for isotropic
priors and new heads, otherwise F_new's exact diagonal in the prior's basis) and records the spectra u = E/R with
the Mahalanobis terms that the evidence (zoo.marglik) and the bounds (zoo.scales) read. `PosteriorFit` turns them
into Q's layers for given scales: (s·β F_new + α·κP)/τ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from zoo.curvature import DiagonalBlock, KFACResult, KronBlock
from zoo.errors import ConfigError, ModelError
from zoo.kron import KronPrecision, extend, rescale_parts, split_diagonal
from zoo.kron.lowrank import input_span, span_of
from zoo.layers import DiagLayer, IsoLayer, KronLayer, Layer, isotropic_kron, kron_matrix
from zoo.pacbayes import catoni_grid, catoni_objective
from zoo.predictive import classifier_name
from zoo.prior import Prior
from zoo.scales import LayerSpectrum, ScaleFit, evaluate


def training_spans(blocks: Any, layers: dict[str, Layer], approx: str,
                   extended: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """{Kronecker layer: orthonormal basis of its inputs on the training data}, from the K-FAC input factors.

    The width selection's linearised draws are evaluated on the training data only, where a layer's deviation W
    acts through W·a with a in that span: projecting the draws onto it changes none of those outputs and costs r/in
    of the input-side rotation (5 of 4608 columns on resnet10t's last convolution at one shot per class). Only the
    "expand" factors hold every input position; "reduce" averages them, so it gets no spans.

    `extended` (layer → zoo.kron.extend's result, PosteriorFit.unit) reuses the root extend already searched for."""
    if approx != "expand":
        return {}
    spans = {}
    for name, layer in layers.items():
        block = blocks.get(name)
        if isinstance(layer, KronLayer) and isinstance(block, KronBlock):
            searched = (extended or {}).get(name)
            if hasattr(searched, "new_input_root"):
                root = searched.new_input_root
                span = None if root is None else span_of(root[0])
            else:
                span = input_span(block.A.cpu(), torch.finfo(block.A.dtype).eps)
            if span is not None:
                spans[name] = span
    return spans


HEAD_CURVATURES = ("bohning", "fisher")


def bohning_factor(classes: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """½(I − 11ᵀ/C): Böhning's bound on the softmax log-likelihood's Hessian in the logits, the same at any weights.

    K-FAC's output factor for a head is the mean of Λᵢ = diag(pᵢ) − pᵢpᵢᵀ, near zero once the head fits its few
    examples confidently, so the head's Laplace covariance stays its prior's in every direction, seen or not, and
    its logit variance follows the feature norm alone. The bound (Böhning 1992, Λᵢ ⪯ ½(I − 11ᵀ/C)) keeps the
    curvature of the data's span: the head is then narrow along the training features and at its prior across
    them, so its spread grows on inputs unlike the shots. It is one factor for every example, so kron(A, B) =
    Σᵢ āᵢāᵢᵀ ⊗ B is exact for it (no independence assumption) and bounds the head's exact GGN Σᵢ āᵢāᵢᵀ ⊗ Λᵢ from
    above, with A in K-FAC's scale (summed over the data)."""
    return 0.5 * (torch.eye(classes, dtype=dtype) - 1.0 / classes)


def new_classifier(model: nn.Module, prior: Prior) -> list[str]:
    """[the classifier's name] where it carries a new head's isotropic prior, else []: the one layer whose outputs
    are the logits, the only one Böhning's bound is about (an isotropic_prior's body layers are not)."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return []
    name = classifier_name(model)
    return [name] if isinstance(prior.layers.get(name), IsoLayer) else []


def with_bohning_heads(blocks: KFACResult, heads: Sequence[str]) -> KFACResult:
    """`blocks` with each Linear head's G replaced by `bohning_factor` (its A, the data's inputs, kept)."""
    out = dict(blocks)
    for name in heads:
        block = blocks.get(name)
        if isinstance(block, KronBlock):
            out[name] = KronBlock(block.A, bohning_factor(block.G.shape[0], dtype=block.G.dtype).to(block.G.device))
    return KFACResult(out, n=blocks.n, nll_sum=blocks.nll_sum, fisher=blocks.fisher, approx=blocks.approx)


def posterior_pieces(model: nn.Module, prior: Prior, blocks: Any) -> PosteriorFit:
    """F_new + P per layer in P's basis, and the spectra u = E/R with the Mahalanobis terms (no scales fitted)."""
    modules = dict(model.named_modules())
    spectra: list[LayerSpectrum] = []
    unit: dict[str, KronPrecision | tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    params: dict[str, tuple[str, ...]] = {}
    for name, layer in prior.layers.items():
        block = blocks.get(name)
        label = name or "<root>"
        if block is None:
            raise ModelError(f"the K-FAC pass produced no curvature for layer {name!r}; is it frozen in the model "
                             "but not in the prior? Load model and prior together with zoo.load")
        module = modules[name]
        if isinstance(layer, KronLayer | IsoLayer) and isinstance(block, KronBlock):
            theta = kron_matrix(module, layer.params).detach().double().cpu()
            if isinstance(layer, KronLayer):
                base = layer.precision
                mu = torch.cat([prior.mean[_key(name, p)].reshape(theta.shape[0], -1) for p in layer.params],
                               dim=1).double().cpu()
                m = base.quadratic(theta - mu).item()
            else:
                base = isotropic_kron(layer.lam, *theta.shape)
                m = layer.lam * theta.square().sum().item()
            q1 = extend(base, block.A.detach().cpu(), block.G.detach().cpu())
            e, r = split_diagonal(q1)
            spectra.append(LayerSpectrum(label, (e / r).reshape(-1).cpu(), m))
            unit[name] = q1
            params[name] = layer.params
        elif isinstance(layer, DiagLayer) and isinstance(block, DiagonalBlock):
            fisher = {k: block.diagonal[k].detach().double().cpu() for k in layer.precision}
            prec = {k: v.double().cpu() for k, v in layer.precision.items()}
            own = dict(module.named_parameters(recurse=False))
            u = torch.cat([(fisher[k] / prec[k]).reshape(-1) for k in prec])
            m = sum((prec[k] * (own[k].detach().double().cpu() - prior.mean[_key(name, k)].double().cpu()).square())
                    .sum().item() for k in prec)
            spectra.append(LayerSpectrum(label, u, m))
            unit[name] = (fisher, prec)
        else:
            raise ModelError(f"layer {name!r}: the prior holds a {type(layer).__name__} but the curvature pass gave a "
                             f"{type(block).__name__}; the prior was built for another architecture or layer type")
    return PosteriorFit(unit, params, spectra, None, blocks.n, blocks.nll_sum)


class PosteriorFit:
    """The per-layer pieces of Q = (s·β F_new + α·κP)/τ: its layers for a curvature multiplier s (1: as fitted).

    `kappa` (layer → κ, default 1) is the prior strength the spectra and scales refer to.
    """

    def __init__(self, unit: dict[str, Any], params: dict[str, tuple[str, ...]], spectra: list[LayerSpectrum],
                 fit: ScaleFit | None, n: int, nll_sum: float, kappa: dict[str, float] | None = None) -> None:
        self.unit, self.params, self.spectra, self.fit, self.n, self.nll_sum = unit, params, spectra, fit, n, nll_sum
        self.kappa = kappa or {}

    def _layers(self, scales: dict[str, tuple[float, float]]) -> dict[str, Layer]:
        """Layers with precision b·F_new + a·P for (b, a) = scales[name]."""
        out: dict[str, Layer] = {}
        for name, value in self.unit.items():
            b, a = scales[name]
            if isinstance(value, KronPrecision):
                out[name] = KronLayer(rescale_parts(value, b, a), self.params[name])
            else:
                fisher, prec = value
                out[name] = DiagLayer({k: b * fisher[k] + a * prec[k] for k in prec})
        return out

    def laplace_layers(self, kappa: dict[str, float]) -> dict[str, Layer]:
        """The Laplace posterior F_new + κP per layer."""
        return self._layers({name: (1.0, kappa.get(name, 1.0)) for name in self.unit})

    def rescaled_spectra(self, kappa: dict[str, float]) -> list[LayerSpectrum]:
        """The spectra against κP: u/κ and κ·m."""
        out = []
        for sp in self.spectra:
            k = kappa.get(layer_name(sp.name), 1.0)
            out.append(LayerSpectrum(sp.name, sp.ratios / k, sp.mahalanobis * k))
        return out

    def layers(self, sharpen: float = 1.0) -> dict[str, Layer]:
        if self.fit is None:
            raise ConfigError("these posterior pieces have no fitted scales; construct them with a ScaleFit "
                              "(zoo.scales.fit_scales)")
        scales = {}
        for name in self.unit:
            s = self.fit.scales[name or "<root>"]
            k = self.kappa.get(name, 1.0)
            scales[name] = (sharpen * s["beta"] / s["tau"], k * s["alpha"] / s["tau"])
        return self._layers(scales)

    def taylor_bound(self, sharpen: float, delta: float) -> dict[str, float]:
        """The paper's number for the sharpened Q: Catoni on the Taylor risk in bits, c on the grid at δ/|grid|."""
        if self.fit is None:
            raise ConfigError("these posterior pieces have no fitted scales; construct them with a ScaleFit "
                              "(zoo.scales.fit_scales)")
        logs = torch.tensor([[math.log(self.fit.scales[sp.name][k]) for k in ("alpha", "beta", "tau")]
                             for sp in self.spectra], dtype=torch.float64)
        logs[:, 1] += math.log(sharpen)
        return self.taylor_bound_of(logs, delta)

    def taylor_bound_of(self, logs: Tensor, delta: float) -> dict[str, float]:
        """Catoni on the Taylor risk in bits for per-layer log α, log β, log τ (rows in spectra order)."""
        risk, kl = evaluate(self.spectra, logs, n=self.n, nll_sum=self.nll_sum)
        grid = catoni_grid()
        value, c = min((catoni_objective(risk, kl, self.n, delta / len(grid), c).item(), c) for c in grid)
        return {"value": value, "c": c, "kl": kl.item(), "emp_risk_bits": risk.item(), "delta": delta}


def laplace_layer_logs(spectra: Sequence[LayerSpectrum], taus: Mapping[str, float],
                       alphas: Mapping[str, float]) -> Tensor:
    """log α = log alphas[layer], log β = 0, log τ = log taus[layer]: Q = (F + ακP)/τ, spectra against κP."""
    logs = torch.zeros(len(spectra), 3, dtype=torch.float64)
    logs[:, 0] = torch.tensor([math.log(alphas[sp.name]) for sp in spectra], dtype=torch.float64)
    logs[:, 2] = torch.tensor([math.log(taus[sp.name]) for sp in spectra], dtype=torch.float64)
    return logs


def layer_name(label: str) -> str:
    """A spectrum's label back to its layer name (the root module is labelled "<root>")."""
    return "" if label == "<root>" else label


def _key(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local
