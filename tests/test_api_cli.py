"""`zoo serve` as a user runs it: a real process, real HTTP, a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from api_support import free_port, photo, tiny_repo_once, wait_ready

ZOO = Path(sys.executable).with_name("zoo")


@contextmanager
def zoo_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[str]:
    """Run `zoo serve ARGS --port P` until the block ends; yield its URL once ready."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"zoo-serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(ZOO), "serve", *args, "--port", str(port), "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout=timeout)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        # uvicorn re-raises the SIGTERM it handled once shut down, so a clean single-process exit reads -15
        assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]


def test_serve_workers_with_token_from_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two worker processes; the token comes from ZOO_API_TOKEN and a limit from ZOO_MAX_FILES."""
    repo = tiny_repo_once(tmp_path_factory.getbasetemp())
    env = {"ZOO_API_TOKEN": "t0ken", "ZOO_MAX_FILES": "2"}
    with zoo_serve(str(repo), "--workers", "2", "--samples", "8", env=env) as url:
        auth = {"Authorization": "Bearer t0ken"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # each worker process loads on its own; readiness seen through one does not cover the others yet
        deadline = time.monotonic() + 120
        while (r := httpx.get(f"{url}/v1/models", headers=auth)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        models = r.json()["models"]
        streak = 0
        while streak < 20 and time.monotonic() < deadline:  # twenty ready answers in a row: both workers loaded
            ready = httpx.get(f"{url}/health/ready").status_code == 200
            streak = streak + 1 if ready else 0
            time.sleep(0 if ready else 0.5)
        assert [m["name"] for m in models] == ["tiny-prior"] and models[0]["predictive"]["samples"] == 8
        files = [("files", (f"{i}.jpg", photo(), "image/jpeg")) for i in range(3)]
        r = httpx.post(f"{url}/v1/models/tiny-prior/predict", files=files, headers=auth, timeout=60)
        assert r.status_code == 413 and "ZOO_MAX_FILES" in r.json()["error"]
        for _ in range(4):  # spread over the workers; every one has loaded the model before readiness
            r = httpx.post(f"{url}/v1/models/tiny-prior/predict", files=files[:2], headers=auth, timeout=60)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    start = time.monotonic()
    out = subprocess.run([str(ZOO), "serve", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert time.monotonic() - start < 60  # checked before any server starts, not after loading


@pytest.mark.slow
def test_serve_without_ref_serves_the_embedded_default(tmp_path: Path) -> None:
    """A fresh machine: one command builds the efficientnet_lite0 prior into the cache and serves it; ImageNet
    labels; the photo of the Summer Palace is a palace."""
    with zoo_serve(env={"ZOO_CACHE": str(tmp_path)}, timeout=600) as url:
        (model,) = httpx.get(f"{url}/v1/models").json()["models"]
        assert model["architecture"] == "efficientnet_lite0" and model["num_classes"] == 1000
        assert len(model["labels"]) == 1000 and model["predictive"]["mode"] == "fast"
        r = httpx.post(f"{url}/v1/models/{model['name']}/predict", timeout=60,
                       files=[("files", ("china.jpg", photo("china", size=None), "image/jpeg"))])
        assert r.status_code == 200
        # the network itself ranks this JPEG bell cote (0.34) just above palace (0.30); the prior's predictive
        # follows the network, so the palace is among the top answers, not necessarily the first
        assert "palace" in [t["label"] for t in r.json()["predictions"][0]["top"][:3]]
    assert any(tmp_path.iterdir())  # the built prior stays in the cache for the next start
