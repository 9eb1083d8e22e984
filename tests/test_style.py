"""The code style CI holds: ruff (pyproject's [tool.ruff]: no line over 110 characters, pyflakes)
clean over the whole tree."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    pytest.importorskip("ruff")  # a dev dependency: `uv sync` installs it
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_ruff_catches_a_long_line(tmp_path):
    """The gate can fail: a 111-character line under the project's config is reported."""
    pytest.importorskip("ruff")
    bad = tmp_path / "long.py"
    bad.write_text("x = " + repr("a" * 105) + "\n")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                          "--output-format", "concise", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "E501" in out.stdout
