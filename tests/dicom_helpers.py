"""Helpers shared by the DICOM tests: synthetic DICOM writers and the dcm2niix reference converter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR, CT, ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SECRETS = ("Secret^Patient", "ID-SECRET-42", "19010203")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FIELD = np.array([0.3, -0.7, 1.1])  # value = FIELD . P + 5 for patient position P (LPS mm)


# ---------------------------------------------------------------------------
# writing synthetic DICOM


def dataset(sop_class: str = MR, *, series_uid: str, study_uid: str = "1.2.3.4", **attrs) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRETS
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT" if sop_class == CT else "MR", 7, "synthetic"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()


def write_series(folder: Path, slices, positions, iop=AXIAL, spacing=(1.0, 1.0), *, series_uid=None,
                 instances=None, names=None, sop_class=MR, **attrs) -> list[Path]:
    """One file per (rows, cols) slice at the given ImagePositionPatient values."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for k, (pixels, pos) in enumerate(zip(slices, positions)):
        ds = dataset(sop_class, series_uid=series_uid, **attrs)
        ds.InstanceNumber = (instances or range(1, len(slices) + 1))[k]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = 1.0
        set_pixels(ds, pixels)
        path = folder / (names[k] if names else f"slice{k:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plain_slices(n: int, rows: int = 6, cols: int = 5, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, (rows, cols)).astype(np.int16) for _ in range(n)]


def linear_slices(positions, iop, spacing, rows, cols) -> list[np.ndarray]:
    """Stored values round(100 * field) (RescaleSlope 0.01) with a one-pixel padding border of -32000."""
    col_dir, row_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    r, c = np.mgrid[0:rows, 0:cols]
    out = []
    for pos in positions:
        world = np.asarray(pos) + c[..., None] * spacing[1] * col_dir + r[..., None] * spacing[0] * row_dir
        img = np.round(100 * (world @ FIELD + 5)).astype(np.int16)
        img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = -32000
        out.append(img)
    return out


def check_linear_field(vol, positions, iop, spacing, rows, cols) -> int:
    """Every voxel interpolated from non-padding pixels holds the field at its world position."""
    ijk = np.indices(vol.shape).reshape(3, -1)
    world = (LPS @ vol.affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3].T
    col_dir, row_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(col_dir, row_dir)
    pos = np.asarray(positions, float)
    pos = pos[np.argsort(pos @ normal)]
    t, tk = world @ normal, pos @ normal
    hi = np.clip(np.searchsorted(tk, t - 1e-6), 1, len(tk) - 1)
    inside = (t >= tk[0] - 1e-4) & (t <= tk[-1] + 1e-4)
    for k in (hi - 1, hi):  # both slices the voxel is interpolated from
        rel = world - pos[k]
        r, c = rel @ row_dir / spacing[0], rel @ col_dir / spacing[1]
        inside &= (r >= 1 - 1e-4) & (r <= rows - 2 + 1e-4) & (c >= 1 - 1e-4) & (c <= cols - 2 + 1e-4)
    expected = world @ FIELD + 5
    got = vol.array.reshape(-1).astype(np.float64)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(got[inside], expected[inside], atol=0.011)
    return int(inside.sum())


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, secret


# ---------------------------------------------------------------------------
# dcm2niix, the reference converter


def _dcm2niix_found() -> list[tuple[int, str]]:
    found = set()
    for exe in (str(Path(sys.executable).parent / "dcm2niix"), shutil.which("dcm2niix")):
        if not exe or not os.access(exe, os.X_OK):
            continue
        try:
            text = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if m := re.search(r"v1\.0\.(\d{8})", text):
            found.add((int(m.group(1)), exe))
    return sorted(found)




def convert(exe: str, src: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(src)], check=True,
                   capture_output=True, timeout=300)
    return sorted(out.glob("*.nii"))


def canonical(array: np.ndarray, affine: np.ndarray):
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def compare_with_reference(vol, nii: Path):
    ref = nib.as_closest_canonical(nib.load(nii))
    ours, ours_affine = canonical(vol.array, vol.affine)
    assert ours.shape == ref.shape
    return ours, ref.get_fdata(), float(np.abs(ours_affine - ref.affine).max())


def dciodvfy_errors(path) -> list[str]:
    """The errors David Clunie's ``dciodvfy`` (Debian package dicom3tools) finds in a DICOM file; skips the test
    where it is not installed (``.ci/run`` installs it)."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
