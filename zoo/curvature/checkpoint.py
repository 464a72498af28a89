"""Atomic checkpoints of a running curvature pass: safetensors for the sums, JSON metadata, no pickle.

A checkpoint is one file, written to a temporary name, flushed to disk and then ``os.replace``d over the
previous one, so a kill at any moment leaves either the old or the new checkpoint, never a torn one.
Checkpoints always describe a partial pass (``"complete": false``); the pass deletes its own when it
finishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from zoo.errors import ConfigError

FORMAT = "zoo.curvature.checkpoint/1"


def checkpoint_path(directory: str | os.PathLike[str], rank: int, world: int) -> Path:
    """The checkpoint file of one rank."""
    return Path(directory) / f"kfac-rank{rank}-of{world}.safetensors"


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    header = {"format": FORMAT, "meta": json.dumps({**meta, "complete": False}, sort_keys=True)}
    save_file(payload, str(tmp), metadata=header)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on CPU, metadata dict)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as err:  # safetensors raises its own error types for truncated / foreign files
        raise ConfigError(f"cannot read the checkpoint {path} ({err}); delete it or pass resume=False") from err
    if header.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a zoo curvature checkpoint; delete it or pass resume=False")
    return tensors, json.loads(header["meta"])
