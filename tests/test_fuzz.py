"""Bounded, derandomized fuzzing of DICOM headers, NIfTI headers, affines and NRRD headers.

Every fuzzed file is either read into a sane volume or refused with a MedsegError; any other
exception fails. ``python benchmarks/fuzz.py --examples N`` runs the same targets for longer.
"""

from __future__ import annotations

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings

#: CI budget: a few seconds per target on 2 shared cores, the same examples on every run.
CI_EXAMPLES = {"dicom": 40, "nifti": 80, "affine": 60, "nrrd": 60}


def _bounded(name: str):
    strategy, check = TARGETS[name]
    return settings(max_examples=CI_EXAMPLES[name], derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(check))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzzed_files_are_read_or_refused_with_medseg_error(name):
    _bounded(name)()
