"""zoo.finetune: PAC-Bayes fine-tuning from a prior, then a Laplace posterior with fitted scales (docs/method.md §5).

1. Train the mean with Adam on a differentiable bound (Catoni or McAllester) or the MAP objective. The risk is the
   batch's mean NLL in bits, the KL's weight-dependent term is ½(θ−μ)ᵀΛ_P(θ−μ) = ½·prior.quadratic(model), and N
   is the size of the training set, never the batch size. Catoni's c is re-chosen on `catoni_grid()` after every
   epoch at δ/|grid|; c only steers θ̂, which PAC-Bayes lets depend on the data, so it costs the certificate
   nothing.
2. K-FAC on the training data at θ̂ gives F_new per layer.
3. Per layer, Q = N(θ̂, ((β F_new + α P)/τ)⁻¹), built with `zoo.kron.extend` in the prior's own basis (exact for
   isotropic priors and new heads; otherwise F_new's exact diagonal there), and α, β, τ fitted by
   `zoo.scales.fit_scales` on the Taylor-risk bound with the closed-form KL. Every quantity of that Q (sampling,
   KL, log-det) is exact for the Gaussian it represents, so its certificate is rigorous.

Training runs the model in eval mode: BatchNorm keeps the prior's statistics, so the classifier is a function of the
weights alone (the bound is over weights) and few-shot batches do not corrupt the statistics. Across a domain
shift (ImageNet statistics on digits) those statistics make every input look alike and nothing trains
(measured: efficientnet_lite0 on 200 digits at 32 px stays at chance); `norm_statistics="adapt"` first
re-estimates them on the training data (AdaBN, Li et al. 2016), then trains in eval mode as before. The
statistics then depend on the training data, which a certificate on that same data does not account for, so it
is opt-in here; `zoo.certify_data_dependent` adapts on the prior's half only, where it costs rigour nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo import __version__
from zoo.calibration import TRAIN_LOGLIK_SLACK, WIDTH_GRID, joint_slack, select_width
from zoo.curvature import DiagonalBlock, KronBlock, kfac
from zoo.errors import ConfigError, DataError, ModelError, NumericalError
from zoo.head_evidence import refit_new_heads
from zoo.kron import KronPrecision, extend, rescale_parts, split_diagonal
from zoo.kron.exact import EIGH_FALLBACKS
from zoo.kron.lowrank import input_span, span_of
from zoo.layers import DiagLayer, IsoLayer, KronLayer, Layer, isotropic_kron, kron_matrix
from zoo.marglik import STRENGTH_GRID, choose_strengths
from zoo.pacbayes import catoni_grid, catoni_objective, kl_bound, map_objective, mcallester_objective
from zoo.posterior import Posterior, check_architecture
from zoo.predictive import check_mode
from zoo.prior import Prior
from zoo.scales import LayerSpectrum, ScaleFit, evaluate, fit_scales

OBJECTIVES = ("catoni", "mcallester", "map")
LN2 = math.log(2.0)


class ReferencePenalty:
    """The prior's isotropic reference N(θ*, λ⁻¹I) on the pretrained layers as a training penalty: quadratic =
    λ‖θ − θ*‖² (a new head adds nothing), L2-SP weight decay at the prior's evidence-chosen λ."""

    def __init__(self, prior: Prior, lam: float) -> None:
        self.prior, self.lam = prior, lam

    def quadratic(self, model: nn.Module, *, single: bool = False) -> Tensor:
        return self.prior.reference_quadratic(model, self.lam)


def objective_value(
    model: nn.Module, prior: Prior | ReferencePenalty | None, x: Tensor, y: Tensor, objective: str, *, n: int,
    delta: float, c: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(objective, mean NLL in nats, ½·quadratic) of one batch, differentiable in the model's weights.

    `prior=None` is the κ → 0 limit: no prior term (its quadratic is 0), the likelihood alone.

    risk = mean NLL / ln 2 (bits), KL ≈ ½(θ−μ)ᵀΛ_P(θ−μ). catoni: c·risk + KL/n, which Catoni's bound (at
    δ/|catoni_grid()|, fixed c) is an increasing function of; mcallester: the bound itself; map: mean NLL +
    ½(θ−μ)ᵀΛ_P(θ−μ) / n.
    """
    logits = model(x)
    nll = F.cross_entropy(logits, y)
    # the prior term in the network's own precision: float32 networks get the twice-faster float32 evaluation
    single = next(model.parameters()).dtype != torch.float64
    half_quad = torch.zeros((), dtype=torch.float64) if prior is None else 0.5 * prior.quadratic(model, single=single)
    nll64 = nll.double().to(half_quad.device)
    if not (torch.isfinite(nll64) and torch.isfinite(half_quad)):
        raise NumericalError(f"the training loss is not finite (NLL {nll.item()}, prior term {half_quad.item()}); "
                             "lower the learning rate, and check the inputs for NaN")
    if objective == "catoni":
        # For a fixed c, Catoni's bound is increasing in c·risk + (KL + ln(|grid|/δ))/n: the same minimiser,
        # without the saturation at 1 where the bound's own gradient vanishes (as in zoo.scales).
        catoni_objective(nll64.detach() / LN2, half_quad.detach(), n, delta / len(catoni_grid()), c)  # validates
        value = c * nll64 / LN2 + half_quad / n
    elif objective == "mcallester":
        value = mcallester_objective(nll64 / LN2, half_quad, n, delta)
    else:
        value = map_objective(nll64, half_quad, n)
    return value, nll, half_quad


def finetune(
    model: nn.Module,
    prior: Prior,
    train_loader: Iterable[Any],
    objective: str = "catoni",
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    val_loader: Iterable[Any] | None = None,
    patience: int = 5,
    delta: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool = True,
    fisher: str = "mc",
    fit_objective: str | None = None,
    dataset: str = "unknown",
    prior_ref: str | None = None,
    strength: str = "marglik",
    width: str = "auto",
    sharpen: Sequence[float] | None = None,
    selection_samples: int = 8,
    norm_statistics: str = "keep",
    refit_head: bool = True,
    mean_penalty: str = "none",
) -> Posterior:
    """Fine-tune `model` (whose weights start at the prior mean) on `train_loader` and return its Posterior.

    `objective` is "catoni", "mcallester" or "map": the bound (or MAP objective) the mean is trained on. Adam
    with `lr` runs `epochs` epochs (default 3e-3: 1e-2 is chaotic on few-shot fine-tunes, the same 100 digits
    gave 0.27–0.91 held-out accuracy over head initialisations, 0.89–0.96 at 3e-3); with `val_loader` it stops
    after `patience` epochs without a lower validation NLL and keeps the best weights. `generator` seeds
    everything random here (the MC Fisher's labels, any stochastic layers); the loader's shuffling is its own.

    `strength="marglik"` (default) serves prediction: Q is built against κP, one κ for the pretrained body and
    one for a new head, each chosen on `zoo.marglik.STRENGTH_GRID` by the Laplace evidence of the training data
    at the trained mean, and paid for in the certificate by the union bound over the grid. The mean itself is
    trained by likelihood alone (`mean_penalty="none"`, the κ → 0 limit, see STRENGTH_NOTE), or with
    `mean_penalty="reference"` as the MAP of the prior's isotropic reference on the pretrained body:
    cross-entropy + λ‖θ − θ*‖²/(2n), L2-SP weight decay at the λ the prior's build chose by evidence (the learned
    curvature part of P is too stiff for a few Adam steps). Which is better depends on the network and the task
    (MEAN_PENALTY_NOTE). `strength="bound"` keeps the prior as given and re-chooses c by the bound.

    `width` picks Q: "laplace" is N(θ̂, (F_new + κP)⁻¹), the Laplace posterior of the evidence-chosen prior;
    "bound" fits α, β, τ per layer on the `fit_objective` Taylor bound and multiplies the curvature by the
    `sharpen` value (grid SHARPEN_GRID) with the lowest kl-bound on `selection_samples` Monte Carlo draws;
    "auto" (default) uses "bound" only where a bound can be informative (the kl-bound at zero training error is
    below AUTO_BOUND = 0.2) and "laplace" elsewhere. The model is updated in place and becomes the posterior's `model`.

    `norm_statistics="adapt"` re-estimates BatchNorm's running statistics on `train_loader` before training (see
    the module docstring); "keep" (default) trains with the prior's.

    `refit_head` (default, with strength="marglik"): after training, each new head (an isotropic prior on a Linear)
    is re-fitted on the trained body's features at the prior precision its exact Laplace evidence prefers
    (zoo.head_evidence); where the evidence prefers no head at all, at the strongest precision the training data's
    likelihood-ratio interval allows. Q is then built around that mean.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    fit_obj = fit_objective or ("mcallester" if objective == "mcallester" else "catoni")
    if fit_obj not in ("catoni", "mcallester"):
        raise ConfigError(f"fit_objective must be 'catoni' or 'mcallester', got {fit_obj!r}")
    if strength not in STRENGTHS:
        raise ConfigError(f"strength must be one of {STRENGTHS}, got {strength!r}")
    if width not in WIDTHS:
        raise ConfigError(f"width must be one of {WIDTHS}, got {width!r}")
    if mean_penalty not in MEAN_PENALTIES:
        raise ConfigError(f"mean_penalty must be one of {MEAN_PENALTIES}, got {mean_penalty!r}")
    if norm_statistics not in NORM_STATISTICS:
        raise ConfigError(f"norm_statistics must be one of {NORM_STATISTICS}, got {norm_statistics!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, e.g. 3e-3; got {lr!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta must lie in (0, 1), e.g. 0.05; got {delta!r}")
    check_architecture(model, prior)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    fallbacks_before = len(EIGH_FALLBACKS)
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    approx = (prior.meta.get("curvature") or {}).get("approx", "expand")
    groups = strength_groups(prior)
    marglik = strength == "marglik"
    kappa = dict.fromkeys(groups.values(), 1.0)
    adapted = adapt_norm_statistics(model, train_loader) if norm_statistics == "adapt" else 0
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        n, nll0 = _scan(model, train_loader, device)
        active = _mean_penalty(prior, marglik, mean_penalty)
        train_objective = "map" if marglik else objective  # under marglik the trade-off is κ's, not the bound's
        half_quad = 0.0 if active is None else (0.5 * active.quadratic(model)).item()
        c = _choose_c(nll0 / LN2, half_quad, n, delta, 1.0) if objective == "catoni" and not marglik else LN2
        history: list[dict[str, float]] = []
        best: tuple[float, int, list[Tensor]] | None = None
        optimizer = torch.optim.Adam(params, lr=lr)
        bar = tqdm(range(epochs), desc=f"fine-tuning ({objective})", unit="epoch", disable=not progress)
        for epoch in bar:
            nll_sum, count, last_half_quad = 0.0, 0, half_quad
            for x, y in train_loader:
                x, y = x.to(device), _labels(y, device)
                optimizer.zero_grad(set_to_none=True)
                value, nll, hq = objective_value(model, active, x, y, train_objective, n=n, delta=delta, c=c)
                if not torch.isfinite(value):
                    raise NumericalError(f"the {objective} objective became {value.item()} at epoch {epoch}; lower "
                                         f"the learning rate (lr={lr}) or check the data")
                value.backward()
                optimizer.step()
                nll_sum += nll.item() * y.shape[0]
                count += y.shape[0]
                last_half_quad = hq.item()
            mean_nll = nll_sum / max(count, 1)
            record = {"epoch": epoch, "train_nll": mean_nll}
            shown = {"nll": f"{mean_nll:.3f}"}
            if active is not None:  # without a prior term there is no quadratic to report (it is not the KL)
                record["half_quadratic"] = last_half_quad
                shown["l2sp" if marglik else "kl_quad"] = f"{last_half_quad:.1f}"
            if objective == "catoni":
                if not marglik:
                    c = _choose_c(mean_nll / LN2, last_half_quad, n, delta, c)
                record["c"] = c
            if val_loader is not None:
                val_nll = _mean_nll(model, val_loader, device)
                record["val_nll"] = val_nll
                if best is None or val_nll < best[0]:
                    best = (val_nll, epoch, [p.detach().clone() for p in params])
            history.append(record)
            bar.set_postfix(shown)
            if best is not None and epoch - best[1] >= patience:
                break
        if best is not None:
            with torch.no_grad():
                for p, value in zip(params, best[2], strict=True):
                    p.copy_(value)
    refit = refit_head and marglik  # the head is re-fitted where κ, not the bound, carries the trade-off
    head_record = refit_new_heads(model, prior, train_loader, device) if refit else {}
    train_seconds = time.perf_counter() - t0
    blocks = kfac(model, train_loader, fisher, approx=approx, generator=gen, progress=progress)
    pieces = posterior_pieces(model, prior, blocks)
    if marglik:
        kappa, tables = choose_strengths(pieces.spectra, {sp.name: groups[_name(sp.name)] for sp in pieces.spectra})
    by_layer = {name: kappa[g] for name, g in groups.items()}
    reference = prior.scaled(by_layer) if marglik else prior
    hypotheses = len(STRENGTH_GRID) ** len(kappa) if marglik else 1
    mean = {k: v.detach().clone().cpu() for k, v in model.named_parameters() if v.requires_grad}
    # Q's precision in the body never falls below the prior's own (checked upstream to predict well): κ only
    # weakens the prior for the mean, so unseen directions cannot widen past the calibrated prior
    floor = _body_floor(by_layer, groups, BODY_COVARIANCE_FLOOR)
    laplace_layers = pieces.laplace_layers(floor)
    spectra = pieces.rescaled_spectra(by_layer)  # against κP, the prior the certificate uses
    chosen_width = width
    if width == "auto":
        chosen_width = auto_width(mean, laplace_layers, reference, spectra, n, delta / hypotheses)
    width_record = None
    pinned: dict[str, float] = {}
    if chosen_width == "bound":
        fit = fit_scales(spectra, n=blocks.n, nll_sum=blocks.nll_sum, objective=fit_obj, delta=delta)
        pieces = PosteriorFit(pieces.unit, pieces.params, spectra, fit, blocks.n, blocks.nll_sum, by_layer)
        chosen, selection = _select_sharpen(model, reference, pieces, mean, train_loader, sharpen, selection_samples,
                                            delta / hypotheses, torch.Generator().manual_seed(seed + 1), progress)
        layers = pieces.layers(chosen)
        taylor = pieces.taylor_bound(chosen, delta)
    else:
        chosen, selection = None, []
        spans = training_spans(blocks, laplace_layers, approx, pieces.unit)  # the same for every κ̄
        pinned = unidentified_heads(head_record)  # their spread would only temper; their shrinkage did that

        def widest(candidate: dict[str, Layer], grid: Sequence[float]) -> tuple[Posterior, float, dict[str, Any]]:
            q = Posterior(mean, candidate, {}, model=model, prior=reference).scaled(pinned)
            t, record = select_width(q, train_loader, mode=check_mode(None), samples=selection_samples * 2,
                                     generator=torch.Generator().manual_seed(seed + 2), spans=spans,
                                     slack=width_slack(head_record), grid=grid)
            return q, t, record

        laplace, temperature, width_record = widest(laplace_layers, WIDTH_GRID)
        lowered = _body_floor(by_layer, groups, temperature)
        if BODY_FLOOR_FOLLOWS_WIDTH and lowered != floor:  # choose T again, at or below the first choice
            again, t, second = widest(pieces.laplace_layers(lowered), [w for w in WIDTH_GRID if w <= temperature])
            if second["met"]:  # otherwise the data reject the wider body at every T: the first choice stands
                width_record = {**second, "first": {"T": temperature, "body_floor": BODY_COVARIANCE_FLOOR},
                                "body_floor": temperature}
                floor, laplace, temperature = lowered, again, t
        layers = dict(laplace.scaled(dict.fromkeys(laplace.layers, 1.0 / temperature)).layers)
        pieces = PosteriorFit(pieces.unit, pieces.params, spectra, None, blocks.n, blocks.nll_sum, by_layer)
        alphas = {sp.name: floor[_name(sp.name)] / by_layer[_name(sp.name)] for sp in spectra}
        taus = {sp.name: temperature / pinned.get(_name(sp.name), 1.0) for sp in spectra}
        taylor = pieces.taylor_bound_of(laplace_layer_logs(spectra, taus, alphas), delta)
        # no scale fit for the Laplace width: Q = (F_new + α·κP)/T is β = 1, τ = T against κP
        fit = ScaleFit(scales={sp.name: {"alpha": alphas[sp.name], "beta": 1.0, "tau": taus[sp.name]}
                               for sp in spectra},
                       objective="catoni", bound=taylor["value"], c=taylor["c"], delta=delta, kl=taylor["kl"],
                       emp_risk_bits=taylor["emp_risk_bits"], n=blocks.n)
    meta = posterior_meta(
        model, prior, fit, n=blocks.n, fisher=fisher, approx=approx, dataset=dataset, objective=objective,
        training={"epochs": epochs, "epochs_run": len(history), "lr": lr, "seed": seed, "patience": patience,
                  "best_epoch": best[1] if best is not None else None, "history": history,
                  "seconds": round(train_seconds, 3),
                  "norm_statistics": {"method": norm_statistics, "adapted_layers": adapted},
                  "mean_penalty": {"method": mean_penalty if marglik else "prior",
                                   "lambda": active.lam if isinstance(active, ReferencePenalty) else None,
                                   "note": MEAN_PENALTY_NOTE if marglik else None},
                  "c_note": ("the mean minimises NLL + mean_penalty/n, no bound (the trade-off is carried by κ)"
                             if marglik else
                             "catoni c re-chosen per epoch on catoni_grid() at δ/|grid|; it only steers the mean")},
        seconds=time.perf_counter() - t0, prior_ref=prior_ref,
    )
    meta["hypotheses"] = hypotheses
    meta["numerics"] = {"eigh_fallbacks": EIGH_FALLBACKS[fallbacks_before:]}
    chosen_once = [{"epoch": len(history), "kappa": dict(kappa), "evidence": tables}] if marglik else []
    meta["strength"] = {"method": strength, "kappa": kappa if marglik else None, "groups": sorted(set(kappa)),
                        "grid": list(STRENGTH_GRID) if marglik else None, "history": chosen_once,
                        "note": STRENGTH_NOTE}
    meta["head_refit"] = {"enabled": refit, "heads": head_record, "note": HEAD_REFIT_NOTE}
    meta["width"] = {"requested": width, "chosen": chosen_width, "selection": width_record, "note": WIDTH_NOTE,
                     "pinned_heads": {k: PINNED_HEAD_WIDTH for k in pinned}}
    meta["bound"].update(taylor)
    if chosen_width == "bound":
        meta["sharpen"] = {"chosen": chosen, "selection": selection, "note": SHARPEN_NOTE}
    return Posterior(mean, layers, meta, model=model, prior=reference)


WIDTH_NOTE = (
    "laplace: Q = (F_new + κ̄P)/T, κ in a new head, T the widest on calibration.WIDTH_GRID whose predictive keeps "
    "the training data's accuracy and its total log-likelihood within 1.92 nats (Wilks' 95% interval), or, where a "
    "new head was shrunk by the likelihood-ratio rule, within what that left of the two parameters' joint 3.00 nats "
    "(tuning.width_slack), with that head's covariance pinned at PINNED_HEAD_WIDTH·T (its τ in scales); "
    "in the body κ̄ = max(κ, T₁), T₁ that widest T with κ̄ = max(κ, 1), and T chosen again at "
    "or below T₁ (selection['first']), so Q is never wider than the prior and, where κ < T, equal to it in the "
    "directions the data did not see; bound: scales fitted on the Taylor bound, s by the kl-bound."
)
HEAD_REFIT_NOTE = (
    "each new head re-fitted on the trained body's features at the N(0, α⁻¹I) with the highest exact Laplace "
    "evidence (MAP re-fitted per α, α = λ·10^(k/2), k = −8…8); where no α's evidence beats the strongest α's by a "
    "Bayes factor of 3 (no evidence for any head, as at one shot per class), the strongest re-fit whose training "
    "log-likelihood stays within the joint region of the head and T (3.00 nats for one head, record['loglik_slack']) "
    "with no training example lost, its spread then pinned (width['pinned_heads']); kept as trained at "
    "the weakest edge. The mean is trained without a prior on the head, so a new head's logits are overconfident on"
    " few-shot data; benchmarks/transfer.py measures what the re-fit does."
)
STRENGTHS = ("marglik", "bound")
MEAN_PENALTIES = ("reference", "none")
MEAN_PENALTY_NOTE = (
    "mean_penalty='reference' (opt-in) trains the mean on cross-entropy + λ‖θ − θ*‖²/(2n) over the pretrained "
    "layers, the MAP of the prior's isotropic reference N(θ*, λ⁻¹I), which P dominates (P = t(βF + αλI)/τ); a new "
    "head is left to the evidence re-fit. κP itself is too stiff for a few Adam steps: with κ = 1e-2 the prior "
    "term was still 7e5 nats after 30 steps of a 1-shot resnet10t fine-tune and the head barely moved (held-out "
    "NLL 1.58, near ln 5). Not the default, because the right strength does not transfer: on the 1-shot digits "
    "transfer of benchmarks/transfer.py (5 seeds) it lowers ECE from 0.108 to 0.096 on efficientnet_gn and raises "
    "accuracy from 0.483 to 0.490 on resnet10t (λ = 7.65), but costs 4 points of 5-shot accuracy on resnet10t, "
    "and on a smaller efficientnet_gn (λ = 0.245, tests/test_transfer_defaults.py's task at 1 shot, 3 seeds) "
    "14–33 points of 1-shot accuracy."
)


def auto_width(mean: dict[str, Tensor], layers: dict[str, Layer], reference: Prior, spectra: Sequence[LayerSpectrum],
               n: int, delta: float) -> str:
    """"bound" where the Laplace Q's kl-bound at zero training error is below AUTO_BOUND (a bound can then be
    informative), else "laplace".

    KL(Q ‖ κP) is at least its mean term ½Σκ·m (the rest is a KL between zero-mean Gaussians, ≥ 0), which the
    spectra already hold; where that alone puts the kl-bound above AUTO_BOUND, as in every few-shot fine-tune, the
    exact KL (1.5 s of a 1-shot resnet10t fit) cannot change the answer and is not computed."""
    if kl_bound(0.0, 0.5 * sum(sp.mahalanobis for sp in spectra), n, delta) >= AUTO_BOUND:
        return "laplace"
    kl = Prior(mean, layers, {}).kl(reference).item()
    return "bound" if kl_bound(0.0, kl, n, delta) < AUTO_BOUND else "laplace"


def width_slack(head_record: Mapping[str, Mapping[str, Any]]) -> float:
    """The training log-likelihood Q's width T may give up: ½χ²₁(0.95) when T is the only parameter the training
    likelihood sets; where k new heads were shrunk by the likelihood-ratio rule too, what they left of the joint
    ½χ²ₖ₊₁(0.95) region (none left: T is as narrow as the grid allows)."""
    given_up = likelihood_ratio_heads(head_record)
    if not given_up:
        return TRAIN_LOGLIK_SLACK
    return max(joint_slack(len(given_up) + 1) - sum(given_up.values()), 0.0)


def likelihood_ratio_heads(head_record: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{head: training log-likelihood its shrinkage gave up} for the new heads re-fitted by the likelihood-ratio rule
    (zoo.head_evidence records that loss only for them): the one test both width_slack and the pin use."""
    return {name: float(r["loglik_given_up"]) for name, r in head_record.items() if "loglik_given_up" in r}


def _mean_penalty(prior: Prior, marglik: bool, method: str) -> Prior | ReferencePenalty | None:
    """The training penalty: the prior as given under strength='bound', else MEAN_PENALTY_NOTE's (None: no term)."""
    if not marglik:
        return prior
    if method == "none":
        return None
    lam = prior.meta.get("lambda")
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        raise ConfigError(f"this prior records no reference λ (prior_config.json 'lambda' is {lam!r}); pass "
                          "mean_penalty='none' to train the mean by likelihood alone")
    return ReferencePenalty(prior, float(lam))


NORM_STATISTICS = ("keep", "adapt")


def adapt_norm_statistics(model: nn.Module, loader: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on `loader` (a cumulative average over all its
    batches, no gradients, weights untouched); returns how many layers were adapted."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        with torch.no_grad():
            for x, _ in loader:
                if x.shape[0] < 2:
                    raise DataError("adapting BatchNorm statistics needs batches of at least 2 examples; use a "
                                    "larger batch size or norm_statistics='keep'")
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(norms)
WIDTHS = ("auto", "laplace", "bound")
AUTO_BOUND = 0.2
"""width="auto" fits the bound-based Q when even zero training error would certify below this. At 0.5 it took the
isotropic prior's 5-shot posteriors (KL under 7 nats once the head is re-fitted) to the bound-fitted width, whose
predictive fell to 0.21–0.40 accuracy on 4 of 5 seeds (benchmarks/transfer.py): a bound near 0.5 says little."""
BODY_COVARIANCE_FLOOR = 1.0
"""The first width choice's body precision is F_new + max(κ, this)·P: the evidence may weaken the prior for the mean,
not widen Q past it (BODY_FLOOR_FOLLOWS_WIDTH then lowers this to the width found)."""
BODY_FLOOR_FOLLOWS_WIDTH = True
"""Q = (F_new + κ̄P)/T is never wider than P where κ̄ ≥ T. So once T₁ is chosen with κ̄ = max(κ, 1), the body's
floor drops to max(κ, T₁) and T is chosen again at or below T₁: where κ < T the body's precision is F_new/T + P, the
training curvature tempered by T against the prior at its full, upstream-checked width, instead of (F_new + P)/T,
T times narrower than the prior in every direction the data did not see. That body spread is the part that grows
on inputs unlike the training data (benchmarks/ood_sets.py): on efficientnet_gn at 5 and 20 shots it lowered the
predictive's NLL and ECE and raised its AUROC against uniform noise (docs/method.md §6)."""


def _body_floor(kappa: dict[str, float], groups: dict[str, str], at_least: float) -> dict[str, float]:
    """κ̄ per layer: max(κ, at_least) in the pretrained body, κ in a new head."""
    return {name: (max(k, at_least) if groups[name] == "body" else k) for name, k in kappa.items()}


STRENGTH_NOTE = (
    "Q is built against κP with κ per group (pretrained body, new head) chosen on the grid by the Laplace "
    "evidence of the training data at the trained mean; the certificate is against κP and pays |grid|^groups by "
    "the union bound. The mean is trained by likelihood alone (κ → 0, from the prior mean, for the epoch budget; "
    "or against the isotropic reference, MEAN_PENALTY_NOTE): re-choosing κ during training at the current "
    "weights reinforced itself (a strong new-head κ shrinks the logits, which keeps it strong) and left the mean "
    "underfit (benchmarks/transfer.py, 5 shots, 5 seeds: held-out accuracy 0.649 against 0.842). Against the "
    "grid's weakest κ = 1e-10 instead, held-out NLL moved by ≤ 0.002 at 5 and 20 shots (0.1 at 1 shot, whose "
    "fine-tune is chaotic), and evaluating that prior term every step cost a fifth of a resnet10t fit and a third "
    "of an efficientnet_gn one."
)


def strength_groups(prior: Prior) -> dict[str, str]:
    """Layer name → group: "head" for layers with an isotropic (new-head) prior, "body" for the pretrained rest."""
    return {name: ("head" if isinstance(layer, IsoLayer) else "body") for name, layer in prior.layers.items()}


def _name(label: str) -> str:
    return "" if label == "<root>" else label


def laplace_layer_logs(spectra: Sequence[LayerSpectrum], taus: Mapping[str, float],
                       alphas: Mapping[str, float]) -> Tensor:
    """log α = log alphas[layer], log β = 0, log τ = log taus[layer]: Q = (F + ακP)/τ, spectra against κP."""
    logs = torch.zeros(len(spectra), 3, dtype=torch.float64)
    logs[:, 0] = torch.tensor([math.log(alphas[sp.name]) for sp in spectra], dtype=torch.float64)
    logs[:, 2] = torch.tensor([math.log(taus[sp.name]) for sp in spectra], dtype=torch.float64)
    return logs


PINNED_HEAD_WIDTH = WIDTH_GRID[-1]
"""Covariance multiplier of a new head whose scale the evidence could not set, on top of Q's width T."""


def unidentified_heads(head_record: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{head: precision factor 1/PINNED_HEAD_WIDTH} for each new head shrunk by the likelihood-ratio rule.

    Where the evidence cannot set a head's precision (one shot per class), the shots cannot tell its spread from
    its shrinkage either: both only temper every prediction alike (its logit variance grows with the feature norm
    alone). The shrinkage takes the joint likelihood-ratio region (zoo.head_evidence) and the head's spread is
    pinned near zero, so Q's width T is chosen on, and its epistemic spread comes from, the body, whose prior was
    checked upstream and widens most on inputs unlike the shots. Measured in benchmarks/transfer.py and
    benchmarks/suite_task.py at one shot (docs/method.md §6)."""
    return dict.fromkeys(likelihood_ratio_heads(head_record), 1.0 / PINNED_HEAD_WIDTH)


SHARPEN_NOTE = (
    "Q = (s·β F_new + α P)/τ with s picked from the grid by the kl-bound on a Monte Carlo estimate of the Gibbs "
    "training error from draws independent of the certificate's; Q may depend on the data, so this costs the "
    "certificate nothing. It corrects the Taylor fit where the Fisher underestimates the curvature (confident fits)."
)
SHARPEN_GRID = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _select_sharpen(
    model: nn.Module, prior: Prior, pieces: PosteriorFit, mean: dict[str, Tensor], loader: Iterable[Any],
    grid: Sequence[float] | None, samples: int, delta: float, generator: torch.Generator, progress: bool,
) -> tuple[float, list[dict[str, float]]]:
    """The curvature multiplier s whose Q has the lowest kl-bound on a selection estimate of its Gibbs error."""
    values = tuple(grid) if grid is not None else SHARPEN_GRID
    if len(values) == 1 or samples == 0:
        return float(values[0]), []
    rows = []
    for s in tqdm(values, desc="choosing the posterior width", unit="width", disable=not progress):
        candidate = Posterior(mean, pieces.layers(s), {}, model=model, prior=prior)
        kl = candidate.kl(prior).item()
        errors, n = candidate.gibbs_errors(loader, samples, generator)
        rows.append({"sharpen": s, "gibbs_train_error": errors / (n * samples), "kl": kl,
                     "kl_bound": kl_bound(errors / (n * samples), kl, n, delta)})
    best = min(rows, key=lambda r: (r["kl_bound"], r["kl"]))
    return best["sharpen"], rows


def fit_posterior(
    model: nn.Module, prior: Prior, blocks: Any, *, objective: str = "catoni", delta: float = 0.05
) -> PosteriorFit:
    """Per layer Q = (β F_new + α P)/τ around the model's weights, α, β, τ fitted against P on the bound."""
    pieces = posterior_pieces(model, prior, blocks)
    fit = fit_scales(pieces.spectra, n=blocks.n, nll_sum=blocks.nll_sum, objective=objective, delta=delta)
    return PosteriorFit(pieces.unit, pieces.params, pieces.spectra, fit, blocks.n, blocks.nll_sum)


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
            k = kappa.get(_name(sp.name), 1.0)
            out.append(LayerSpectrum(sp.name, sp.ratios / k, sp.mahalanobis * k))
        return out

    def layers(self, sharpen: float = 1.0) -> dict[str, Layer]:
        if self.fit is None:
            raise ConfigError("these posterior pieces have no fitted scales; call fit_posterior")
        scales = {}
        for name in self.unit:
            s = self.fit.scales[name or "<root>"]
            k = self.kappa.get(name, 1.0)
            scales[name] = (sharpen * s["beta"] / s["tau"], k * s["alpha"] / s["tau"])
        return self._layers(scales)

    def taylor_bound(self, sharpen: float, delta: float) -> dict[str, float]:
        """The paper's number for the sharpened Q: Catoni on the Taylor risk in bits, c on the grid at δ/|grid|."""
        if self.fit is None:
            raise ConfigError("these posterior pieces have no fitted scales; call fit_posterior")
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


def isotropic_prior(prior: Prior, lam: float | None = None) -> Prior:
    """The baseline N(θ*, λ⁻¹I) over the same layers and mean (λ defaults to the prior's own reference λ).

    A new head keeps its N(0, λ⁻¹I). Built as exact one-term Kronecker (I ⊗ I) and constant diagonal layers, so
    fine-tuning and certificates treat it exactly like a learned prior.
    """
    value = float(lam if lam is not None else prior.meta.get("lambda", float("nan")))
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"λ must be positive and finite, got {lam!r} (the prior records {prior.meta.get('lambda')})")
    layers: dict[str, Layer] = {}
    for name, layer in prior.layers.items():
        if isinstance(layer, KronLayer):
            out, inn = layer.precision.shape
            eye_in, eye_out = torch.eye(inn, dtype=torch.float64), torch.eye(out, dtype=torch.float64)
            layers[name] = KronLayer(KronPrecision([(eye_in, eye_out)], [value]), layer.params)
        elif isinstance(layer, DiagLayer):
            layers[name] = DiagLayer({k: torch.full_like(v.double(), value) for k, v in layer.precision.items()})
        else:
            layers[name] = IsoLayer(value, layer.params)
    meta = dict(prior.meta)
    meta.update({"lambda": value, "isotropic": True, "bound": None, "scales": {}, "scales_summary": {}})
    return Prior(prior.mean, layers, meta)


def posterior_meta(
    model: nn.Module, prior: Prior, fit: ScaleFit, *, n: int, fisher: str, approx: str, dataset: str, objective: str,
    training: dict[str, Any], seconds: float, prior_ref: str | None,
) -> dict[str, Any]:
    """The metadata of a posterior: the prior's identity, how it was fine-tuned, its scales and Taylor bound."""
    pm = prior.meta
    identity = {k: pm.get(k) for k in ("kind", "timm_name", "architecture", "model_sha256", "lambda", "objective",
                                       "format_version", "head", "isotropic")}
    identity["curvature"] = {k: (pm.get("curvature") or {}).get(k) for k in ("type", "fisher", "n", "dataset")}
    identity["ref"] = prior_ref
    return {
        "format_version": pm.get("format_version", 1),
        "kind": "posterior",
        "library": "prior-zoo",
        "library_version": __version__,
        "architecture": pm.get("architecture"),
        "timm_name": pm.get("timm_name"),
        "num_classes": getattr(model, "num_classes", pm.get("num_classes")),
        "prior": identity,
        "curvature": {"type": "kfac", "fisher": fisher, "approx": approx, "n": n, "dataset": dataset},
        "finetune": dict(training, objective=objective),
        "build_seconds": round(seconds, 3),
        "objective": fit.objective,
        "lambda": pm.get("lambda"),
        "hypotheses": 1,
        "bound": {
            "kind": f"{fit.objective} PAC-Bayes bound on the training data's Taylor-approximated NLL risk in bits, "
                    f"against the prior (the paper's approximate bound, not a certificate)"
                    + (f"; c={fit.c:.3g} chosen on catoni_grid() at δ/{len(catoni_grid())}" if fit.c else ""),
            "value": fit.bound, "delta": fit.delta, "c": fit.c, "kl": fit.kl, "emp_risk_bits": fit.emp_risk_bits,
        },
        "scales": fit.scales,
        "scales_summary": fit.summary(),
        "model_sha256": None,
        "smoke": bool(pm.get("smoke", False)),
        "base_model": pm.get("base_model"),
        "datasets": [dataset],
        "license": pm.get("license", "apache-2.0"),
    }


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _key(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local


def _labels(y: Any, device: torch.device) -> Tensor:
    t = torch.as_tensor(y)
    if t.dtype.is_floating_point or t.ndim != 1:
        raise DataError(f"labels must be a 1-D integer tensor of class indices, got {t.dtype} of shape "
                        f"{tuple(t.shape)}")
    return t.to(device)


def _scan(model: nn.Module, loader: Iterable[Any], device: torch.device) -> tuple[int, float]:
    """One pass without gradients: (N, mean NLL in nats) at the starting weights; checks labels and outputs."""
    n, nll_sum = 0, 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0].to(device), _labels(batch[1], device)
                logits = model(x)
                classes = logits.shape[-1]
                if y.numel() and (int(y.max()) >= classes or int(y.min()) < 0):
                    raise DataError(
                        f"the data has label {int(y.max())} but the model's head has {classes} outputs: the class "
                        f"counts do not match. Load with zoo.load(ref, num_classes=<number of classes in the data>)")
                nll = F.cross_entropy(logits, y, reduction="sum")
                if not torch.isfinite(nll):
                    raise NumericalError("the loss is NaN or infinite at the starting weights; check the inputs "
                                         "for NaN and that they are preprocessed with the model's transforms")
                n += int(y.shape[0])
                nll_sum += nll.item()
    except (OSError, RuntimeError) as err:
        raise DataError(f"could not read the training data ({type(err).__name__}: {err}); check the data folder "
                        "and that the images match the model's input") from err
    if n == 0:
        raise DataError("the training loader yielded no examples; point it at a non-empty data set")
    return n, nll_sum / n


def _mean_nll(model: nn.Module, loader: Iterable[Any], device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += F.cross_entropy(model(x.to(device)), _labels(y, device), reduction="sum").item()
            count += int(torch.as_tensor(y).shape[0])
    if count == 0:
        raise DataError("the validation loader yielded no examples; pass None to train without early stopping")
    return total / count


def _choose_c(risk_bits: float, half_quad: float, n: int, delta: float, current: float) -> float:
    """The grid c minimising Catoni at the current risk and KL term (δ/|grid|, as the objective uses).

    While the risk is ≥ 1 bit the bound exceeds 1 for every c and its minimiser is the smallest c, which would
    weight the KL so heavily that nothing is learned; the current c (1 at the start) is kept until then.
    """
    if risk_bits >= 1.0:
        return current
    grid = catoni_grid()
    risk = torch.tensor(risk_bits, dtype=torch.float64)
    kl = torch.tensor(half_quad, dtype=torch.float64)
    return min(grid, key=lambda c: catoni_objective(risk, kl, n, delta / len(grid), c).item())
