"""Tests for zoo.pacbayes: bounds against slow independent references, kl⁻¹ edge cases, gradients, certificates."""

from __future__ import annotations

import dataclasses
import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, minimize_scalar

from zoo.errors import ConfigError, NumericalError, ZooError
from zoo.pacbayes import (
    CatoniChoice,
    GibbsCertificate,
    binary_kl,
    catoni_bound,
    catoni_bound_grid,
    catoni_grid,
    catoni_objective,
    gibbs_certificate,
    kl_bound,
    kl_inverse,
    map_objective,
    mcallester_bound,
    mcallester_objective,
    sample_convergence_bound,
)

# --------------------------------------------------------------------------- references


def mp_kl(q: mpmath.mpf, p: mpmath.mpf) -> mpmath.mpf:
    """kl(q‖p) at 60 digits, written directly from the definition."""
    out = mpmath.mpf(0)
    if q > 0:
        if p == 0:
            return mpmath.inf
        out += q * mpmath.log(q / p)
    if q < 1:
        if p == 1:
            return mpmath.inf
        out += (1 - q) * mpmath.log((1 - q) / (1 - p))
    return out


def mp_kl_inverse(q: float, c: float) -> float:
    """The bisection reference at 60 significant digits, 220 halvings (interval below 1e-66)."""
    with mpmath.workdps(60):
        qm, cm = mpmath.mpf(q), mpmath.mpf(c)
        lo, hi = qm, mpmath.mpf(1)
        for _ in range(220):
            mid = (lo + hi) / 2
            if mp_kl(qm, mid) > cm:
                hi = mid
            else:
                lo = mid
        return float(lo)


def maurer_xi(n: int) -> float:
    """ξ(n) = Σ_k C(n,k) (k/n)^k (1−k/n)^(n−k), the constant that 2√n upper-bounds in ln(2√n/δ)."""
    return sum(math.comb(n, k) * (k / n) ** k * (1 - k / n) ** (n - k) for k in range(n + 1))


# --------------------------------------------------------------------------- binary kl


def test_binary_kl_known_values() -> None:
    assert binary_kl(0.5, 0.5) == 0.0
    assert binary_kl(0.0, 0.0) == 0.0
    assert binary_kl(1.0, 1.0) == 0.0
    assert binary_kl(0.0, 0.3) == pytest.approx(-math.log(0.7), rel=1e-15)
    assert binary_kl(1.0, 0.3) == pytest.approx(-math.log(0.3), rel=1e-15)
    assert binary_kl(0.5, 0.25) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-14)
    assert binary_kl(0.2, 0.0) == math.inf
    assert binary_kl(0.2, 1.0) == math.inf


@pytest.mark.parametrize("q", [0.0, 1e-9, 0.01, 0.3, 0.5, 0.77, 1 - 1e-9, 1.0])
@pytest.mark.parametrize("p", [1e-12, 0.01, 0.3, 0.5, 0.9, 1 - 1e-12])
def test_binary_kl_matches_mpmath(q: float, p: float) -> None:
    with mpmath.workdps(60):
        ref = float(mp_kl(mpmath.mpf(q), mpmath.mpf(p)))
    assert binary_kl(q, p) == pytest.approx(ref, rel=1e-12, abs=1e-300)


# --------------------------------------------------------------------------- kl inverse


@pytest.mark.parametrize("q", [0.0, 1e-12, 1e-6, 0.003, 0.05, 0.2, 0.5, 0.8, 0.999, 1 - 1e-10, 1.0])
@pytest.mark.parametrize("c", [0.0, 1e-20, 1e-9, 1e-4, 0.01, 0.1, 1.0, 5.0, 30.0])
def test_kl_inverse_matches_bisection_reference(q: float, c: float) -> None:
    assert abs(kl_inverse(q, c) - mp_kl_inverse(q, c)) <= 1e-12


@pytest.mark.parametrize(("q", "c"), [(0.01, 0.001), (0.2, 0.05), (0.5, 0.3), (0.9, 0.01)])
def test_kl_inverse_matches_brentq(q: float, c: float) -> None:
    ref = brentq(lambda p: binary_kl(q, p) - c, q, 1 - 1e-15, xtol=1e-15, rtol=1e-15)
    assert kl_inverse(q, c) == pytest.approx(ref, abs=1e-12)


def test_kl_inverse_edges() -> None:
    assert kl_inverse(0.0, 0.0) == 0.0
    assert kl_inverse(0.37, 0.0) == 0.37
    assert kl_inverse(1.0, 0.0) == 1.0
    assert kl_inverse(1.0, 3.0) == 1.0
    for c in [1e-300, 1e-10, 0.5, 2.0, 40.0]:
        assert kl_inverse(0.0, c) == pytest.approx(-math.expm1(-c), rel=1e-15)
    for q in [0.0, 0.1, 0.9, 1 - 1e-12]:
        for c in [50.0, 1e6, 1e300, math.inf]:
            p = kl_inverse(q, c)
            assert q <= p <= 1.0
            assert p == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(q=st.floats(0.0, 1.0), c=st.floats(0.0, 50.0))
def test_kl_inverse_is_the_largest_feasible_p(q: float, c: float) -> None:
    p = kl_inverse(q, c)
    assert q <= p <= 1.0
    assert abs(p - mp_kl_inverse(q, c)) <= 1e-9
    # Feasible up to one ulp of p, and anything visibly larger is infeasible.
    assert binary_kl(q, max(q, p - 2 * math.ulp(p))) <= c * (1 + 1e-9) + 1e-300
    if p < 1.0 - 1e-9:
        assert binary_kl(q, min(1.0, p + 1e-9)) > c


@settings(max_examples=200, deadline=None)
@given(q1=st.floats(0.0, 1.0), q2=st.floats(0.0, 1.0), c1=st.floats(0.0, 100.0), c2=st.floats(0.0, 100.0))
def test_kl_inverse_is_monotone(q1: float, q2: float, c1: float, c2: float) -> None:
    (qa, qb), (ca, cb) = sorted((q1, q2)), sorted((c1, c2))
    assert kl_inverse(qa, ca) <= kl_inverse(qb, ca) + 1e-15
    assert kl_inverse(qa, ca) <= kl_inverse(qa, cb) + 1e-15
    assert kl_inverse(qa, ca) <= kl_inverse(qb, cb) + 1e-15


# --------------------------------------------------------------------------- the three bounds


def test_maurer_constant_holds_for_small_n() -> None:
    """ln(2√n/δ) is valid only if ξ(n) ≤ 2√n; Maurer proves it for n ≥ 8, this checks the rest."""
    for n in range(1, 201):
        assert maurer_xi(n) <= 2 * math.sqrt(n) + 1e-12


def test_mcallester_known_value() -> None:
    emp, kl, n, delta = 0.1, 5.0, 1000, 0.05
    expected = 0.1 + math.sqrt((5.0 + math.log(2 * math.sqrt(1000) / 0.05)) / 2000)
    assert mcallester_bound(emp, kl, n, delta) == pytest.approx(expected, rel=1e-15)
    # hand-computed: ln(2·√1000/0.05) = ln(1264.9111) = 7.142757...; sqrt(12.142757/2000) = 0.0779191...
    assert mcallester_bound(emp, kl, n, delta) == pytest.approx(0.1779191, abs=1e-7)


def test_catoni_known_value() -> None:
    emp, kl, n, delta, c = 0.1, 5.0, 1000, 0.05, 1.0
    expected = (1 - math.exp(-0.1 - (5.0 + math.log(20.0)) / 1000)) / (1 - math.exp(-1.0))
    assert catoni_bound(emp, kl, n, delta, c) == pytest.approx(expected, rel=1e-14)


def test_kl_bound_matches_reference_inversion() -> None:
    for emp, kl, n, delta in [(0.0, 0.0, 10, 0.05), (0.1, 5.0, 1000, 0.05), (0.4, 300.0, 5000, 0.01)]:
        budget = (kl + math.log(2 * math.sqrt(n) / delta)) / n
        assert kl_bound(emp, kl, n, delta) == pytest.approx(mp_kl_inverse(emp, budget), abs=1e-12)


def test_kl_bound_is_tighter_than_mcallester_pinsker() -> None:
    for emp in np.linspace(0.0, 1.0, 11):
        for kl in [0.0, 1.0, 50.0, 1e4]:
            for n in [1, 30, 1000, 10**6]:
                for delta in [0.001, 0.05, 0.5]:
                    args = (float(emp), kl, n, delta)
                    assert kl_bound(*args) <= mcallester_bound(*args) + 1e-12
                    assert kl_bound(*args) >= emp


def test_catoni_is_at_least_the_empirical_risk() -> None:
    for emp in np.linspace(0.0, 1.0, 6):
        for c in catoni_grid():
            assert catoni_bound(float(emp), 2.0, 500, 0.05, c) >= emp - 1e-15


def test_bounds_shrink_with_n_and_grow_with_kl_and_confidence() -> None:
    for fn in (mcallester_bound, kl_bound):
        assert fn(0.1, 5.0, 10_000, 0.05) < fn(0.1, 5.0, 1000, 0.05)
        assert fn(0.1, 50.0, 1000, 0.05) > fn(0.1, 5.0, 1000, 0.05)
        assert fn(0.1, 5.0, 1000, 0.001) > fn(0.1, 5.0, 1000, 0.05)


# --------------------------------------------------------------------------- Catoni grid


def test_catoni_grid_is_geometric() -> None:
    grid = catoni_grid(0.01, 100.0, 25)
    assert len(grid) == 25
    assert grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(100.0)
    ratios = np.diff(np.log(grid))
    assert np.allclose(ratios, ratios[0])
    assert catoni_grid(2.0, 2.0, 1) == (2.0,)


@pytest.mark.parametrize(("emp", "kl", "n"), [(0.0, 1.0, 100), (0.05, 10.0, 1000), (0.3, 200.0, 5000)])
def test_catoni_grid_pays_the_union_bound(emp: float, kl: float, n: int) -> None:
    delta = 0.05
    grid = catoni_grid()
    choice = catoni_bound_grid(emp, kl, n, delta)
    assert isinstance(choice, CatoniChoice)
    assert choice.c in grid
    per_c = [catoni_bound(emp, kl, n, delta / len(grid), c) for c in grid]
    assert choice.bound == min(per_c)
    # The continuous single-c optimum at the full δ is not a valid bound after choosing c: ours is above it.
    res = minimize_scalar(
        lambda logc: catoni_bound(emp, kl, n, delta, math.exp(logc)),
        bounds=(math.log(1e-4), math.log(1e4)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    fine = min(catoni_bound(emp, kl, n, delta, c) for c in np.geomspace(1e-4, 1e4, 20001))
    assert choice.bound >= min(res.fun, fine) - 1e-15


def test_catoni_grid_rejects_an_empty_grid() -> None:
    with pytest.raises(ConfigError):
        catoni_bound_grid(0.1, 1.0, 100, 0.05, grid=())


# --------------------------------------------------------------------------- differentiable objectives


def test_objectives_match_the_float_bounds() -> None:
    emp, kl, n, delta, c = 0.12, 7.5, 800, 0.05, 2.0
    e, k = torch.tensor(emp, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64)
    assert mcallester_objective(e, k, n, delta).item() == pytest.approx(mcallester_bound(emp, kl, n, delta))
    assert catoni_objective(e, k, n, delta, c).item() == pytest.approx(catoni_bound(emp, kl, n, delta, c))
    assert map_objective(e, k, n).item() == pytest.approx(emp + kl / n)


def test_objective_gradients_match_finite_differences() -> None:
    emp = torch.tensor([0.7, 2.5], dtype=torch.float64, requires_grad=True)  # NLL in bits may exceed 1
    kl = torch.tensor([3.0, 40.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, k: mcallester_objective(e, k, 500, 0.05), (emp, kl))
    assert torch.autograd.gradcheck(lambda e, k: catoni_objective(e, k, 500, 0.05, 1.5), (emp, kl))
    assert torch.autograd.gradcheck(lambda e, k: map_objective(e, k, 500), (emp, kl))


def test_objective_gradient_wrt_weights_of_a_tiny_model() -> None:
    """Mean NLL in bits plus the quadratic KL term, through a linear classifier, as finetune uses it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    prec = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5  # diagonal Λ_P
    n = 100

    def objective(w: torch.Tensor, which: str) -> torch.Tensor:
        nll_bits = torch.nn.functional.cross_entropy(x @ w, y) / math.log(2)
        quad = 0.5 * (prec * (w - mu) ** 2).sum()
        if which == "mcallester":
            return mcallester_objective(nll_bits, quad, n, 0.05)
        if which == "catoni":
            return catoni_objective(nll_bits, quad, n, 0.05 / 25, 3.0)
        return map_objective(nll_bits * math.log(2), quad, n)

    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    for which in ("mcallester", "catoni", "map"):
        assert torch.autograd.gradcheck(lambda w, which=which: objective(w, which), (w0,))


def test_objectives_accept_float32_and_python_numbers() -> None:
    out = catoni_objective(torch.tensor(0.3), 5.0, 100, 0.05, 1.0)
    assert out.dtype == torch.float32
    assert mcallester_objective(0.3, torch.tensor(5.0, dtype=torch.float64), 100, 0.05).dtype == torch.float64


@pytest.mark.parametrize("fn", [mcallester_objective, catoni_objective, map_objective])
@pytest.mark.parametrize(("emp", "kl"), [(float("nan"), 1.0), (0.1, float("nan")), (0.1, -1e-6), (-0.1, 1.0)])
def test_objectives_raise_on_bad_tensors(fn, emp: float, kl: float) -> None:  # type: ignore[no-untyped-def]
    args: tuple[object, ...] = (torch.tensor(emp), torch.tensor(kl), 100)
    if fn is not map_objective:
        args = (*args, 0.05)
    if fn is catoni_objective:
        args = (*args, 1.0)
    with pytest.raises(NumericalError):
        fn(*args)


# --------------------------------------------------------------------------- Gibbs certificate


def test_sample_convergence_bound_formula() -> None:
    assert sample_convergence_bound(0.1, 1000, 0.01) == pytest.approx(
        mp_kl_inverse(0.1, math.log(200) / 1000), abs=1e-12
    )


def test_sample_convergence_bound_covers_the_truth() -> None:
    """Simulated draws: each draw's error rate on n points; the bound covers the Gibbs mean ≥ 1 − δ' often."""
    rng = np.random.default_rng(0)
    n, m, delta_s, trials = 50, 20, 0.1, 2000
    # A posterior whose draws have different error rates (uniform on [0.1, 0.5]) around a known mean.
    per_point = rng.uniform(0.1, 0.5, size=n)  # P(draw errs on point i)
    truth = per_point.mean()  # the exact Gibbs training risk L̂(Q)
    misses = 0
    for _ in range(trials):
        errors = (rng.random((m, n)) < per_point).sum()
        if sample_convergence_bound(errors / (n * m), m, delta_s) < truth:
            misses += 1
    assert misses / trials <= delta_s


def test_gibbs_certificate_composes_the_steps() -> None:
    n, m, kl, delta, ds, h = 500, 40, 12.0, 0.05, 0.01, 6
    errors = 1234
    cert = gibbs_certificate(errors, n=n, samples=m, kl=kl, delta=delta, delta_sample=ds, hypotheses=h)
    emp = errors / (n * m)
    upper = mp_kl_inverse(emp, math.log(2 / ds) / m)
    expected = mp_kl_inverse(upper, (kl + math.log(2 * math.sqrt(n) * h / delta)) / n)
    assert cert.empirical_risk == emp
    assert cert.empirical_risk_upper == pytest.approx(upper, abs=1e-12)
    assert cert.bound == pytest.approx(expected, abs=1e-10)
    assert cert.bound >= cert.empirical_risk_upper >= cert.empirical_risk
    assert (cert.delta, cert.delta_sample, cert.kl, cert.n, cert.samples, cert.hypotheses) == (
        delta,
        ds,
        kl,
        n,
        m,
        h,
    )
    assert cert.confidence == pytest.approx(0.94)
    assert "Gibbs" in cert.kind and "6 searched" in cert.kind
    assert cert.taylor_bound is None
    with_t = cert.with_taylor_bound(0.2)
    assert with_t.taylor_bound == 0.2 and with_t.bound == cert.bound
    assert with_t.to_dict()["taylor_bound"] == 0.2 and with_t.to_dict()["confidence"] == cert.confidence
    with pytest.raises(dataclasses.FrozenInstanceError):
        cert.bound = 0.0  # type: ignore[misc]
    assert isinstance(cert, GibbsCertificate)


def test_gibbs_certificate_monotonicity() -> None:
    n, rate = 200, 0.1

    def bound(m: int = 50, kl: float = 10.0, h: int = 1) -> float:
        return gibbs_certificate(int(rate * n * m), n=n, samples=m, kl=kl, hypotheses=h).bound

    by_samples = [bound(m=m) for m in (5, 20, 100, 1000, 10000)]
    assert all(a > b for a, b in itertools.pairwise(by_samples))
    by_kl = [bound(kl=kl) for kl in (0.0, 1.0, 10.0, 100.0)]
    assert all(a < b for a, b in itertools.pairwise(by_kl))
    by_h = [bound(h=h) for h in (1, 10, 100)]
    assert all(a < b for a, b in itertools.pairwise(by_h))
    # Never below the (non-rigorous) kl-bound that would trust the Monte Carlo estimate as exact.
    assert bound() > kl_bound(rate, 10.0, n, 0.05)


def test_gibbs_certificate_edges() -> None:
    zero = gibbs_certificate(0, n=100, samples=10, kl=0.0)
    assert 0.0 < zero.bound < 1.0
    full = gibbs_certificate(1000, n=100, samples=10, kl=0.0)
    assert full.bound == 1.0


# --------------------------------------------------------------------------- invalid input


BAD_CALLS = [
    (mcallester_bound, (1.5, 1.0, 100, 0.05), ConfigError),
    (mcallester_bound, (-0.1, 1.0, 100, 0.05), ConfigError),
    (mcallester_bound, (float("nan"), 1.0, 100, 0.05), NumericalError),
    (mcallester_bound, (0.1, -1.0, 100, 0.05), NumericalError),
    (mcallester_bound, (0.1, float("nan"), 100, 0.05), NumericalError),
    (mcallester_bound, (0.1, float("inf"), 100, 0.05), NumericalError),
    (mcallester_bound, (0.1, 1.0, 0, 0.05), ConfigError),
    (mcallester_bound, (0.1, 1.0, 10.5, 0.05), ConfigError),
    (mcallester_bound, (0.1, 1.0, True, 0.05), ConfigError),
    (mcallester_bound, (0.1, 1.0, 100, 0.0), ConfigError),
    (mcallester_bound, (0.1, 1.0, 100, 1.0), ConfigError),
    (mcallester_bound, (0.1, 1.0, 100, float("nan")), ConfigError),
    (kl_bound, (1.01, 1.0, 100, 0.05), ConfigError),
    (kl_bound, (0.1, -1e-9, 100, 0.05), NumericalError),
    (kl_bound, (0.1, 1.0, -3, 0.05), ConfigError),
    (kl_bound, (0.1, 1.0, 100, 1.5), ConfigError),
    (kl_bound, ("0.1", 1.0, 100, 0.05), ConfigError),
    (catoni_bound, (0.1, 1.0, 100, 0.05, 0.0), ConfigError),
    (catoni_bound, (0.1, 1.0, 100, 0.05, -1.0), ConfigError),
    (catoni_bound, (0.1, 1.0, 100, 0.05, float("inf")), ConfigError),
    (catoni_bound, (0.1, -2.0, 100, 0.05, 1.0), NumericalError),
    (catoni_bound, (2.0, 1.0, 100, 0.05, 1.0), ConfigError),
    (catoni_bound_grid, (0.1, 1.0, 100, 0.0), ConfigError),
    (catoni_grid, (0.0, 1.0, 5), ConfigError),
    (catoni_grid, (1.0, 0.5, 5), ConfigError),
    (catoni_grid, (0.1, 1.0, 0), ConfigError),
    (kl_inverse, (-0.1, 1.0), ConfigError),
    (kl_inverse, (1.1, 1.0), ConfigError),
    (kl_inverse, (0.1, -1.0), NumericalError),
    (kl_inverse, (0.1, float("nan")), NumericalError),
    (binary_kl, (0.1, 1.2), ConfigError),
    (sample_convergence_bound, (0.1, 0, 0.01), ConfigError),
    (sample_convergence_bound, (0.1, 10, 1.0), ConfigError),
]


@pytest.mark.parametrize(("fn", "args", "error"), BAD_CALLS)
def test_invalid_inputs_raise_zoo_errors(fn, args, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        fn(*args)
    assert isinstance(info.value, ZooError)
    assert len(str(info.value)) > 20  # says what was wrong and what to do


@pytest.mark.parametrize(
    "kwargs",
    [
        {"errors": -1},
        {"errors": 10_001},
        {"errors": 1.5},
        {"samples": 0},
        {"hypotheses": 0},
        {"kl": -0.5},
        {"kl": float("nan")},
        {"delta": 0.0},
        {"delta_sample": 1.0},
        {"delta": 0.6, "delta_sample": 0.5},
    ],
)
def test_gibbs_certificate_invalid_inputs(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"errors": 10, "n": 100, "samples": 100, "kl": 1.0} | kwargs
    errors = args.pop("errors")
    with pytest.raises(ZooError):
        gibbs_certificate(errors, **args)  # type: ignore[arg-type]
