"""Shared fixtures for the Python-side tests: paths to our binaries, ../shared data, helpers."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, os.environ.get("RESAFE_BUILD", "build"))
SHARED = os.path.abspath(os.environ.get("RESAFE_SHARED", os.path.join(ROOT, "..", "shared")))


def resafe_bin():
    return os.path.join(BUILD, "resafe")


def unit_bin():
    return os.path.join(BUILD, "test_unit")


def run_resafe(*args, check=True, timeout=600, env=None):
    """Run build/resafe with args; returns CompletedProcess (text). check=True asserts rc == 0."""
    p = subprocess.run([resafe_bin(), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"resafe {' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def shared_data(name):
    """Path to a file in ../shared/data; skips the test when ../shared is absent."""
    path = os.path.join(SHARED, "data", name)
    if not os.path.exists(path):
        pytest.skip(f"needs ../shared/data/{name} (not present)")
    return path


def gpu_enabled():
    return os.environ.get("RESAFE_TEST_GPU") == "1"


@pytest.fixture
def rng_seed():
    """A fresh random seed per test run, printed so a failure can be replayed."""
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed} (replay with RESAFE_TEST_SEED={seed})")
    return seed
