"""CUDA check of zoo.kron: the same operations on the GPU agree with the CPU, and their speed at resnet50 sizes.

    python benchmarks/cuda_kron_check.py        # needs a CUDA device; exits 0 with a message otherwise
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from timing import cuda_median_time

from zoo.kron import KronPrecision, kl_divergence

F64 = torch.float64


def spd(n: int, samples: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, samples, generator=g, dtype=F64) / samples**0.5
    return (x @ x.T).to(device)


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    return cuda_median_time(fn, repeats, warmup=False)


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    # Agreement on a small layer.
    for device in ("cpu", "cuda"):
        prior = KronPrecision([(spd(40, 80, 1, device), spd(12, 30, 2, device))], damping=0.1)
        post = 3.0 * KronPrecision([(spd(40, 5, 3, device), spd(12, 5, 4, device))]) + prior
        v = torch.ones(12, 40, dtype=F64, device=device)
        result = (post.logdet().item(), post.solve(v).cpu(), kl_divergence(v, post, 0 * v, prior).item())
        if device == "cpu":
            ref = result
        else:
            err = (result[1] - ref[1]).norm() / ref[1].norm()
            print(f"small layer GPU vs CPU: logdet Δ={abs(result[0] - ref[0]):.2e}, solve rel={err:.2e}, "
                  f"KL Δ={abs(result[2] - ref[2]):.2e}")
            assert abs(result[0] - ref[0]) < 1e-8 * abs(ref[0]) and err < 1e-10
            draws = post.sample(20000, generator=torch.Generator(device="cuda").manual_seed(0))
            flat = draws.mT.reshape(20000, -1)
            cov_err = ((flat.T @ flat / 20000) - torch.linalg.inv(post.dense())).abs().max().item()
            print(f"sample covariance max |Δ| on GPU: {cov_err:.2e}")
    for inn, out in ((4608, 512), (2049, 1000)):
        speed(inn, out)


def speed(inn: int, out: int) -> None:
    """Timings at one resnet50 layer size."""
    a_src, g_src = spd(inn, 2 * inn, 5, "cuda"), spd(out, 2 * out, 6, "cuda")
    t0 = time.perf_counter()
    prior = KronPrecision([(a_src, g_src)], damping=1e-3)
    prior.decomposition()
    torch.cuda.synchronize()
    t_prior = time.perf_counter() - t0
    new = KronPrecision([(spd(inn, 64, 7, "cuda"), spd(out, 64, 8, "cuda"))], check_psd=False)
    eig = KronPrecision(new.terms, approximation="eigenbasis", check_psd=False)
    build = timed(lambda: (2.0 * eig + 0.5 * prior).decomposition())
    ekfac = timed(lambda: (2.0 * new + 0.5 * prior).decomposition(), repeats=3)
    post = 2.0 * new + 0.5 * prior
    post.decomposition()
    gen = torch.Generator(device="cuda").manual_seed(0)
    s64 = timed(lambda: post.sample(1, generator=gen))
    s32 = timed(lambda: post.sample(32, generator=gen, dtype=torch.float32))
    v = torch.randn(out, inn, dtype=F64, device="cuda")
    solve = timed(lambda: post.solve(v))
    m = torch.zeros(out, inn, dtype=F64, device="cuda")
    kl = timed(lambda: kl_divergence(m, post, m + 0.01, prior))
    print(f"A {inn}, G {out} on GPU: prior eigh {t_prior * 1e3:.0f} ms, "
          f"damped posterior build: eigenbasis {build * 1e3:.1f} ms, ekfac {ekfac * 1e3:.0f} ms, "
          f"1 draw f64 {s64 * 1e3:.2f} ms, 32 draws f32 {s32 * 1e3:.2f} ms, solve {solve * 1e3:.2f} ms, "
          f"KL {kl * 1e3:.2f} ms")

if __name__ == "__main__":
    main()
