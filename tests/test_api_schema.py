"""Schemathesis over /openapi.json against the real server: no 5xx, and every response matches its schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from api_support import Server, serving, tiny_repo_once

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    repo = tiny_repo_once(tmp_path_factory.getbasetemp())
    with serving(refs=(str(repo),), max_files=4, max_body_bytes=2**20) as s:
        yield s


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(server: Server, tmp_path: Path) -> None:
    # the served name, so that generated requests reach the inference code rather than stopping at a 404
    # (unknown names are covered by test_api.py)
    (tmp_path / "schemathesis.toml").write_text('[parameters]\n"path.name" = "tiny-prior"\n')
    junit = tmp_path / "junit.xml"
    checks = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
    out = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         f"{server.url}/openapi.json", "--checks", checks, "--max-examples", "20",
         "--generation-deterministic", "--request-timeout", "30", "--no-color",
         "--report-junit-path", str(junit)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "failed" not in out.stdout.split("SUMMARY")[-1]
    # every operation of the API was exercised, the inference routes included
    for path in ("/v1/models/{name}/predict", "/v2/models/{name}/infer", "/v1/models", "/health/ready"):
        assert path in junit.read_text(), path
