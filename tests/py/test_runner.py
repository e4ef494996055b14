"""tests/run.py --gpu-only (what `make test-gpu` runs on a device): it must select exactly the GPU
tests, so that a device call spends its minutes on them and none is left out. Independent check:
run without RESAFE_TEST_GPU, every selected Python test skips with the GPU reason; every test of a
*_gpu*.py module and every C unit test of the CUDA backend is selected; CPU tests whose ids merely
mention cuda (a config file named enum_bad_backend__cuda.ini) are not."""
import glob
import os
import subprocess
import sys

from conftest import ROOT, unit_bin

RUN = os.path.join(ROOT, "tests", "run.py")


def collect(cmd):
    env = {k: v for k, v in os.environ.items() if k != "RESAFE_TEST_GPU"}
    p = subprocess.run([sys.executable, *cmd, "--collect-only"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    return [l.strip() for l in p.stdout.splitlines() if "::" in l]


def test_gpu_only_selects_exactly_the_gpu_tests():
    selected = collect([RUN, "--gpu-only"])
    assert selected and len(selected) == len(set(selected))
    gpu_modules = sorted(os.path.relpath(f, ROOT)
                         for f in glob.glob(os.path.join(ROOT, "tests", "py", "*_gpu*.py")))
    assert len(gpu_modules) >= 10
    every = collect(["-m", "pytest", "-q", "-p", "no:cacheprovider", *gpu_modules])
    assert {e.split("::")[0] for e in every} == set(gpu_modules)
    assert set(every) <= set(selected)
    names = subprocess.run([unit_bin(), "--list"], capture_output=True, text=True).stdout.split()
    cuda_units = {f"tests/py/test_unit.py::test_c_unit[{n}]" for n in names
                  if n.startswith("test_cuda")}
    assert cuda_units <= set(selected)
    assert not any("enum_bad_backend__cuda" in s for s in selected)
    # the Python ones (C unit tests report PASS without a GPU, so they cannot show a skip)
    py = [s for s in selected if not s.startswith("tests/py/test_unit.py")]
    env = {k: v for k, v in os.environ.items() if k != "RESAFE_TEST_GPU"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        *py], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    tail = p.stdout.strip().splitlines()[-1]
    assert "passed" not in tail and "failed" not in tail and f"{len(py)} skipped" in tail, tail
    reasons = [l for l in p.stdout.splitlines() if l.startswith("SKIPPED")]
    assert reasons and all("RESAFE_TEST_GPU" in l for l in reasons), reasons
