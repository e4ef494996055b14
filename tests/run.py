#!/usr/bin/env python3
"""resafe test runner: runs the C unit tests and the Python reference tests (pytest) and prints
a final line "N passed, M failed, K skipped".

  python3 tests/run.py            # everything that needs no GPU
  python3 tests/run.py --gpu      # the GPU tests (RESAFE_TEST_GPU=1, on a CUDA machine)
  python3 tests/run.py -k tokenizer   # pass-through to pytest
"""
import os
import sys

import pytest


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
    if "--gpu" in args:
        args.remove("--gpu")
        os.environ["RESAFE_TEST_GPU"] = "1"
    counter = Counter()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-rfE", os.path.join(here, "py")] + args,
                     plugins=[counter])
    print(f"{counter.passed} passed, {counter.failed} failed, {counter.skipped} skipped")
    if rc == 5 or counter.passed == 0:  # nothing ran is a failure, not a pass
        return 1
    return 0 if counter.failed == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
