"""PAC-Bayes bounds: numbers to report, differentiable surrogates to train on, and Gibbs certificates.

Everything here is model-free. The float functions (``mcallester_bound``, ``catoni_bound``,
``kl_bound``, ``kl_inverse``, ``binary_kl``) take plain numbers and validate them, because a
bound computed from a NaN or a negative KL is not a bound. The ``*_objective`` functions take
tensors and keep the autograd graph, for training (docs/method.md §5). ``gibbs_certificate`` turns
a Monte Carlo count of 0-1 errors into a rigorous certificate for the stochastic classifier.

Conventions: ``n`` is the training-set size, ``kl`` is KL(Q‖P) in nats, ``delta`` is the
probability that the bound fails. Every bound is on a risk in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from zoo.errors import ConfigError, NumericalError

__all__ = [
    "CatoniChoice",
    "GibbsCertificate",
    "binary_kl",
    "catoni_bound",
    "catoni_bound_grid",
    "catoni_grid",
    "catoni_objective",
    "gibbs_certificate",
    "kl_bound",
    "kl_inverse",
    "map_objective",
    "mcallester_bound",
    "mcallester_objective",
    "sample_convergence_bound",
]


# --------------------------------------------------------------------------- validation


def _real(value: object, name: str) -> float:
    """Return ``value`` as a float, rejecting non-numbers and bools (a bool is always a bug here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    return float(value)


def _check_risk(value: object, name: str = "emp_risk") -> float:
    x = _real(value, name)
    if math.isnan(x):
        raise NumericalError(f"{name} is NaN; check the loss computation (a NaN loss has no bound).")
    if not 0.0 <= x <= 1.0:
        raise ConfigError(
            f"{name} must lie in [0, 1] (a 0-1 or bounded risk), got {x}; "
            "pass an error rate, not a count or an unbounded loss."
        )
    return x


def _check_kl(value: object) -> float:
    x = _real(value, "kl")
    if math.isnan(x) or math.isinf(x):
        raise NumericalError(f"kl must be finite, got {x}; check the prior and posterior precisions.")
    if x < 0.0:
        raise NumericalError(
            f"kl must be >= 0 (KL divergence is never negative), got {x}; a negative value means the "
            "KL computation is wrong or ill-conditioned (check the log-determinants); do not clamp it."
        )
    return x


def _check_count(value: object, name: str) -> int:
    """A positive integer count (n, samples, hypotheses); integral floats such as 100.0 are accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    x = float(value)
    if not math.isfinite(x) or not x.is_integer() or x < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(x)


def _check_delta(value: object, name: str = "delta") -> float:
    x = _real(value, name)
    if not 0.0 < x < 1.0:
        raise ConfigError(f"{name} must lie in the open interval (0, 1), e.g. 0.05; got {x}.")
    return x


def _check_c(value: object) -> float:
    x = _real(value, "c")
    if not (x > 0.0 and math.isfinite(x)):
        raise ConfigError(f"Catoni's c must be a finite number > 0, e.g. 1.0 or one from catoni_grid(); got {x}.")
    return x


def _maurer_log_term(n: int, delta: float) -> float:
    """ln(2√n/δ): Maurer's ξ(n) ≤ 2√n, which holds for every n ≥ 1 (tests check n ≤ 200 exactly)."""
    return math.log(2.0) + 0.5 * math.log(n) - math.log(delta)


# --------------------------------------------------------------------------- binary kl


def binary_kl(q: float, p: float) -> float:
    """kl(q‖p) between Bernoulli(q) and Bernoulli(p), in nats, with 0·ln 0 = 0 (inf where p excludes q)."""
    q = _check_risk(q, "q")
    p = _check_risk(p, "p")
    return _binary_kl(q, p)


def _log1pmx(x: float) -> float:
    """log(1 + x) − x without cancellation: the alternating series for |x| < 0.1, else directly."""
    if abs(x) >= 0.1:
        return math.log1p(x) - x
    total, power, k = 0.0, x * x, 2
    while True:  # |x|^k / k falls below 1e-17 of the first term within ~17 terms
        term = power / k if k % 2 == 0 else -power / k
        total -= term
        if abs(term) <= 1e-18 * abs(total):
            return total
        power *= x
        k += 1


def _binary_kl(q: float, p: float) -> float:
    d = p - q
    if 0.0 < p < 1.0 and abs(d) <= 0.5 * min(p, 1.0 - p):
        # Near p = q, kl ≈ d²/(2p(1−p)) is far below the size of its two terms, whose rounding
        # would dominate it (and make kl_inverse wobble at the last bits). Splitting off the
        # linear parts exactly, with d exact by Sterbenz's lemma, leaves only small terms:
        # kl = d²/(p(1−p)) + q·φ(−d/p) + (1−q)·φ(d/(1−p)), with φ(x) = log(1+x) − x.
        return max(d * d / (p * (1.0 - p)) + q * _log1pmx(-d / p) + (1.0 - q) * _log1pmx(d / (1.0 - p)), 0.0)
    # Otherwise term by term: a log ratio near 1 goes through log1p of the exact difference d,
    # one far from 1 (where -d/p could round to -1) through plain logarithms.
    out = 0.0
    if q > 0.0:
        if p == 0.0:
            return math.inf
        out += q * (math.log1p(-d / p) if abs(d) <= 0.5 * p else math.log(q / p))
    if q < 1.0:
        if p == 1.0:
            return math.inf
        tail = 1.0 - p
        out += (1.0 - q) * (math.log1p(d / tail) if abs(d) <= 0.5 * tail else math.log1p(-q) - math.log1p(-p))
    # kl ≥ 0; rounding can leave a tiny negative where the terms nearly cancel, not a real value.
    return max(out, 0.0)


def kl_inverse(q: float, c: float) -> float:
    """Largest p in [q, 1] with kl(q‖p) ≤ c, by bisection to full double precision.

    This is the upper inverse that turns the Seeger/Maurer kl-bound into a number. It is exact
    at the edges: q = 1 or c = inf give 1, c = 0 gives q, and q = 0 uses the closed form
    1 − e^{−c}. Elsewhere bisection on p ∈ [q, 1] (kl(q‖·) is increasing there) runs until the
    interval cannot be halved any further, and returns the upper end, so rounding errs on the
    safe (larger) side.
    """
    q = _check_risk(q, "q")
    c = _real(c, "c")
    if math.isnan(c) or c < 0.0:
        raise NumericalError(f"kl_inverse needs c >= 0 (a KL budget), got {c}; check the bound's complexity term.")
    if q == 1.0 or c == math.inf:
        return 1.0
    if c == 0.0:
        return q
    if q == 0.0:
        return -math.expm1(-c)
    lo, hi = q, 1.0
    for _ in range(2200):  # at most ~1100 halvings reach adjacent doubles; the guard never binds
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if _binary_kl(q, mid) > c:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- float bounds


def mcallester_bound(emp_risk: float, kl: float, n: int, delta: float) -> float:
    """McAllester's bound with Maurer's constant: L̂ + sqrt((KL + ln(2√n/δ)) / (2n)). May exceed 1."""
    emp = _check_risk(emp_risk)
    kl_ = _check_kl(kl)
    n_ = _check_count(n, "n")
    d = _check_delta(delta)
    return emp + math.sqrt((kl_ + _maurer_log_term(n_, d)) / (2.0 * n_))


def catoni_bound(emp_risk: float, kl: float, n: int, delta: float, c: float) -> float:
    """Catoni's bound for one fixed c > 0: [1 − exp(−c·L̂ − (KL + ln(1/δ))/n)] / (1 − e^{−c}).

    c must be chosen before seeing the data; to optimise it, use ``catoni_bound_grid``, which
    pays the union bound.
    """
    emp = _check_risk(emp_risk)
    kl_ = _check_kl(kl)
    n_ = _check_count(n, "n")
    d = _check_delta(delta)
    c_ = _check_c(c)
    exponent = c_ * emp + (kl_ - math.log(d)) / n_
    return -math.expm1(-exponent) / -math.expm1(-c_)


def kl_bound(emp_risk: float, kl: float, n: int, delta: float) -> float:
    """Seeger/Maurer kl-bound, the tightest of the three: kl⁻¹(L̂, (KL + ln(2√n/δ)) / n)."""
    emp = _check_risk(emp_risk)
    kl_ = _check_kl(kl)
    n_ = _check_count(n, "n")
    d = _check_delta(delta)
    return kl_inverse(emp, (kl_ + _maurer_log_term(n_, d)) / n_)


# --------------------------------------------------------------------------- Catoni grid


def catoni_grid(low: float = 0.01, high: float = 100.0, size: int = 25) -> tuple[float, ...]:
    """A geometric grid of Catoni c values, low·r^k for k = 0..size−1 with r = (high/low)^(1/(size−1)).

    The default, 25 points from 0.01 to 100 (ratio ≈ 1.47 between neighbours), covers small and
    large empirical risks: the bound is flat near its optimum in c, so a coarse grid loses
    little, while the union bound costs only ln(25) ≈ 3.2 nats. Fix the grid before training.
    """
    lo = _check_c(low)
    hi = _check_c(high)
    k = _check_count(size, "size")
    if hi < lo:
        raise ConfigError(f"catoni_grid needs low <= high, got low={lo}, high={hi}.")
    if k == 1:
        return (lo,)
    ratio = math.log(hi / lo) / (k - 1)
    return tuple(lo * math.exp(ratio * i) for i in range(k))


class CatoniChoice(NamedTuple):
    """The Catoni bound optimised over a grid: the bound (already paying the union bound) and its c."""

    bound: float
    c: float


def catoni_bound_grid(
    emp_risk: float, kl: float, n: int, delta: float, *, grid: tuple[float, ...] | None = None
) -> CatoniChoice:
    """Catoni's bound minimised over a finite grid of c, each c at δ/|grid| (union bound), so it holds at δ.

    ``grid`` defaults to ``catoni_grid()``. The result is valid with probability ≥ 1 − δ even
    though c was picked after looking at the data, and it is never below the single-c optimum
    at δ, which would not be a valid bound.
    """
    cs = catoni_grid() if grid is None else tuple(grid)
    if not cs:
        raise ConfigError("catoni_bound_grid needs a non-empty grid of c values; use catoni_grid().")
    d = _check_delta(delta)
    per_c = d / len(cs)
    best = min((catoni_bound(emp_risk, kl, n, per_c, c), float(c)) for c in cs)
    return CatoniChoice(bound=best[0], c=best[1])


# --------------------------------------------------------------------------- differentiable objectives


def _as_tensor(value: torch.Tensor | float, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def _check_objective_inputs(emp_risk: torch.Tensor, kl: torch.Tensor) -> None:
    """Raise on NaN, infinite or negative inputs; a training step on them would silently go wrong."""
    with torch.no_grad():
        if not bool(torch.isfinite(emp_risk).all()):
            raise NumericalError(
                "The empirical risk is NaN or infinite; lower the learning rate or check the data "
                "(a NaN loss cannot be trained on)."
            )
        if bool((emp_risk < 0).any()):
            raise NumericalError(
                "The empirical risk is negative; pass a mean NLL or an error rate (>= 0), not a log-likelihood."
            )
        if not bool(torch.isfinite(kl).all()):
            raise NumericalError("The KL term is NaN or infinite; check the prior precision and the weights.")
        if bool((kl < 0).any()):
            raise NumericalError(
                "The KL term is negative; KL(Q‖P) >= 0, so the KL computation is wrong (do not clamp it)."
            )


def mcallester_objective(
    emp_risk: torch.Tensor | float, kl: torch.Tensor | float, n: int, delta: float
) -> torch.Tensor:
    """Differentiable McAllester surrogate: emp_risk + sqrt((kl + ln(2√n/δ)) / (2n)), as a tensor.

    ``emp_risk`` is the surrogate empirical risk (the paper uses the mean NLL in bits, plus its
    Taylor correction) and ``kl`` the KL tensor, or just its weight-dependent quadratic term:
    constants shift the value but not the minimiser's direction. ``n`` is the data-set size,
    never the batch size.
    """
    kl_t = _as_tensor(kl, emp_risk if isinstance(emp_risk, torch.Tensor) else None)
    emp_t = _as_tensor(emp_risk, kl_t)
    _check_objective_inputs(emp_t, kl_t)
    n_ = _check_count(n, "n")
    d = _check_delta(delta)
    return emp_t + torch.sqrt((kl_t + _maurer_log_term(n_, d)) / (2.0 * n_))


def catoni_objective(
    emp_risk: torch.Tensor | float, kl: torch.Tensor | float, n: int, delta: float, c: float
) -> torch.Tensor:
    """Differentiable Catoni surrogate: [1 − exp(−c·emp − (kl + ln(1/δ))/n)] / (1 − e^{−c}), as a tensor.

    Pass ``delta / len(grid)`` when c comes from a grid, so the trained objective matches the
    bound that will be reported. Written with expm1 so small exponents keep their precision.
    """
    kl_t = _as_tensor(kl, emp_risk if isinstance(emp_risk, torch.Tensor) else None)
    emp_t = _as_tensor(emp_risk, kl_t)
    _check_objective_inputs(emp_t, kl_t)
    n_ = _check_count(n, "n")
    d = _check_delta(delta)
    c_ = _check_c(c)
    exponent = c_ * emp_t + (kl_t - math.log(d)) / n_
    return -torch.expm1(-exponent) / -math.expm1(-c_)


def map_objective(nll: torch.Tensor, penalty: torch.Tensor, n: int) -> torch.Tensor:
    """MAP objective: mean NLL + penalty / n, with penalty = ½ (θ−μ_P)ᵀ Λ_P (θ−μ_P).

    n is the data-set size, so the prior enters once per data set. (The official code scales
    this term by the batch size instead, which over-weights the prior; we do not.)
    """
    _check_objective_inputs(nll, penalty)
    n_ = _check_count(n, "n")
    return nll + penalty / n_


# --------------------------------------------------------------------------- Gibbs certificate


def sample_convergence_bound(emp_risk: float, samples: int, delta_sample: float) -> float:
    """Upper bound on the Gibbs empirical risk from m weight draws: kl⁻¹(L̂_m, ln(2/δ')/m).

    Langford & Caruana (2001), as used by Dziugaite & Roy (2017) and Pérez-Ortiz et al. (2021).
    Here m = ``samples`` counts independent weight draws θ_1..θ_m ~ Q, and L̂_m is the mean over
    draws of each draw's error rate on the whole training set. Conditioned on the training set,
    the per-draw error rates are m i.i.d. variables in [0, 1] with mean L̂(Q), so the Chernoff
    kl-inequality applies with m, not n·m: the n points are fixed, only the weights are random.
    Holds with probability ≥ 1 − δ' over the weight draws.
    """
    emp = _check_risk(emp_risk)
    m = _check_count(samples, "samples")
    d = _check_delta(delta_sample, "delta_sample")
    return kl_inverse(emp, math.log(2.0 / d) / m)


@dataclass(frozen=True)
class GibbsCertificate:
    """A rigorous upper bound on the expected 0-1 risk of the Gibbs (stochastic) classifier Q.

    Fields:
        bound: the certificate: with probability ≥ 1 − delta − delta_sample, the 0-1 risk of a
            prediction made by a fresh weight draw θ ~ Q, on a fresh example, is at most this.
        kind: a human-readable label saying what ``bound`` bounds and how it was obtained.
        delta: the PAC-Bayes failure probability, in total over all ``hypotheses`` (each gets
            delta / hypotheses).
        delta_sample: the failure probability δ' of the Monte Carlo (sample-convergence) step.
        empirical_risk: L̂_m, the Gibbs 0-1 training risk estimated from ``samples`` weight draws
            (errors / (n · samples)).
        empirical_risk_upper: kl⁻¹(L̂_m, ln(2/δ')/m), an upper bound on the exact Gibbs training
            risk L̂(Q), the value plugged into the kl-bound.
        kl: KL(Q‖P) in nats.
        n: the number of training points.
        samples: m, the number of independent weight draws (each evaluated on all n points).
        hypotheses: the union-bound size, i.e. the number of (prior, hyperparameter) settings
            searched; 1 when nothing was searched.
        taylor_bound: the paper's number, the bound with a Taylor-approximated empirical risk,
            reported beside the certificate and not itself rigorous; None until the caller sets it
            with ``with_taylor_bound``.
    """

    bound: float
    kind: str
    delta: float
    delta_sample: float
    empirical_risk: float
    empirical_risk_upper: float
    kl: float
    n: int
    samples: int
    hypotheses: int
    taylor_bound: float | None = None

    @property
    def confidence(self) -> float:
        """The probability, 1 − delta − delta_sample, with which ``bound`` holds."""
        return 1.0 - self.delta - self.delta_sample

    def with_taylor_bound(self, value: float) -> GibbsCertificate:
        """Return a copy carrying the paper's Taylor-risk bound beside the rigorous one."""
        return dataclasses.replace(self, taylor_bound=_real(value, "taylor_bound"))

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain fields plus the confidence, for JSON and for printing."""
        out: dict[str, float | int | str | None] = dataclasses.asdict(self)
        out["confidence"] = self.confidence
        return out


def gibbs_certificate(
    errors: int,
    *,
    n: int,
    samples: int,
    kl: float,
    delta: float = 0.05,
    delta_sample: float = 0.01,
    hypotheses: int = 1,
) -> GibbsCertificate:
    """Rigorous Gibbs 0-1 certificate from ``errors`` mistakes made by ``samples`` weight draws on n points.

    Steps (docs/method.md §5, "Certificates"):

    1. L̂_m = errors / (n · m): each of m i.i.d. draws θ_j ~ Q is evaluated on all n training
       points, and ``errors`` is the total number of misclassifications over the n·m evaluations.
    2. Sample convergence (Langford & Caruana 2001): L̂(Q) ≤ kl⁻¹(L̂_m, ln(2/δ')/m) with
       probability ≥ 1 − δ' over the draws. The draws must be made after Q was chosen, and
       only this one Q's estimate may be used; estimating several and keeping the best would
       need δ' split too.
    3. kl-bound (Seeger/Maurer) with that upper value: L(Q) ≤ kl⁻¹(L̂⁺, (KL + ln(2√n·H/δ))/n),
       i.e. at δ/H, which pays a union bound over the H = ``hypotheses`` settings searched.

    The result holds with probability ≥ 1 − δ − δ' (the two failures are combined by a union
    bound), and the kl-bound is monotone in its first argument, so the composition is valid.
    """
    n_ = _check_count(n, "n")
    m = _check_count(samples, "samples")
    h = _check_count(hypotheses, "hypotheses")
    d = _check_delta(delta)
    ds = _check_delta(delta_sample, "delta_sample")
    if d + ds >= 1.0:
        raise ConfigError(f"delta + delta_sample must be < 1 for a meaningful certificate, got {d} + {ds}.")
    if isinstance(errors, bool) or not isinstance(errors, numbers.Integral):
        raise ConfigError(f"errors must be an integer count of misclassifications, got {errors!r}.")
    total = n_ * m
    if not 0 <= int(errors) <= total:
        raise ConfigError(
            f"errors must lie in [0, n·samples] = [0, {total}] (one 0/1 outcome per point per draw), "
            f"got {errors}; pass the total count over all draws."
        )
    kl_ = _check_kl(kl)
    emp = int(errors) / total
    upper = sample_convergence_bound(emp, m, ds)
    bound = kl_bound(upper, kl_, n_, d / h)
    kind = (
        f"Gibbs 0-1 risk of the stochastic classifier: kl-bound (Seeger/Maurer) at δ={d:g}"
        f"{f' split over {h} searched settings' if h > 1 else ''}, on a sample-convergence bound "
        f"(Langford & Caruana) from {m} weight draws at δ'={ds:g}; holds with probability ≥ {1 - d - ds:g}"
    )
    return GibbsCertificate(
        bound=bound,
        kind=kind,
        delta=d,
        delta_sample=ds,
        empirical_risk=emp,
        empirical_risk_upper=upper,
        kl=kl_,
        n=n_,
        samples=m,
        hypotheses=h,
    )
