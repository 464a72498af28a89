"""`zoo.finetune` against one MAP fine-tune of the same epochs, on the same model, seed, shots and start.

Issue 8's cost target is a whole `zoo.finetune` on 5–100 images in at most 3× a MAP fine-tune of the same epochs.
Each seed fits MAP (L2-SP at one decay, the benchmark's optimiser, epochs and lr) and then ours, from the same fresh
copy of the upstream network; the order alternates with the seed so neither always runs on a warmer machine. It
prints each seed's two times and their ratio, then the medians and the median ratio.

    python benchmarks/fit_ratio.py --network resnet10t --shots 1 5 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import downstream, l2sp_fine_tune
from transfer import EPOCHS, LR, fresh
from transfer_task import NETWORKS, upstream

import zoo

MAP_DECAY = 1.0  # one fit of the grid's middle decay: what a user pays for one MAP fine-tune


def one_seed(network: str, shots: int, seed: int) -> tuple[float, float]:
    """(MAP seconds, zoo.finetune seconds) on one seed."""
    up = upstream(network)
    train, _, _ = downstream(shots, seed)

    def ours() -> float:
        model, prior = fresh(up, seed)
        t0 = time.perf_counter()
        zoo.finetune(model, prior, train, epochs=EPOCHS, lr=LR, progress=False,
                     generator=torch.Generator().manual_seed(seed))
        return time.perf_counter() - t0

    def plain() -> float:
        model, _ = fresh(up, seed)
        return l2sp_fine_tune(model, train, MAP_DECAY, epochs=EPOCHS, lr=LR)

    if seed % 2:
        theirs_s = plain()
        return theirs_s, ours()
    ours_s = ours()
    return plain(), ours_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=list(NETWORKS), default="resnet10t")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; MAP: L2-SP wd={MAP_DECAY:g}, {EPOCHS} epochs, lr {LR:g}")
    for shots in args.shots:
        rows = []
        for seed in range(args.seeds):
            theirs, ours = one_seed(args.network, shots, seed)
            rows.append((theirs, ours))
            print(f"  {args.network}, {shots} shots, seed {seed}: MAP {theirs:.1f} s, zoo.finetune {ours:.1f} s, "
                  f"ratio {ours / theirs:.2f}×", flush=True)
        theirs_med = statistics.median(r[0] for r in rows)
        ours_med = statistics.median(r[1] for r in rows)
        ratio = statistics.median(r[1] / r[0] for r in rows)
        print(f"{args.network}, {shots} shots, {args.seeds} seeds: MAP median {theirs_med:.1f} s, zoo.finetune "
              f"median {ours_med:.1f} s, median ratio {ratio:.2f}×", flush=True)


if __name__ == "__main__":
    main()
