"""zoo.kron at resnet50 layer sizes, and the accuracy of the ≥3-term approximations.

Prints, per layer size, the median of several repetitions of:
  - building the exact two-term posterior β·F_new + α·P from a prior P loaded with its stored decomposition,
  - building the damped posterior β·F_new + α·(P + δI) (eigenbasis approximation, no eigendecomposition),
  - one weight draw, one solve, one KL(posterior ‖ prior);
then the relative Frobenius and KL errors of the "eigenbasis" and "kronecker" approximations against dense
matrices on K-FAC-like factors (the numbers behind DEFAULT_APPROXIMATION).

    python benchmarks/kron.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from zoo.kron import KronPrecision, kl_divergence

F64 = torch.float64


def kfac_like(
    n: int, samples: int, seed: int, decay: float = 1.0, bias: bool = False, basis_seed: int | None = None
) -> torch.Tensor:
    """Σ x xᵀ over `samples` vectors with a power-law spectrum (what K-FAC factors look like), float64.

    Factors with the same `basis_seed` share their population covariance (same layer, same kind of data).
    """
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, n + 1, dtype=F64).pow(-decay / 2)
    gb = torch.Generator().manual_seed(seed if basis_seed is None else basis_seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gb, dtype=F64))
    x = (q * spectrum) @ torch.randn(n, samples, generator=g, dtype=F64)
    if bias:
        x[-1] = 1.0
    return x @ x.T / samples


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(inn: int, out: int, repeats: int) -> None:
    a_src, g_src = kfac_like(inn, 2 * inn, 1, bias=True), kfac_like(out, 2 * out, 2)
    a_new, g_new = kfac_like(inn, 64, 3, bias=True), kfac_like(out, 64, 4)
    t0 = time.perf_counter()
    stored = KronPrecision([(a_src, g_src)]).to_tensors()  # what an artifact holds: factors + eigendecomposition
    setup = time.perf_counter() - t0
    prior = KronPrecision.from_tensors(stored)
    new = KronPrecision([(a_new, g_new)], check_psd=False)
    mean = torch.zeros(out, inn, dtype=F64)

    def build_exact() -> KronPrecision:
        post = 2.0 * new + 0.5 * prior
        post.decomposition()
        return post

    damped_prior = prior.rescaled(damping=1e-3)
    damped_prior.decomposition()

    def build_damped(method: str) -> KronPrecision:
        post = 2.0 * KronPrecision(new.terms, approximation=method, check_psd=False) + 0.5 * damped_prior
        post.decomposition()
        return post

    post = build_exact()
    v = torch.randn(out, inn, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    rows = [
        ("prior eigendecomposition (artifact build, once)", setup),
        ("build exact 2-term posterior from stored prior", median_time(build_exact, repeats)),
        ("build damped posterior, eigenbasis (no eigh)", median_time(lambda: build_damped("eigenbasis"), repeats)),
        ("build damped posterior, ekfac (eigh of Â, Ĝ)", median_time(lambda: build_damped("ekfac"), repeats)),
        ("draw one weight sample (float64)", median_time(lambda: post.sample(1, generator=gen), repeats)),
        ("draw one weight sample (float32)", median_time(lambda: post.sample(1, gen, torch.float32), repeats)),
        ("solve Λ⁻¹ vec(V)", median_time(lambda: post.solve(v), repeats)),
        ("KL(posterior ‖ prior)", median_time(lambda: kl_divergence(mean, post, mean + 0.01, prior), repeats)),
    ]
    print(f"\nA {inn}×{inn}, G {out}×{out}  (d = {inn * out:,}; median of {repeats})")
    for name, seconds in rows:
        print(f"  {name:<50s} {seconds * 1e3:10.1f} ms")


def dense_kl(mq: torch.Tensor, lq: torch.Tensor, mp: torch.Tensor, lp: torch.Tensor) -> float:
    d = (mq - mp).T.reshape(-1)
    sq = torch.linalg.inv(lq)
    return 0.5 * (torch.trace(lp @ sq) + d @ lp @ d - lq.shape[0] + torch.logdet(lq) - torch.logdet(lp)).item()


METHODS = ("eigenbasis", "kronecker", "ekfac")


def approximation_errors(inn: int, out: int, seeds: int) -> None:
    print(f"\nApproximation error on K-FAC-like factors, A {inn}×{inn}, G {out}×{out}, mean over {seeds} seeds")
    print("  F: relative Frobenius error ‖Λ̃ − Λ‖/‖Λ‖;  KL: relative error of KL(post ‖ prior) against dense")
    print("  'shared': new data has the source's input covariance (same layer); 'independent': unrelated bases")
    cols = "".join(f"{m + ' F':>14s}" for m in METHODS) + "".join(f"{m + ' KL':>15s}" for m in METHODS)
    print(f"  {'case':<58s}{cols}")
    cases = {
        "β·F_new + α·(F_src + δI), β/α = 0.1": (0.1, False),
        "β·F_new + α·(F_src + δI), β/α = 1": (1.0, False),
        "β·F_new + α·(F_src + δI), β/α = 10": (10.0, False),
        "β·F_new + α·(F_src + δI), β/α = 100": (100.0, False),
        "F_new + F_mid + F_src (3 terms, no damping)": (1.0, True),
    }
    for regime in ("shared", "independent"):
        for name, (beta, three) in cases.items():
            acc: dict[str, list[float]] = {}
            for seed in range(seeds):
                shared = regime == "shared"
                bi, bo = (10 * seed + 1, 10 * seed + 2) if shared else (None, None)
                a_src, g_src = kfac_like(inn, 4 * inn, 10 * seed + 1, bias=True), kfac_like(out, 4 * out, 10 * seed + 2)
                a_new = kfac_like(inn, 16, 10 * seed + 3, bias=True, basis_seed=bi)
                g_new = kfac_like(out, 16, 10 * seed + 4, basis_seed=bo)
                terms, scales, delta = [(a_new, g_new), (a_src, g_src)], [beta, 1.0], 1e-2
                if three:
                    a_mid = kfac_like(inn, 2 * inn, 10 * seed + 5, basis_seed=bi)
                    terms.insert(1, (a_mid, kfac_like(out, 2 * out, 10 * seed + 6, basis_seed=bo)))
                    scales.insert(1, 1.0)
                    delta = 0.0
                prior = KronPrecision([(a_src, g_src)], damping=delta) if delta else KronPrecision(terms[1:])
                g = torch.Generator().manual_seed(seed)
                mq, mp = torch.randn(out, inn, generator=g, dtype=F64) * 0.1, torch.zeros(out, inn, dtype=F64)
                exact_dense = KronPrecision(terms, scales, delta).target_dense()
                kl_exact = dense_kl(mq, exact_dense, mp, prior.dense())
                for method in METHODS:
                    post = KronPrecision(terms, scales, delta, approximation=method)
                    acc.setdefault(method + "F", []).append(post.approximation_error)
                    kl = kl_divergence(mq, post, mp, prior).item()
                    acc.setdefault(method + "KL", []).append(abs(kl - kl_exact) / kl_exact)
            m = {k: statistics.fmean(v) for k, v in acc.items()}
            row = "".join(f"{m[x + 'F']:14.2e}" for x in METHODS) + "".join(f"{m[x + 'KL']:15.2e}" for x in METHODS)
            print(f"  {regime + ': ' + name:<58s}{row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sizes = [(257, 64)] if args.quick else [(4608, 512), (2049, 1000)]
    for inn, out in sizes:
        timings(inn, out, args.repeats)
    approximation_errors(33, 16, seeds=2 if args.quick else 5)


if __name__ == "__main__":
    main()
