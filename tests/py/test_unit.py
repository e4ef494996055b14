"""Runs each C unit test (build/test_unit) as its own process, so one crash fails one test."""
import subprocess

import pytest

from conftest import unit_bin


def _names():
    try:
        out = subprocess.run([unit_bin(), "--list"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:  # missing binary: one failing test
        return [f"__build_missing__ ({e})"]
    return [n for n in out.stdout.split() if n]


@pytest.mark.parametrize("name", _names())
def test_c_unit(name):
    assert not name.startswith("__build_missing__"), f"build/test_unit unavailable: {name}"
    p = subprocess.run([unit_bin(), "--run", name], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"PASS {name}" in p.stdout, p.stdout + p.stderr
