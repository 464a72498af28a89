"""Subprocess worker for the curvature tests: a slow checkpointed pass (to be killed), or one torchrun rank.

    python tests/curvature_worker.py checkpointed CKPT_DIR DELAY
    torchrun --standalone --nproc_per_node 2 tests/curvature_worker.py distributed OUT_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curvature_models import SlowLoader, batches, flatten_blocks, mixed_cnn

from zoo.curvature import kfac

RESUME_DATA = {"n_batches": 6, "batch": 4, "shape": (3, 8, 8), "classes": 4, "seed": 7}
DIST_DATA = {"n_batches": 5, "batch": 3, "shape": (3, 8, 8), "classes": 4, "seed": 8}


def resume_data() -> list:
    return batches(**RESUME_DATA, dtype=torch.float32)


def dist_data() -> list:
    return batches(**DIST_DATA, dtype=torch.float32)


def main(argv: list[str]) -> None:
    mode = argv[0]
    torch.set_num_threads(1)
    if mode == "checkpointed":
        ckpt, delay = argv[1], float(argv[2])
        kfac(mixed_cnn(), SlowLoader(resume_data(), delay), "mc", progress=False,
             generator=torch.Generator().manual_seed(3), checkpoint_dir=ckpt, checkpoint_every=1)
    elif mode == "distributed":
        dist.init_process_group("gloo")
        try:
            blocks = kfac(mixed_cnn(), dist_data(), "mc", progress=False, generator=torch.Generator().manual_seed(3))
            if dist.get_rank() == 0:
                meta = {"n": str(blocks.n), "nll_sum": repr(blocks.nll_sum)}
                save_file(flatten_blocks(blocks), argv[1], metadata=meta)
        finally:
            dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
