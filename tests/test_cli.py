"""The `zoo` console script, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zoo import __version__
from zoo.cli import main

ZOO = Path(sys.executable).with_name("zoo")


def test_help_lists_the_commands() -> None:
    out = subprocess.run([str(ZOO), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "usage: zoo" in out and "demo" in out


def test_version() -> None:
    out = subprocess.run([str(ZOO), "--version"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert __version__ in out


def test_unknown_command_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
