"""Copies of DICOM instances in hospital exports: files with the same SOPInstanceUID are one instance. A readable copy
is used, the others are recorded; copies whose pixels differ are refused by name; an unreadable file nobody needs
never fails a series."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from conftest import FAST_MODEL, run_cli
from dicom_helpers import plain_slices, write_series

from medseg.core.errors import UnreadableFileError
from medseg.io.dicom import load_dicom_series, scan_dicom


def _two_series(root):
    a = write_series(root / "patient" / "A", plain_slices(6, 48, 40, seed=1), [(0.0, 0.0, 2.0 * k) for k in range(6)],
                     spacing=(1.0, 1.0))
    b = write_series(root / "patient" / "B", plain_slices(6, 48, 40, seed=2), [(0.0, 0.0, 2.0 * k) for k in range(6)],
                     spacing=(1.0, 1.0))
    return a, b


def test_truncated_copy_elsewhere_does_not_sink_the_series(tmp_path):
    """The issue's tree: two intact series, and elsewhere a copy of one of their files cut to its first 3,000 bytes
    (same SOPInstanceUID). The copy is found first (its folder sorts first), yet the series loads from the intact
    file, and the copy is named in the record."""
    a, _ = _two_series(tmp_path)
    (tmp_path / "AAA_copies").mkdir()
    (tmp_path / "AAA_copies" / "copy.dcm").write_bytes(a[2].read_bytes()[:3000])
    stacks = [s for s in scan_dicom(tmp_path) if s.usable]
    assert len(stacks) == 2 and all(s.n_files == 6 for s in stacks)
    (sa,) = [s for s in stacks if s.duplicates]
    vol = load_dicom_series(sa)
    expected = load_dicom_series(tmp_path / "patient" / "A")
    np.testing.assert_array_equal(vol.array, expected.array)
    (dup,) = vol.meta["duplicates"]
    assert {dup[0], dup[1]} == {"copy.dcm", a[2].name} and ("unreadable copy" in dup[2] or dup[2] == "identical copy")
    assert "+1 duplicate copies" in sa.describe()


def test_identical_copies_are_one_instance(tmp_path):
    a, _ = _two_series(tmp_path)
    shutil.copy(a[0], tmp_path / "patient" / "A" / "zz_copy.dcm")
    (info,) = [s for s in scan_dicom(tmp_path / "patient" / "A") if s.usable]
    assert info.n_files == 6 and info.n_slices == 6
    vol = load_dicom_series(info)
    assert vol.shape[2] == 6 and vol.meta["duplicates"] == [[a[0].name, "zz_copy.dcm", "identical copy"]]


def test_copies_that_differ_are_refused_naming_both(tmp_path):
    a, _ = _two_series(tmp_path)
    ds = pydicom.dcmread(a[3])
    arr = ds.pixel_array.copy()
    arr[0, 0] += 7
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "patient" / "A" / "zz_other.dcm")
    with pytest.raises(UnreadableFileError, match="different pixel data") as err:
        load_dicom_series(tmp_path / "patient" / "A")
    assert a[3].name in str(err.value) and "zz_other.dcm" in str(err.value)


def test_stray_unreadable_file_and_missing_slice(tmp_path):
    """A damaged file that is not needed never fails the series; one that carried a slice is a missing slice
    (interpolated by default, named in the record)."""
    a, _ = _two_series(tmp_path)
    (tmp_path / "patient" / "A" / "stray.dcm").write_bytes(bytes(128) + b"DICM" + bytes(200))
    vol = load_dicom_series(tmp_path / "patient" / "A")
    assert vol.shape[2] == 6 and not vol.meta["resampled"] and vol.meta["unreadable"][0][0] == "stray.dcm"
    a[2].write_bytes(a[2].read_bytes()[:3000])  # now a slice nobody else carries is unreadable
    vol = load_dicom_series(tmp_path / "patient" / "A")
    assert vol.shape[2] == 6 and vol.meta["resampled"]
    assert [u[0] for u in vol.meta["unreadable"]] == [a[2].name, "stray.dcm"] or \
        sorted(u[0] for u in vol.meta["unreadable"]) == sorted([a[2].name, "stray.dcm"])


def test_batch_segments_every_intact_series_and_records_duplicates(tmp_path):
    a, _ = _two_series(tmp_path / "in")
    (tmp_path / "in" / "AAA_copies").mkdir()
    (tmp_path / "in" / "AAA_copies" / "copy.dcm").write_bytes(a[2].read_bytes()[:3000])
    proc = run_cli("batch", tmp_path / "in", "-o", tmp_path / "out", *FAST_MODEL)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in rows if r.get("status") == "done"]
    assert len(done) == 2, rows
    assert sum(1 for r in done if r.get("duplicates")) == 1
    # file names are hashed in the manifest unless --record-paths (exports name files after patients too)
    text = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert "copy.dcm" not in text and "sha256:" in json.dumps([r["duplicates"] for r in done if r.get("duplicates")])


def test_rerun_reads_headers_only(tmp_path, monkeypatch):
    """A batch run again over finished series reads no pixel data: discovery reads headers, and the manifest's
    fingerprint (names, sizes, times) says the series are done."""
    import pydicom

    from medseg.apps.batch import run_batch

    _two_series(tmp_path / "in")
    first = run_batch(tmp_path / "in", tmp_path / "out", model="hippocampus-fast", device="cpu", progress=False)
    assert first.done == 2
    reads = {"pixels": 0, "headers": 0}
    original = pydicom.dcmread

    def counted(*args, **kwargs):
        reads["headers" if kwargs.get("stop_before_pixels") else "pixels"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)
    again = run_batch(tmp_path / "in", tmp_path / "out", model="hippocampus-fast", device="cpu", progress=False)
    assert again.already_done == 2 and again.done == 0
    assert reads["pixels"] == 0 and reads["headers"] == 12
