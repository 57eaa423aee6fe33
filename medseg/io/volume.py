"""Volumes with their patient geometry, read from and written to NIfTI and NRRD.

A :class:`Volume` is a voxel array in file order ``(i, j, k)`` plus the 4x4 affine
that maps voxel indices to RAS+ world coordinates in mm (the NIfTI convention).
Spacing, origin and direction in ITK's LPS convention are derived from it.
Writers copy the grid of a source volume and check it before writing.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import (
    GeometryError,
    InputNotFoundError,
    OutputError,
    UnreadableFileError,
    UnsupportedInputError,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_suffix(path: str | Path) -> str | None:
    """The volume-format suffix of ``path`` (``.nii.gz``, ``.nrrd``...), or None."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return ".seg.nrrd"
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def case_name(path: str | Path) -> str:
    """File name without its volume suffix: ``case.nii.gz`` -> ``case``."""
    path = Path(path)
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    source: str | None = None
    header: Any = field(default=None, repr=False)
    """The source NIfTI header, kept so that outputs reproduce qform/sform exactly."""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def direction_lps(self) -> np.ndarray:
        lps = LPS_TO_RAS @ self.affine
        return lps[:3, :3] / self.spacing

    @property
    def origin_lps(self) -> np.ndarray:
        return (LPS_TO_RAS @ self.affine)[:3, 3]

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A new volume with ``array`` on this volume's grid."""
        if tuple(array.shape[:3]) != self.shape:
            raise GeometryError("array does not fit the source grid", path=self.source,
                                expected=str(self.shape), found=str(tuple(array.shape)),
                                fix="map the array back to the source grid before writing")
        return Volume(array, self.affine.copy(), source=self.source, header=self.header,
                      meta={**self.meta, **meta})


def same_grid(a: Volume, b: Volume, atol: float = 1e-4) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)


def check_same_grid(out: Volume, ref: Volume, what: str = "output", atol: float = 1e-4) -> None:
    """Raise :class:`GeometryError` unless ``out`` lies on exactly ``ref``'s grid."""
    if out.shape != ref.shape:
        raise GeometryError(f"{what} shape differs from the source", path=ref.source,
                            expected=str(ref.shape), found=str(out.shape),
                            fix="resample onto the source grid")
    if not np.allclose(out.affine, ref.affine, atol=atol):
        diff = float(np.abs(out.affine - ref.affine).max())
        raise GeometryError(f"{what} affine differs from the source by {diff:.3g} mm", path=ref.source,
                            expected=np.array2string(ref.affine, precision=4),
                            found=np.array2string(out.affine, precision=4),
                            fix="resample onto the source grid")


# ---------------------------------------------------------------------------
# reading


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        raise UnsupportedInputError("image is 2D", path=path, expected="a 3D volume",
                                    found=f"shape {array.shape}",
                                    fix="use a 2D model for 2D images, or stack slices into a volume")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise UnsupportedInputError("image has more than one channel or time point", path=path,
                                    expected="a single 3D volume", found=f"shape {array.shape}",
                                    fix="split it into 3D volumes (e.g. fslsplit) and pass the one the model expects")
    return array


def _check_finite_geometry(affine: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(affine)):
        raise UnreadableFileError("header geometry contains NaN or Inf", path=path,
                                  expected="a finite voxel-to-world affine", found=str(affine.tolist()),
                                  fix="repair the header (spacing, origin, direction)")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12:
        raise UnreadableFileError("header has zero or degenerate voxel spacing", path=path,
                                  expected="positive spacing and an invertible direction",
                                  found=f"spacing {np.round(spacing, 6).tolist()}",
                                  fix="repair the header (pixdim / space directions)")


def load_volume(path: str | Path, *, dtype: Any = None) -> Volume:
    """Read a NIfTI, NRRD or MetaImage volume with its geometry."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("file not found", path=path, expected="an existing NIfTI or NRRD file",
                                 fix="check the path")
    suffix = volume_suffix(path)
    if suffix is None:
        raise UnsupportedInputError("unknown volume format", path=path,
                                    expected=" or ".join(VOLUME_SUFFIXES), found=repr(path.suffix),
                                    fix="convert the file to NIfTI or NRRD")
    if path.stat().st_size == 0:
        raise UnreadableFileError("file is empty (0 bytes)", path=path, fix="re-export or re-copy the file")
    if suffix in NIFTI_SUFFIXES:
        vol = _load_nifti(path)
    else:
        vol = _load_itk(path)
    _check_finite_geometry(vol.affine, path)
    if dtype is not None:
        vol.array = vol.array.astype(dtype, copy=False)
    return vol


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as exc:
        raise UnreadableFileError("cannot read NIfTI file", path=path, expected="a complete NIfTI-1/2 file",
                                  found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                                  fix="re-export the file; it may be truncated or not NIfTI") from None
    array = _squeeze_to_3d(np.asarray(array), path)
    affine = img.affine
    return Volume(array, affine, source=str(path), header=img.header.copy(), meta={"format": "nifti"})


def _load_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UnreadableFileError("cannot read image file", path=path, expected="a complete NRRD/MetaImage file",
                                  found=(first[-1] if first else "read error")[:200],
                                  fix="re-export the file; it may be truncated or of another format") from None
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise UnsupportedInputError("image has several components per voxel", path=path,
                                    expected="one scalar per voxel",
                                    found=f"{img.GetNumberOfComponentsPerPixel()} components",
                                    fix="extract the channel the model expects")
    dim = img.GetDimension()
    if dim == 2:
        raise UnsupportedInputError("image is 2D", path=path, expected="a 3D volume", found=f"size {img.GetSize()}",
                                    fix="use a 2D model for 2D images")
    if dim > 3:
        size = img.GetSize()
        if all(s == 1 for s in size[3:]):
            img = img[:, :, :, 0] if dim == 4 else img
        else:
            raise UnsupportedInputError("image has more than three dimensions", path=path,
                                        expected="a single 3D volume", found=f"size {size}",
                                        fix="split it into 3D volumes")
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    affine = affine_from_itk(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return Volume(np.ascontiguousarray(array), affine, source=str(path), meta={"format": "itk"})


def affine_from_itk(spacing, origin, direction) -> np.ndarray:
    """RAS+ voxel-to-world affine from ITK (LPS) spacing, origin and direction."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


# ---------------------------------------------------------------------------
# writing


def _temp_path(target: Path) -> Path:
    suffix = volume_suffix(target) or target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{case_name(target)}.", suffix=".part" + suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import, before any worker thread exists


def atomic_write(target: str | Path, writer) -> Path:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``target``.

    The temporary file lies in the target folder (same file system), so the rename is
    atomic: readers see either no file or the complete one.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError("cannot create output folder", path=target.parent, found=exc.strerror,
                          fix="choose a writable output folder") from None
    if not os.access(target.parent, os.W_OK):
        raise OutputError("output folder is not writable", path=target.parent,
                          fix="choose a writable output folder")
    tmp = _temp_path(target)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def save_volume(vol: Volume, path: str | Path, *, reference: Volume | None = None) -> Path:
    """Write ``vol`` atomically to NIfTI or NRRD (by suffix).

    With ``reference``, first check that ``vol`` lies on exactly the reference grid.
    """
    path = Path(path)
    if reference is not None:
        check_same_grid(vol, reference)
        if reference.source and Path(reference.source).resolve() == path.resolve():
            raise OutputError("output path equals the input path", path=path,
                              fix="write to another folder; inputs are never overwritten")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return atomic_write(path, lambda tmp: _write_nifti(vol, tmp))
    if suffix in ITK_SUFFIXES or suffix == ".seg.nrrd":
        return atomic_write(path, lambda tmp: _write_itk(vol, tmp))
    raise OutputError("unknown output format", path=path, expected=" or ".join(VOLUME_SUFFIXES),
                      found=repr(path.suffix), fix="use a .nii.gz or .nrrd file name")


def _write_nifti(vol: Volume, tmp: Path) -> None:
    import nibabel as nib

    array = vol.array
    if vol.header is not None and isinstance(vol.header, nib.Nifti1Header):
        header = vol.header.copy()
        header.set_data_dtype(array.dtype)
        img = nib.Nifti1Image(array, None, header=header)
        # keep the source's qform/sform (codes and matrices) so every reader sees the same grid
        sform, scode = vol.header.get_sform(coded=True)
        qform, qcode = vol.header.get_qform(coded=True)
        if sform is not None and int(scode) > 0:
            img.set_sform(vol.affine, int(scode))
        else:
            img.set_sform(vol.affine, 0)
        if qform is not None and int(qcode) > 0:
            img.set_qform(qform, int(qcode))
        elif int(scode) <= 0:
            img.set_qform(vol.affine, 1)
        img.header["scl_slope"] = 1.0
        img.header["scl_inter"] = 0.0
        img.header["cal_min"] = 0.0
        img.header["cal_max"] = 0.0
    else:
        img = nib.Nifti1Image(array, vol.affine)
        img.set_qform(vol.affine, 1)
        img.set_sform(vol.affine, 1)
    nib.save(img, str(tmp))


def _write_itk(vol: Volume, tmp: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in vol.spacing])
    img.SetOrigin([float(o) for o in vol.origin_lps])
    img.SetDirection([float(d) for d in vol.direction_lps.reshape(-1)])
    sitk.WriteImage(img, str(tmp), useCompression=True)
