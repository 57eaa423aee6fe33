"""Longer fuzzing than the test suite runs: every target with N random examples.

    python benchmarks/fuzz.py --examples 2000              # all targets
    python benchmarks/fuzz.py --examples 500 --target dicom --seed 7

Each example writes one fuzzed file (DICOM series headers, NIfTI header, affine, NRRD header)
and reads it with medseg; it must be read into a sane volume or refused with a MedsegError.
A failure prints hypothesis' shrunk example and exits 1. The targets live in
tests/fuzz_targets.py and the bounded CI run in tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))


def _counting(check, counter: dict):
    def counted(case) -> None:
        counter["n"] += 1
        check(case)

    return counted


def main() -> int:
    from fuzz_targets import TARGETS
    from hypothesis import HealthCheck, given, seed, settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="examples per target (default 1000)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    failed = []
    for name in args.target or sorted(TARGETS):
        strategy, check = TARGETS[name]
        counter = {"n": 0}

        counted = _counting(check, counter)

        test = settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))(given(strategy)(counted))
        if args.seed is not None:
            test = seed(args.seed)(test)
        t0 = time.perf_counter()
        try:
            test()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report and go on with the other targets
            status = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            failed.append(name)
        print(f"{name:7s} {counter['n']:6d} examples in {time.perf_counter() - t0:6.1f} s: {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
