"""Service benchmark: latency and throughput of `zoo serve` on loopback, and the nn predictive against laplace-torch.

    python benchmarks/service.py [--reps 3] [--requests 64] [--no-laplace]

1. Three servers of the embedded default (efficientnet_lite0, 224 px) as real `zoo serve` processes: `--mode map`
   (the plain timm network, one forward pass: the baseline), `--mode fast` and `--mode nn --samples 32`. An async
   httpx loop, bounded at concurrency 1, 8 and 32, posts one JPEG per request; p50/p99 latency and req/s, the
   median of --reps repetitions.
2. Service overhead: req/s at concurrency 8 against the same work in process (decode, timm transform, Predictor on
   batches of 8), and against the Predictor alone on pre-decoded batches, alternated repetition by repetition.
3. 2,000 requests at concurrency 16 (fast): errors, and the server's RSS after every 250 (start, end, and the
   growth over the second 1,000, where a leak would show).
4. nn mode, 30 samples, 32 images of timm resnet18 at 64 px: zoo.predictive.Predictor against laplace-torch's
   `nn` predictive (KronLaplace, BatchNorm frozen) on the same model. `pip install laplace-torch` (the bench extra).

Ratios are measured in one run; every figure is the median of the repetitions. No assertion is made here.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from kron import median_time  # benchmarks/ is on sys.path: scripts run as python benchmarks/NAME.py
from PIL import Image

ZOO = Path(sys.executable).with_name("zoo")
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def zoo_serve(ref: str, *args: str) -> Iterator[tuple[str, int]]:
    """A `zoo serve` process on a free loopback port; yields (url, pid) once /health/ready is 200."""
    port = free_port()
    proc = subprocess.Popen([str(ZOO), "serve", ref, "--port", str(port), "--log-level", "warning", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"zoo serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def load(url: str, name: str, image: bytes, requests: int, concurrency: int) -> tuple[list[float], float, int]:
    """`requests` POSTs by `concurrency` clients in a loop; returns (latencies in s, wall time, errors)."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client() -> None:
            nonlocal errors
            for _ in remaining:
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/models/{name}/predict",
                                    files=[("files", ("photo.jpg", image, "image/jpeg"))])
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        return latencies, time.perf_counter() - start, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, name: str, image: bytes, requests: int, concurrency: int, reps: int) -> dict[str, float]:
    """Median over repetitions of p50, p99 (ms) and req/s; one warm-up request first."""
    asyncio.run(load(url, name, image, 1, 1))
    runs = [asyncio.run(load(url, name, image, requests, concurrency)) for _ in range(reps)]
    errors = sum(r[2] for r in runs)
    return {
        "p50": statistics.median(percentile(r[0], 0.5) for r in runs) * 1000,
        "p99": statistics.median(percentile(r[0], 0.99) for r in runs) * 1000,
        "rps": statistics.median(len(r[0]) / r[1] for r in runs),
        "errors": errors,
    }


def photo_jpeg() -> bytes:
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[0])
    img.thumbnail((320, 320))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def warm_median_time(fn: Callable[[], object], reps: int) -> float:
    """kron.median_time after one untimed call (allocator pools, lazy layers)."""
    fn()
    return median_time(fn, reps)


def in_process_rates(ref: str, image: bytes) -> tuple[float, float]:
    """Images/s in process: decode + timm transform + fast Predictor on batches of 8, serially; and the Predictor
    alone on a batch decoded beforehand (pure compute). Median of 3 runs of 3 batches each, after a warm-up."""
    from timm.data import create_transform, resolve_data_config

    import zoo
    from zoo.predictive import Predictor

    model, prior = zoo.load(ref)
    model.eval()
    transform = create_transform(**resolve_data_config(model=model))
    predictor = Predictor(prior, mode="fast", samples=32, seed=0)

    def decode() -> torch.Tensor:
        return torch.stack([transform(Image.open(io.BytesIO(image)).convert("RGB")) for _ in range(8)])

    decoded = decode()
    predictor(decoded)

    def rate(step: Callable[[], object]) -> float:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            runs.append(24 / (time.perf_counter() - t0))
        return statistics.median(runs)

    return rate(lambda: predictor(decode())), rate(lambda: predictor(decoded))


def overhead_section(ref: str, name: str, image: bytes, reps: int) -> None:
    """Service req/s at concurrency 8 against the same work in process. Each repetition runs the in-process
    measurement in a fresh process (as the server is one; this process hosts the httpx client) and then the
    service, so that both see the same machine load."""
    serial, compute, served = [], [], []
    with zoo_serve(ref, "--mode", "fast") as (url, _):
        asyncio.run(load(url, name, image, 8, 8))
        for _ in range(reps):
            time.sleep(1.0)  # the server's OpenMP threads spin for a while after a batch: let them sleep first
            out = subprocess.run([sys.executable, __file__, "--in-process", ref], check=True, capture_output=True,
                                 text=True).stdout.split()
            serial.append(float(out[-2]))
            compute.append(float(out[-1]))
            lat, wall, _ = asyncio.run(load(url, name, image, 24, 8))
            served.append(len(lat) / wall)
    a, c, b = statistics.median(serial), statistics.median(compute), statistics.median(served)
    print(f"in process, decode + transform + fast Predictor on batches of 8, serially: {a:.2f} images/s; "
          f"the Predictor alone on pre-decoded batches of 8: {c:.2f} images/s; service at concurrency 8 "
          f"(httpx client on the same cores): {b:.2f} req/s")
    print(f"service overhead: {100 * (a / b - 1):+.1f}% over the serial pipeline, {100 * (c / b - 1):+.1f}% over "
          "pure compute (target ≤ 10%)")


SERVERS = {"map": ("--mode", "map"), "fast": ("--mode", "fast"), "nn-32": ("--mode", "nn", "--samples", "32")}


def service_section(ref: str, name: str, image: bytes, requests: int, reps: int, modes: list[str]) -> None:
    results: dict[str, dict[int, dict[str, float]]] = {}
    for label in modes:
        with zoo_serve(ref, *SERVERS[label], "--max-batch", "32", "--max-wait-ms", "5") as (url, _):
            results[label] = {}
            for c in LEVELS:
                # nn runs 32 forward passes per image: c requests (one batch) a repetition, and one repetition
                # at concurrency 32, where a batch takes minutes on two CPU cores
                n, r = (requests, reps) if label != "nn-32" else (c, reps if c < 32 else 1)
                results[label][c] = measure(url, name, image, n, c, r)
                r = results[label][c]
                print(f"  {label:>6s}  c={c:<3d} p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  "
                      f"{r['rps']:7.2f} req/s  errors {r['errors']}", flush=True)
    print("\n| mode | concurrency | p50 ms | p99 ms | req/s |\n|---|---|---|---|---|")
    for label, rows in results.items():
        for c, r in rows.items():
            print(f"| {label} | {c} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.2f} |")
    if "fast" not in results or "map" not in results:
        return
    for c in LEVELS:
        ratio = results["fast"][c]["p50"] / results["map"][c]["p50"]
        print(f"fast / MAP p50 at concurrency {c}: {ratio:.2f}x (target ≤ 1.5x)")


def soak_section(ref: str, name: str, image: bytes, rounds: int = 8) -> None:
    """`rounds` × 250 requests at concurrency 16, with the server's RSS after each round. The allocator's pools
    grow while batch sizes 1–16 are first seen, then level off; a leak keeps growing over the second half."""
    with zoo_serve(ref, "--mode", "fast") as (url, pid):
        asyncio.run(load(url, name, image, 64, 16))  # warm-up: allocator pools, predictor, connections
        rss = [rss_mib(pid)]
        lat: list[float] = []
        wall, errors = 0.0, 0
        for _ in range(rounds):
            part, seconds, failed = asyncio.run(load(url, name, image, 250, 16))
            lat += part
            wall += seconds
            errors += failed
            rss.append(rss_mib(pid))
    half = rss[rounds // 2]
    print(f"{250 * rounds:,} requests at concurrency 16 (fast): {errors} errors, {len(lat) / wall:.1f} req/s, "
          f"p50 {1000 * percentile(lat, 0.5):.1f} ms, p99 {1000 * percentile(lat, 0.99):.1f} ms; server RSS "
          f"{rss[0]:.0f} MiB at the start, {rss[-1]:.0f} MiB at the end ({rss[-1] - rss[0]:+.0f} MiB), "
          f"{rss[-1] - half:+.0f} MiB over the second half; after each 250: "
          f"{', '.join(f'{r:.0f}' for r in rss[1:])} MiB")


def laplace_section(reps: int) -> None:
    """zoo's nn Predictor (draws made once) against laplace-torch's nn predictive, resnet18 at 64 px."""
    import timm

    import zoo
    from zoo.predictive import Predictor

    try:
        from laplace import Laplace
    except ImportError:
        print("laplace-torch is not installed (pip install laplace-torch, the bench extra); skipped")
        return
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    classes = 10
    data = [(torch.randn(16, 3, 64, 64, generator=gen), torch.randint(0, classes, (16,), generator=gen))
            for _ in range(2)]
    x = torch.randn(32, 3, 64, 64, generator=gen)

    model = timm.create_model("resnet18", num_classes=classes).eval()
    t0 = time.perf_counter()
    prior = zoo.build_prior(model, data, progress=False, generator=torch.Generator().manual_seed(0), holdout=0)
    print(f"zoo prior of resnet18 built in {time.perf_counter() - t0:.0f} s")
    predictor = Predictor(prior, mode="nn", samples=30, seed=0)
    ours = warm_median_time(lambda: predictor(x), reps)
    ours_once = warm_median_time(lambda: Predictor(prior, mode="nn", samples=30, seed=0)(x), reps)

    la_model = timm.create_model("resnet18", num_classes=classes).eval()
    la_model.load_state_dict(model.state_dict())
    for module in la_model.modules():  # BatchNorm frozen: laplace-torch's Kronecker backends know no BN
        if isinstance(module, torch.nn.BatchNorm2d):
            for p in module.parameters():
                p.requires_grad_(False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([d[0] for d in data]),
                                                                         torch.cat([d[1] for d in data])),
                                         batch_size=16)
    la = Laplace(la_model, "classification", subset_of_weights="all", hessian_structure="kron")
    t0 = time.perf_counter()
    la.fit(loader)
    print(f"laplace-torch KronLaplace fitted in {time.perf_counter() - t0:.0f} s")
    theirs = warm_median_time(lambda: la(x, pred_type="nn", link_approx="mc", n_samples=30), reps)
    print("\n| nn predictive, resnet18 64 px, 32 images, 30 samples | seconds |\n|---|---|")
    print(f"| zoo Predictor call (draws reused, as the service does) | {ours:.2f} |")
    print(f"| zoo Predictor built and called (one-off prior.predict) | {ours_once:.2f} |")
    print(f"| laplace-torch la(x, pred_type='nn', n_samples=30) | {theirs:.2f} |")
    print(f"speed-up: {theirs / ours:.1f}x with reused draws, {theirs / ours_once:.1f}x one-off (target ≥ 5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (median)")
    parser.add_argument("--requests", type=int, default=64, help="requests per repetition (map and fast)")
    parser.add_argument("--no-laplace", action="store_true", help="skip the laplace-torch comparison")
    parser.add_argument("--only", choices=("service", "overhead", "soak", "laplace"), help="run one section")
    parser.add_argument("--in-process", metavar="REF", help=argparse.SUPPRESS)  # the overhead section's worker
    parser.add_argument("--modes", default="map,fast,nn-32", help="servers of the service section (map,fast,nn-32)")
    args = parser.parse_args()
    if args.in_process:
        print(*in_process_rates(args.in_process, photo_jpeg()))
        return
    from zoo.demo import embedded_default

    ref = str(embedded_default(progress=False))
    name = Path(ref).name
    image = photo_jpeg()
    print(f"model {name} ({ref}); {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    if args.only in (None, "service"):
        service_section(ref, name, image, args.requests, args.reps, args.modes.split(","))
    if args.only in (None, "overhead"):
        overhead_section(ref, name, image, args.reps)
    if args.only in (None, "soak"):
        soak_section(ref, name, image)
    if args.only in (None, "laplace") and not args.no_laplace:
        laplace_section(args.reps)


if __name__ == "__main__":
    main()
