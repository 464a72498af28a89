"""Helpers of the service tests: a tiny prior repository, a real uvicorn server on a free loopback port, images."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import timm
import torch
import uvicorn
from PIL import Image

from api.app import create_app
from api.settings import Settings

TINY_ARCH = "test_efficientnet_gn"
TINY_SIZE = 32
TINY_LABELS = ["cat", "dog", "fish", "bird", "frog"]


def build_tiny_repo(directory: Path, *, labels: list[str] | None = TINY_LABELS) -> Path:
    """A real prior of timm's tiny test_efficientnet_gn (5 classes, 32 px) on random data, saved as a repository.

    The preprocessing config is set to 32 px so timm's transforms produce what the model was built at; `labels`
    go into config.json as timm's `label_names`, the way a repository ships its own class names.
    """
    import zoo

    overlay = {"input_size": (3, TINY_SIZE, TINY_SIZE), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with torch.random.fork_rng(devices=[]):  # the same weights whichever test builds it first
        torch.manual_seed(0)
        model = timm.create_model(TINY_ARCH, num_classes=len(TINY_LABELS), pretrained_cfg_overlay=overlay).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, TINY_SIZE, TINY_SIZE, generator=gen), torch.randint(0, 5, (8,), generator=gen))
            for _ in range(2)]
    # holdout=0: no held-out width check; random data has nothing to calibrate on, and it would cost minutes
    prior = zoo.build_prior(model, data, progress=False, generator=torch.Generator().manual_seed(0), holdout=0)
    path = prior.save(str(directory))
    if labels is not None:
        config_path = path / "config.json"
        config = json.loads(config_path.read_text())
        config["label_names"] = labels
        config_path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """create_app(settings) under a real uvicorn server in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Poll /health/ready until 200 (models loaded) or fail with the last answer."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{url}/health/ready", timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text}"
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


@contextlib.contextmanager
def serving(**overrides: object) -> Iterator[Server]:
    with Server(Settings(**overrides)) as server:  # type: ignore[arg-type]
        yield server


def photo(name: str = "china", size: int | None = 96, fmt: str = "JPEG") -> bytes:
    """One of scikit-learn's two sample photos (real, offline), downscaled and encoded."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images()
    index = [Path(f).stem for f in images.filenames].index(name)
    img = Image.fromarray(images.images[index])
    if size is not None:
        img.thumbnail((size, size))
    return encode(img, fmt)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


_REPOS: dict[str, Path] = {}


def tiny_repo_once(base: Path) -> Path:
    """The tiny repository, built once per test session (several test modules share it)."""
    if "tiny" not in _REPOS:
        _REPOS["tiny"] = build_tiny_repo(base / "tiny-prior")
    return _REPOS["tiny"]


def tiny_tensor(images: list[bytes]) -> torch.Tensor:
    """The images preprocessed exactly as the server does for the tiny model (timm's data config + transform)."""
    from timm.data import create_transform, resolve_data_config

    import zoo

    model, _ = zoo.load(str(_REPOS["tiny"]))
    transform = create_transform(**resolve_data_config(model=model))
    return torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
