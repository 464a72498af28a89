"""Checkpoint / resume after a real SIGKILL, and the 2-process gloo pass, against one uninterrupted process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from curvature_models import batches, flatten_blocks, mixed_cnn
from curvature_worker import DIST_DATA, dist_data, resume_data
from safetensors import safe_open
from safetensors.torch import load_file

from zoo.curvature import kfac
from zoo.errors import ConfigError

WORKER = Path(__file__).with_name("curvature_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def assert_same(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        err = float((got[k].double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
        assert err <= rtol, (k, err)


def test_resume_after_sigkill(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(WORKER), "checkpointed", str(ckpt), "0.6"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    path = ckpt / "kfac-rank0-of1.safetensors"
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    position = meta["position"]
    assert 1 <= position < len(resume_data()) and meta["complete"] is False
    assert not list(ckpt.glob("*.tmp"))

    want = flatten_blocks(kfac(mixed_cnn(), resume_data(), "mc", progress=False,
                               generator=torch.Generator().manual_seed(3)))
    # the batches before the checkpoint are poisoned: a correct resume never looks at them again
    data = resume_data()
    data[:position] = [(torch.full_like(x, float("nan")), y) for x, y in data[:position]]
    got = kfac(mixed_cnn(), data, "mc", progress=False, generator=torch.Generator().manual_seed(3),
               checkpoint_dir=ckpt, checkpoint_every=1, resume=True)
    assert got.n == 4 * len(data)
    assert_same(flatten_blocks(got), want)
    assert not path.exists()  # a finished pass removes its checkpoint


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    data = batches(3, 2, (3, 8, 8), 4, dtype=torch.float32)

    class Stop(Exception):
        pass

    def stopping():
        yield from data[:2]
        raise Stop

    with pytest.raises(Stop):
        kfac(mixed_cnn(), stopping(), progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ConfigError, match="another model"):
        kfac(mixed_cnn(seed=1), data, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    out = tmp_path / "dist.safetensors"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), "distributed", str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    want = kfac(mixed_cnn(), dist_data(), "mc", progress=False, generator=torch.Generator().manual_seed(3))
    assert_same(load_file(str(out)), flatten_blocks(want))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert int(meta["n"]) == DIST_DATA["n_batches"] * DIST_DATA["batch"] == want.n
    assert float(meta["nll_sum"]) == pytest.approx(want.nll_sum, rel=1e-9)
