"""Volumes with their patient geometry, read from and written to NIfTI and NRRD.

A :class:`Volume` is a voxel array in file order ``(i, j, k)`` plus the 4x4 affine
that maps voxel indices to RAS+ world coordinates in mm (the NIfTI convention).
Spacing, origin and direction in ITK's LPS convention are derived from it.
Writers copy the grid of a source volume and check it before writing.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.core.errors import (
    GeometryError,
    InputNotFoundError,
    MedsegError,
    OutputError,
    UnreadableFileError,
    UnsupportedInputError,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_SPACING_MM = 1e4
"""Voxels larger than 10 m are a broken header, not an image."""
MAX_ORIGIN_MM = 1e7
"""An origin 10 km away is a broken header too (and overflows float32 NIfTI fields)."""


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
    def channels(self) -> int:
        """Sequences stacked on a fourth axis (``(X, Y, Z, C)``, as MSD stores them); 1 for a 3D array."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

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


def background_value(array) -> float:
    """The value that fills the background of an image: the value all eight corner voxels share, else 0.

    Skull-stripped MR has 0 there; images normalised after skull stripping keep a constant fill that is
    not 0 (BraTS 2015's are about -3). Corners that differ (an unmasked image) give 0."""
    a = array[..., 0] if getattr(array, "ndim", 3) == 4 else array
    corners = [a[i, j, k] for i in (0, -1) for j in (0, -1) for k in (0, -1)]
    first = float(corners[0])
    return first if all(float(c) == first for c in corners) else 0.0


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


def _squeeze_to_3d(array: np.ndarray, path: Path, channels: bool = False) -> np.ndarray:
    if array.size == 0 or array.ndim < 2:
        raise UnsupportedInputError("image has no voxels or fewer than two dimensions", path=path,
                                    expected="a 3D volume", found=f"shape {array.shape}",
                                    fix="re-export the image; its header declares no 3D grid")
    if array.ndim == 2:
        raise UnsupportedInputError("image is 2D", path=path, expected="a 3D volume",
                                    found=f"shape {array.shape}",
                                    fix="use a 2D model for 2D images, or stack slices into a volume")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if channels and array.ndim == 4:
        return array
    if array.ndim > 3:
        raise UnsupportedInputError("image has more than one channel or time point", path=path,
                                    expected="a single 3D volume", found=f"shape {array.shape}",
                                    fix="split it into 3D volumes (e.g. fslsplit) and pass the one the model expects")
    return array


def check_finite_geometry(affine: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(affine)):
        raise UnreadableFileError("header geometry contains NaN or Inf", path=path,
                                  expected="a finite voxel-to-world affine", found=str(affine.tolist()),
                                  fix="repair the header (spacing, origin, direction)")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing > MAX_SPACING_MM) or np.any(np.abs(affine[:3, 3]) > MAX_ORIGIN_MM):
        raise UnreadableFileError("header geometry is implausibly large", path=path,
                                  expected=f"voxel spacing up to {MAX_SPACING_MM:g} mm and an origin within "
                                           f"{MAX_ORIGIN_MM:g} mm", found=f"spacing {spacing.tolist()}, "
                                  f"origin {affine[:3, 3].tolist()}", fix="repair the header (spacing, origin)")
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12:
        raise UnreadableFileError("header has zero or degenerate voxel spacing", path=path,
                                  expected="positive spacing and an invertible direction",
                                  found=f"spacing {np.round(spacing, 6).tolist()}",
                                  fix="repair the header (pixdim / space directions)")


def load_volume(path: str | Path, *, dtype: Any = None, channels: bool = False) -> Volume:
    """Read a NIfTI, NRRD or MetaImage volume with its geometry.

    ``channels``: also take a 4D image, its fourth axis being the sequences of one case (MSD layout);
    the array is then ``(X, Y, Z, C)``. Otherwise a 4D image is refused."""
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
        vol = _load_nifti(path, channels)
    else:
        vol = _load_itk(path, channels)
    check_finite_geometry(vol.affine, path)
    if dtype is not None:
        vol.array = vol.array.astype(dtype, copy=False)
    return vol


def _load_nifti(path: Path, channels: bool = False) -> Volume:
    import nibabel as nib

    try:
        with _quiet_nibabel():  # header "fixes" are checked below, not printed
            img = nib.load(str(path))
        _check_declared_size(img.shape, np.dtype(img.get_data_dtype()).itemsize, path)
        array = np.asanyarray(img.dataobj)
    except MedsegError:
        raise
    except MemoryError:
        raise UnsupportedInputError("image is larger than the free memory", path=path,
                                    found=f"the header declares shape {tuple(img.shape)}",
                                    fix="check the header, crop the image, or use a machine with more memory") from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types (ImageFileError, HeaderDataError, OSError...)
        raise UnreadableFileError("cannot read NIfTI file", path=path, expected="a complete NIfTI-1/2 file",
                                  found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                                  fix="re-export the file; it may be truncated or not NIfTI") from None
    array = _squeeze_to_3d(np.asarray(array), path, channels)
    if int(img.header.get("sform_code", 0)) <= 0:  # the grid comes from pixdim: nibabel silently "fixes" bad ones
        _check_raw_pixdim(path, 3)
    affine = img.affine
    return Volume(array, affine, source=str(path), header=img.header.copy(), meta={"format": "nifti"})


class _quiet_nibabel:
    """Silence nibabel's header-repair messages (medseg checks the raw header itself)."""

    def __enter__(self):
        import nibabel as nib

        self.logger = nib.imageglobals.logger
        self.level = self.logger.level
        self.logger.setLevel(100)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _check_declared_size(shape, itemsize: int, path: Path) -> None:
    """Refuse, before reading voxels, a header that declares more data than memory can hold
    (a damaged or byte-swapped header can declare terabytes)."""
    try:
        n = 1
        for d in shape:
            n *= max(0, int(d))
    except (TypeError, ValueError, OverflowError):
        return
    declared = n * max(1, int(itemsize))
    try:
        from medseg.core.runtime import available_host_bytes

        avail = available_host_bytes()
    except ImportError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if avail is not None and declared > avail:
        raise UnsupportedInputError("image is larger than the free memory", path=path,
                                    expected=f"at most {avail / 2 ** 30:.1f} GB of voxels",
                                    found=f"the header declares shape {tuple(int(d) for d in shape)} "
                                          f"({declared / 2 ** 30:.1f} GB)",
                                    fix="check the header (a damaged one can declare absurd sizes), crop the "
                                        "image, or use a machine with more memory")


def _check_raw_pixdim(path: Path, ndim: int) -> None:
    """Refuse zero, negative or non-finite voxel sizes as stored in the file.

    nibabel replaces a zero pixdim by 1 and a negative one by its absolute value when it
    reads a header; a segmentation on such a guessed grid would be silently wrong.
    """
    import nibabel as nib

    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = fh.read(540)
        if len(raw) < 348:
            return
        sizeof = int(np.frombuffer(raw[:4], "<i4")[0])
        order = "<" if sizeof in (348, 540) else ">"
        if int(np.frombuffer(raw[:4], order + "i4")[0]) == 540:
            pixdim = np.frombuffer(raw[104:168], order + "f8")
        else:
            pixdim = np.frombuffer(raw[76:108], order + "f4")
    except (OSError, EOFError, ValueError, zlib.error):
        return
    spacing = np.asarray(pixdim[1:1 + min(ndim, 3)], dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise UnreadableFileError("header has zero, negative or NaN voxel spacing", path=path,
                                  expected="positive pixdim[1..3] (mm)", found=f"pixdim {spacing.tolist()}",
                                  fix="repair the header (e.g. nibabel or fslchpixdim), or re-export the image")


def _load_itk(path: Path, channels: bool = False) -> Volume:
    import SimpleITK as sitk

    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        try:
            itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, info.GetPixelID())).dtype).itemsize
        except (RuntimeError, TypeError, ValueError):
            itemsize = 8
        _check_declared_size(tuple(info.GetSize()) + (info.GetNumberOfComponents(),), itemsize, path)
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
        elif channels and dim == 4:
            parts = [img[:, :, :, c] for c in range(size[3])]
            array = np.stack([sitk.GetArrayFromImage(p).transpose(2, 1, 0) for p in parts], axis=-1)
            affine = affine_from_itk(parts[0].GetSpacing(), parts[0].GetOrigin(), parts[0].GetDirection())
            return Volume(np.ascontiguousarray(array), affine, source=str(path), meta={"format": "itk"})
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


def check_writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Refuse, before any work is done, an output folder that cannot be created or written.

    Nothing is created: the folder itself, or its nearest existing parent, must be a
    writable folder.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} is not a folder", path=probe if probe != folder else folder,
                          found="a file" if probe.exists() else "nothing", fix="choose a folder for the output")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} is not writable", path=folder, found=f"no write permission on {probe}",
                          fix="choose a writable output folder")
    return folder


def remove_partial_files(folder: str | Path, names: list[str]) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of ``folder/NAME`` left behind."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for name in names:
            for tmp in folder.glob(f".{case_name(name)}.*.part*"):
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
    return removed


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
