"""A real olah server on 127.0.0.1 serving local git mirrors offline, for tests that pull through the Hub client.

Use `running_olah(mirror_root, workdir)` as a context manager, or the session-scoped `olah` fixture
(import it into a test module: `from olah_server import olah`). The server always runs with
`offline = true`, so it never tries to reach huggingface.co, and it is always killed on exit.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class OlahServer:
    """A started olah: its base URL (use as HF_ENDPOINT) and the mirrors directory it serves."""

    url: str
    mirror_root: Path
    log_file: Path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, *, port: int, mirror_root: Path, repos_path: Path) -> Path:
    """Write olah's TOML config: loopback only, one mirrors path, offline."""
    path.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"repos-path = {str(repos_path)!r}\n"
        f"mirrors-path = [{str(mirror_root)!r}]\n"
        'mirror-scheme = "http"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "\n[accessibility]\n"
        "offline = true\n"
    )
    return path


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_file: Path, timeout: float) -> None:
    """Poll until olah answers HTTP at all; fail with its log if it dies or never answers.

    Any status counts as ready: olah 0.5.4's index page itself answers 500 (a template bug), but the
    answer proves uvicorn is serving the app.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"olah exited with {process.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            with opener.open(url + "/", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"olah did not answer on {url} within {timeout:.0f} s:\n{log_file.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server, and kill it if it does not stop promptly."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def launch(mirror_root: Path, workdir: Path, timeout: float) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start one olah process on a fresh free port and wait for it; stop it again if it never answers."""
    port = free_port()
    config = write_config(
        workdir / "olah.toml", port=port, mirror_root=mirror_root, repos_path=workdir / "repos"
    )
    log_file = workdir / f"olah-{port}.out"
    command = [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(workdir / "logs")]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_file, timeout)
    except BaseException:
        stop(process)
        raise
    return process, url, log_file


@contextlib.contextmanager
def running_olah(
    mirror_root: Path, workdir: Path, *, timeout: float = STARTUP_TIMEOUT_S, attempts: int = 3
) -> Iterator[OlahServer]:
    """Start olah serving `mirror_root` (layout: models/ORG/NAME git repositories); stop it on exit.

    A start is retried on a new port, since another process may take the free port before olah binds it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    mirror_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            process, url, log_file = launch(mirror_root, workdir, timeout)
            break
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    try:
        yield OlahServer(url=url, mirror_root=mirror_root, log_file=log_file)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def olah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahServer]:
    """One olah for the whole session, serving an initially empty mirrors directory."""
    root = tmp_path_factory.mktemp("olah")
    with running_olah(root / "mirrors", root / "server") as server:
        yield server
