#!/usr/bin/env python3
"""resafe test runner: runs the C unit tests and the Python reference tests (pytest) and prints
a final line "N passed, M failed, K skipped".

  python3 tests/run.py            # everything that needs no GPU
  python3 tests/run.py --gpu      # everything, GPU tests included (RESAFE_TEST_GPU=1)
  python3 tests/run.py --gpu-only # only the GPU tests (make test-gpu): the *_gpu*.py modules
                                  # and the tests with "cuda" in their id
  python3 tests/run.py -k tokenizer   # pass-through to pytest
"""
import os
import re
import sys

import pytest


def is_gpu_test(nodeid):
    """The tests that skip without RESAFE_TEST_GPU=1: a *_gpu*.py module, the C unit tests
    test_cuda_*, and cases parametrized by the cuda backend (test_merge's "[cuda-...]")."""
    module, _, name = nodeid.partition("::")
    return ("_gpu" in os.path.basename(module) or "[test_cuda_" in name
            or re.search(r"[\[-]cuda[\]-]", name) is not None)


class GpuOnly:
    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if is_gpu_test(i.nodeid)]
        drop = [i for i in items if not is_gpu_test(i.nodeid)]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Counter:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            if report.passed:
                self.passed += 1
            elif report.failed:
                self.failed += 1
            elif report.skipped:
                self.skipped += 1
        elif report.failed:  # setup/teardown errors count as failures
            self.failed += 1
        elif report.skipped and report.when == "setup":
            self.skipped += 1

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed += 1


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = sys.argv[1:]
    counter = Counter()
    plugins = [counter]
    if "--gpu-only" in args:
        args.remove("--gpu-only")
        os.environ["RESAFE_TEST_GPU"] = "1"
        plugins.append(GpuOnly())
    if "--gpu" in args:
        args.remove("--gpu")
        os.environ["RESAFE_TEST_GPU"] = "1"
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rfE", os.path.join(here, "py")] + args,
                     plugins=plugins)
    print(f"{counter.passed} passed, {counter.failed} failed, {counter.skipped} skipped")
    if rc == 5 or counter.passed == 0:  # nothing ran is a failure, not a pass
        return 1
    return 0 if counter.failed == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
