"""Generators of broken, hostile or unsupported inputs, shared by the bad-input tests and the soak script.

Each generator writes one input under a folder of its own and returns the path to hand to
``medseg predict``/``convert`` plus a fragment the error message must contain. All files are
tiny (a few kB) so that a whole matrix runs in seconds.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_helpers import BASIC_TEXT_SR, dataset, plain_slices, write_series
from pydicom.uid import generate_uid

SHAPE = (20, 24, 16)
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass
class Bad:
    path: Path
    """What to pass to the command (a file or a series folder)."""
    fragment: str
    """Part of the one-line message that says what is wrong."""
    dicom: bool = False


def good_array(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.normal(100, 10, shape).astype(np.float32)
    arr[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2, shape[2] // 4: shape[2] // 2] += 300
    return arr


def good_nifti(path: Path, shape=SHAPE, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(good_array(shape, seed), np.diag([1.0, 1.0, 1.2, 1.0])), str(path))
    return path


def good_nrrd(path: Path, shape=SHAPE, seed: int = 0) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(good_array(shape, seed).transpose(2, 1, 0))
    img.SetSpacing((1.0, 1.0, 1.2))
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def good_dicom(folder: Path, n: int = 8, seed: int = 0) -> list[Path]:
    return write_series(folder, plain_slices(n, rows=24, cols=20, seed=seed), [(0.0, 0.0, 1.5 * k) for k in range(n)],
                        spacing=(1.0, 1.0))


# ---------------------------------------------------------------------------
# volume files


def _truncated_nifti_gz(d: Path) -> Bad:
    p = good_nifti(d / "truncated.nii.gz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return Bad(p, "cannot read NIfTI")


def _truncated_nifti_raw(d: Path) -> Bad:
    p = good_nifti(d / "short.nii")
    data = p.read_bytes()
    p.write_bytes(data[: 352 + 100])  # header intact, voxel data mostly missing
    return Bad(p, "cannot read NIfTI")


def _corrupt_nifti(d: Path) -> Bad:
    p = d / "garbage.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(gzip.compress(np.random.default_rng(1).bytes(4000)))
    return Bad(p, "cannot read NIfTI")


def _not_gzip_nifti(d: Path) -> Bad:
    p = d / "notgzip.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"this is a text file, not an image\n" * 20)
    return Bad(p, "cannot read NIfTI")


def _zero_byte_nifti(d: Path) -> Bad:
    p = d / "empty.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return Bad(p, "empty (0 bytes)")


def _zero_byte_nrrd(d: Path) -> Bad:
    p = d / "empty.nrrd"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return Bad(p, "empty (0 bytes)")


def _truncated_nrrd(d: Path) -> Bad:
    p = good_nrrd(d / "truncated.nrrd")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return Bad(p, "cannot read")


def _corrupt_nrrd_header(d: Path) -> Bad:
    p = d / "badheader.nrrd"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 20 24 -16\nencoding: raw\n\n" + b"\0" * 100)
    return Bad(p, "cannot read")


def _nan_voxels(d: Path) -> Bad:
    p = d / "nan.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = good_array()
    arr[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    return Bad(p, "NaN or Inf")


def _inf_voxels(d: Path) -> Bad:
    p = d / "inf.nrrd"
    good_nrrd(p)
    import SimpleITK as sitk

    img = sitk.ReadImage(str(p))
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(p), useCompression=True)
    return Bad(p, "NaN or Inf")


def _image_2d(d: Path) -> Bad:
    p = d / "slice2d.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(good_array()[:, :, 0], np.eye(4)), str(p))
    return Bad(p, "image is 2D")


def _image_4d(d: Path) -> Bad:
    p = d / "timeseries.nii.gz"
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.stack([good_array(seed=s) for s in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    return Bad(p, "more than one channel or time point")


def _multichannel_nrrd(d: Path) -> Bad:
    import SimpleITK as sitk

    p = d / "rgb.nrrd"
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.stack([good_array()] * 3, axis=-1).transpose(2, 1, 0, 3)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
    sitk.WriteImage(img, str(p))
    return Bad(p, "several components per voxel")


def patch_nifti_header(path: Path, **fields) -> Path:
    """Overwrite raw NIfTI-1 header fields (bypassing nibabel's consistency fixes on save)."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]))
    for key, value in fields.items():
        hdr[key] = value
    raw = hdr.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _zero_spacing_nifti(d: Path) -> Bad:
    p = good_nifti(d / "zerospacing.nii.gz")
    # qform from pixdim with a zero spacing, no sform
    patch_nifti_header(p, pixdim=[1.0, 1.0, 0.0, 1.2, 0, 0, 0, 0], qform_code=1, sform_code=0)
    return Bad(p, "spacing")


def _negative_spacing_nifti(d: Path) -> Bad:
    p = good_nifti(d / "negspacing.nii.gz")
    patch_nifti_header(p, pixdim=[1.0, -1.0, 1.0, 1.2, 0, 0, 0, 0], qform_code=1, sform_code=0)
    return Bad(p, "spacing")


def _negative_spacing_nrrd(d: Path) -> Bad:
    p = d / "zerospacing.nrrd"
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = good_array().transpose(2, 1, 0).astype("<f4").tobytes()
    header = (b"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 20 24 16\n"
              b"space directions: (1,0,0) (0,0,0) (0,0,-1)\nendian: little\nencoding: raw\n"
              b"space origin: (0,0,0)\n\n")
    p.write_bytes(header + raw)
    return Bad(p, "spacing")


def _nan_affine(d: Path) -> Bad:
    p = good_nifti(d / "nanaffine.nii.gz")
    patch_nifti_header(p, srow_x=[1.0, 0.0, 0.0, np.nan], qform_code=0, sform_code=2)
    return Bad(p, "NaN or Inf")


def _unknown_suffix(d: Path) -> Bad:
    p = d / "scan.img.bak"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * 1000)
    return Bad(p, "no images found")


# ---------------------------------------------------------------------------
# DICOM


def _dicom_truncated_pixels(d: Path) -> Bad:
    """Every slice's pixel data cut short (one truncated slice alone is a missing slice, interpolated by default)."""
    files = good_dicom(d / "series")
    for f in files:
        f.write_bytes(f.read_bytes()[:-300])
    return Bad(d / "series", "no slice of the series can be decoded", dicom=True)


def _dicom_zero_byte(d: Path) -> Bad:
    folder = d / "series"
    folder.mkdir(parents=True)
    (folder / "IM0001.dcm").write_bytes(b"")
    (folder / "IM0002.dcm").write_bytes(b"")
    return Bad(folder, "0-byte", dicom=True)


def _dicom_corrupt_header(d: Path) -> Bad:
    """Every file's header scrambled (one damaged file beside good slices is left out, not a failure)."""
    files = good_dicom(d / "series")
    for n, f in enumerate(files):
        data = bytearray(f.read_bytes())
        data[140:400] = np.random.default_rng(3 + n).bytes(260)
        f.write_bytes(bytes(data))
    return Bad(d / "series", "cannot read DICOM header", dicom=True)


def _dicom_sr(d: Path) -> Bad:
    folder = d / "series"
    folder.mkdir(parents=True)
    sr = dataset(BASIC_TEXT_SR, series_uid=generate_uid())
    sr.Modality = "SR"
    sr.save_as(folder / "report.dcm", enforce_file_format=True)
    return Bad(folder, "SR document", dicom=True)


def _dicom_pdf(d: Path) -> Bad:
    folder = d / "series"
    folder.mkdir(parents=True)
    ds = dataset(ENCAPSULATED_PDF, series_uid=generate_uid())
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(folder / "doc.dcm", enforce_file_format=True)
    return Bad(folder, "encapsulated document", dicom=True)


def _dicom_presentation_state(d: Path) -> Bad:
    folder = d / "series"
    folder.mkdir(parents=True)
    ds = dataset(GRAYSCALE_PR, series_uid=generate_uid())
    ds.Modality = "PR"
    ds.save_as(folder / "pr.dcm", enforce_file_format=True)
    return Bad(folder, "presentation state", dicom=True)


def _dicom_single_slice(d: Path) -> Bad:
    good_dicom(d / "series", n=1)
    return Bad(d / "series", "single slice", dicom=True)


def _dicom_4d(d: Path) -> Bad:
    n = 4
    pos = [(0.0, 0.0, 1.5 * k) for k in range(n)] * 2
    write_series(d / "series", plain_slices(2 * n, rows=24, cols=20), pos)
    return Bad(d / "series", "4D series", dicom=True)


def _dicom_zero_pixel_spacing(d: Path) -> Bad:
    write_series(d / "series", plain_slices(6, rows=24, cols=20), [(0.0, 0.0, 1.5 * k) for k in range(6)],
                 spacing=(0.0, 1.0))
    return Bad(d / "series", "spacing", dicom=True)


def _dicom_same_position(d: Path) -> Bad:
    write_series(d / "series", plain_slices(5, rows=24, cols=20), [(0.0, 0.0, 0.0)] * 5)
    return Bad(d / "series", "same", dicom=True)


#: kind -> generator(folder) -> Bad. Every kind is an input that must be refused with a clear message.
BAD_INPUTS: dict[str, Callable[[Path], Bad]] = {
    "nifti-truncated-gz": _truncated_nifti_gz,
    "nifti-truncated-raw": _truncated_nifti_raw,
    "nifti-corrupt": _corrupt_nifti,
    "nifti-not-gzip": _not_gzip_nifti,
    "nifti-zero-bytes": _zero_byte_nifti,
    "nrrd-zero-bytes": _zero_byte_nrrd,
    "nrrd-truncated": _truncated_nrrd,
    "nrrd-corrupt-header": _corrupt_nrrd_header,
    "nan-voxels": _nan_voxels,
    "inf-voxels": _inf_voxels,
    "image-2d": _image_2d,
    "image-4d": _image_4d,
    "multichannel": _multichannel_nrrd,
    "zero-spacing": _zero_spacing_nifti,
    "negative-spacing": _negative_spacing_nifti,
    "nrrd-zero-spacing": _negative_spacing_nrrd,
    "nan-affine": _nan_affine,
    "unknown-format": _unknown_suffix,
    "dicom-truncated-pixels": _dicom_truncated_pixels,
    "dicom-zero-bytes": _dicom_zero_byte,
    "dicom-corrupt-header": _dicom_corrupt_header,
    "dicom-sr": _dicom_sr,
    "dicom-pdf": _dicom_pdf,
    "dicom-presentation-state": _dicom_presentation_state,
    "dicom-single-slice": _dicom_single_slice,
    "dicom-4d": _dicom_4d,
    "dicom-zero-pixel-spacing": _dicom_zero_pixel_spacing,
    "dicom-same-position": _dicom_same_position,
}


def make_bad(kind: str, folder: Path) -> Bad:
    folder.mkdir(parents=True, exist_ok=True)
    return BAD_INPUTS[kind](folder)
