"""DICOM series: find them under a folder and read one into a :class:`Volume`.

Geometry comes from the headers alone. Slices are ordered by their position along the
slice normal (the cross product of the two ImageOrientationPatient cosines), never by
InstanceNumber. The affine is built from ImageOrientationPatient, the first slice's
ImagePositionPatient, PixelSpacing (``[0]`` is the spacing between rows, ``[1]`` between
columns) and the slice step measured from the positions (SliceThickness and
SpacingBetweenSlices are not used). DICOM patient coordinates are LPS; the affine maps
voxel indices ``(i, j, k)`` = (column, row, slice) to RAS+ mm like NIfTI.

Traps and what happens:

* uneven slice gaps or missing slices: ``uneven="resample"`` (default) interpolates
  linearly along the normal onto an even grid (step at most the smallest gap, at most
  twice as many slices as the input, like dcm2niix's ``_Eq`` output); ``"error"`` refuses.
* gantry tilt (positions step obliquely to the slice normal): ``tilt="resample"`` shifts
  every slice within its plane onto a grid orthogonal to it, widened so nothing is cut
  (like dcm2niix's ``_Tilt`` output); ``"error"`` refuses. Voxels outside the acquired
  data get the smallest value of the series; next to PixelPaddingValue pixels the
  nearest pixel is taken instead of blending (as dcm2niix does).
* 4D series (the same positions repeated): :func:`scan_dicom` splits them into stacks by
  EchoNumbers, ImageType or AcquisitionNumber when one of these tells the volumes apart;
  what is still repeated is refused, saying how many volumes there are.
* non-image objects (SR, PDF, presentation states, RT, SEG, KO), localizers, colour
  images, files without patient geometry and single slices are listed with a
  ``skip_reason`` and never loaded; derived images are kept.
* RescaleSlope/Intercept that change the values (CT in HU) and any resampling give
  float32; otherwise the stored integer type is kept.

Patient name, ID and birth date never go into anything this module returns, logs or
puts in an error message.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medseg.core.errors import (
    ConfigError,
    InputNotFoundError,
    UnreadableFileError,
    UnsupportedInputError,
)
from medseg.io.volume import LPS_TO_RAS, Volume, check_finite_geometry
from medseg.core.progress import progress_bar

log = logging.getLogger(__name__)

SAME_POSITION_MM = 0.01
"""Two slices closer than this along the normal are at the same position."""
UNEVEN_TOL = (0.02, 0.01)
"""A slice step differing from the median by more than max(mm, fraction of it) is uneven."""
TILT_TOL = (0.05, 0.1)
"""In-plane drift of slice origins above max(mm, fraction of the smallest pixel) is a tilt."""

_NON_IMAGE = (  # SOP class UID prefix -> what it is (None: not reported at all)
    ("1.2.840.10008.1.3.10", None),  # media directory (DICOMDIR)
    ("1.2.840.10008.5.1.4.1.1.88.59", "key object selection"),
    ("1.2.840.10008.5.1.4.1.1.88.", "SR document"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data or registration"),
    ("1.2.840.10008.5.1.4.1.1.481.", "RT object"),
)
_IGNORE = object()
_SPLITTERS = (("echo", "EchoNumbers"), ("type", "ImageType"), ("acquisition", "AcquisitionNumber"))
_FUNCTIONAL_GROUP = {"ImagePositionPatient": "PlanePositionSequence",
                     "ImageOrientationPatient": "PlaneOrientationSequence", "PixelSpacing": "PixelMeasuresSequence",
                     "RescaleSlope": "PixelValueTransformationSequence",
                     "RescaleIntercept": "PixelValueTransformationSequence"}


class MultipleSeriesError(UnsupportedInputError):
    """A folder or file list holds several image stacks where one was expected (``.series`` lists them)."""

    def __init__(self, problem: str, *, series: list["SeriesInfo"], **kwargs: Any) -> None:
        self.series = series
        super().__init__(problem, **kwargs)


@dataclass(frozen=True)
class SeriesInfo:
    """One stack of slices that makes one 3D volume (or a skipped object, with the reason)."""

    study_uid: str
    series_uid: str
    """SeriesInstanceUID; ``nouid-<hash>`` when the files have none (some anonymisers blank it)."""
    stack_index: int
    """Index of this stack among the stacks of the same series."""
    stack_key: str
    """What sets this stack apart within its series (orientation, echo, image type, acquisition)."""
    modality: str
    series_description: str
    series_number: int | None
    body_part: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    """ImageOrientationPatient (row cosine, column cosine), LPS."""
    n_files: int
    n_slices: int
    """Number of 2D images (frames of multi-frame files count one by one)."""
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    """(between rows, between columns) in mm, as in PixelSpacing."""
    slice_thickness: float | None
    contrast: str
    """ContrastBolusAgent; empty when none is recorded."""
    sop_class_uid: str
    transfer_syntax: str
    files: tuple[Path, ...]
    """The files, ordered along the slice normal."""
    skip_reason: str | None = None
    duplicates: tuple[tuple[Path, tuple[Path, ...]], ...] = ()
    """Files of ``files`` that other files repeat (the same SOPInstanceUID), with those copies: the reader takes a
    copy that decodes, and refuses copies whose pixels differ."""

    @property
    def usable(self) -> bool:
        return self.skip_reason is None

    def describe(self) -> str:
        """One line without patient identifiers, for listings and error messages."""
        number = "?" if self.series_number is None else self.series_number
        text = (f"series {number} '{self.series_description}' {self.modality or '?'} "
                f"{self.cols}x{self.rows}x{self.n_slices} [{self.stack_key}] in {Path(self.files[0]).parent}")
        if self.duplicates:
            text += f" (+{sum(len(c) for _, c in self.duplicates)} duplicate copies)"
        return f"{text} (skipped: {self.skip_reason})" if self.skip_reason else text


@dataclass(slots=True)
class _Frame:
    """Geometry and scaling of one 2D image (a single-frame file or one frame)."""

    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    slope: float
    intercept: float
    instance: int
    path: Path | None = None
    philips_scale: float | None = None
    """Philips' private scale slope (2005,100E): the stored values' floating-point scale."""


@dataclass(slots=True)
class _Entry:
    """What a scan keeps of one file until its stack is formed: a few hundred bytes (the header values are shared
    between the files of a series, the slice position is the file's own)."""

    path: Path
    ds: Any
    frames: list[_Frame] | None
    skip: str | None
    series: str
    copies: tuple[Path, ...] = ()
    """Other files with the same SOPInstanceUID."""


class _NoGeometry(Exception):
    pass


# ---------------------------------------------------------------------------
# headers


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(value: Any, default: float | None = None) -> float | None:
    """A finite number from a header value, else ``default`` (blank, junk, NaN and Inf alike)."""
    try:
        number = default if value is None or value == "" else float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if number is None or math.isfinite(number) else default


def _vector(value: Any, n: int, keyword: str) -> np.ndarray:
    """``n`` numbers from a multi-valued header entry; raises _NoGeometry when it has not exactly those."""
    if value is None or value == "":
        raise _NoGeometry(f"{keyword} missing")
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    try:
        out = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _NoGeometry(f"{keyword} is not numeric") from None
    if out.shape != (n,):
        raise _NoGeometry(f"{keyword} has {len(out)} values, expected {n}")
    return out


#: The header elements a scan reads (pydicom parses only these: a scan of a large archive allocates little per
#: file); everything the scan, the stack's description, mosaics and Philips scaling need.
_HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
    "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined", "Manufacturer", "ImageType",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "ContrastBolusAgent", "EchoNumbers", "AcquisitionNumber",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "SpecificCharacterSet",
    0x00291010, 0x00291020, 0x0029100C, 0x00290010, 0x00291008, 0x00291009, 0x00291018, 0x00291019,
    0x2005100E, 0x2005100D, 0x00200012)


def _read_header(path: Path):
    """Header of a DICOM file; None when the file is not DICOM. Raises ValueError when it
    claims to be DICOM (``DICM`` marker) but cannot be parsed."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    force = head[128:132] != b"DICM"
    if force and head[:2] not in (b"\x08\x00", b"\x02\x00"):  # a raw dataset starts with group 8 or 2
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=force, specific_tags=list(_HEADER_TAGS))
    except InvalidDicomError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged header; reported by the caller
        if force:
            return None
        raise ValueError(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
    if force and not ("SOPInstanceUID" in ds and "SeriesInstanceUID" in ds):
        return None
    return ds


def _sop_class(ds) -> str:
    uid = _text(ds.get("SOPClassUID"))
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = _text(ds.file_meta.get("MediaStorageSOPClassUID"))
    return uid


def _skip_reason(ds):
    """Why this file is never loaded (None: an image to load; _IGNORE: not reported).
    Raises ValueError for a damaged header."""
    uid = _sop_class(ds)
    for prefix, what in _NON_IMAGE:
        if uid.startswith(prefix):
            return _IGNORE if what is None else f"not an image ({what})"
    if "Rows" not in ds or "Columns" not in ds:
        from pydicom.uid import UID

        if not uid or "Image Storage" in UID(uid).name:
            raise ValueError("image header without Rows/Columns (truncated or damaged)")
        return "not an image (no pixel data)"
    if any("LOCALIZER" in str(t).upper() for t in (ds.get("ImageType") or [])):
        return "localizer"
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        return f"colour image ({_text(ds.get('PhotometricInterpretation')) or 'several samples per pixel'})"
    return None


@dataclass
class _Mosaic:
    """A Siemens mosaic: ``n`` slices of ``rows`` x ``cols`` tiled ``tiles`` to a side in one image."""

    n: int
    rows: int
    cols: int
    tiles: int
    first: np.ndarray
    """ImagePositionPatient of the first slice (the file's own refers to the corner of the whole mosaic)."""
    normal: np.ndarray
    step: float


def _mosaic(ds) -> _Mosaic | None:
    """The mosaic a Siemens file holds (ImageType MOSAIC, slice count in its CSA header), read with nibabel's
    DICOM wrapper, which corrects the slice position as dcm2niix does; None for any other file."""
    if not any("MOSAIC" in str(t).upper() for t in (ds.get("ImageType") or [])):
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental (on import)
            from nibabel.nicom import dicomwrappers

            w = dicomwrappers.MosaicWrapper(ds)
            n, size = int(w.n_mosaic), int(w.mosaic_size)
            first = np.asarray(w.image_position, dtype=np.float64)
            normal = np.asarray(w.slice_normal, dtype=np.float64)
            step = float(w.voxel_sizes[2])
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a CSA header it cannot use
        raise ValueError(f"Siemens mosaic whose CSA header cannot be read ({type(exc).__name__}: {exc})"[:200]) \
            from None
    rows, cols = int(ds.Rows) // size, int(ds.Columns) // size
    if n < 1 or size * size < n or rows * size != int(ds.Rows) or cols * size != int(ds.Columns):
        raise ValueError(f"Siemens mosaic of {n} slices does not tile its {ds.Rows}x{ds.Columns} image")
    return _Mosaic(n, rows, cols, size, first, normal / np.linalg.norm(normal), step)


def _frames(ds, mosaic: _Mosaic | None) -> list[_Frame]:
    """Geometry of every 2D image in a file (``mosaic``: its :func:`_mosaic`); raises _NoGeometry when it is
    missing."""
    if mosaic is not None:
        iop = _vector(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        ps = _vector(ds.get("PixelSpacing"), 2, "PixelSpacing")
        instance = int(_number(ds.get("InstanceNumber"), 0) or 0)
        slope, intercept = _number(ds.get("RescaleSlope"), 1.0) or 1.0, _number(ds.get("RescaleIntercept"), 0.0) or 0.0
        return [_Frame(mosaic.first + k * mosaic.step * mosaic.normal, iop, (float(ps[0]), float(ps[1])), slope,
                       intercept, instance * 100000 + k) for k in range(mosaic.n)]
    n = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n == 1 and per_frame is None:
        lookups = [ds.get]
    else:  # enhanced multi-frame: per-frame functional groups, falling back to the shared ones
        if not per_frame or len(per_frame) < n:
            raise _NoGeometry("multi-frame image without per-frame positions")
        shared = ds.get("SharedFunctionalGroupsSequence")
        sources = [[per_frame[i]] + ([shared[0]] if shared else []) for i in range(n)]
        lookups = [lambda name, src=src: _functional(src, name) for src in sources]
    instance = int(_number(ds.get("InstanceNumber"), 0) or 0)
    philips = _philips_scale(ds)
    frames = []
    for i, get in enumerate(lookups):
        ipp = _vector(get("ImagePositionPatient"), 3, "ImagePositionPatient")
        iop = _vector(get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        ps = _vector(get("PixelSpacing"), 2, "PixelSpacing")
        frames.append(_Frame(ipp, iop, (float(ps[0]), float(ps[1])), _number(get("RescaleSlope"), 1.0) or 1.0,
                             _number(get("RescaleIntercept"), 0.0) or 0.0, instance * 100000 + i,
                             philips_scale=philips))
    return frames


def _philips_scale(ds) -> float | None:
    """Philips' private scale slope (2005,100E) of a classic image, when the file is Philips' and has one."""
    if not _text(ds.get("Manufacturer")).upper().startswith("PHILIPS"):
        return None
    elem = ds.get((0x2005, 0x100E))
    try:
        value = float(elem.value if elem is not None else 0.0)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


PHILIPS = ("precise", "display")
"""``precise``: Philips' floating-point values, ``(stored * RescaleSlope + RescaleIntercept) / (RescaleSlope *
ScaleSlope)`` with the private scale slope (2005,100E), what dcm2niix writes by default (``-p y``); ``display``: the
RescaleSlope/Intercept values a viewer shows (dcm2niix ``-p n``)."""


def _functional(sources, name: str):
    for src in sources:
        seq = src.get(_FUNCTIONAL_GROUP[name])
        if seq and name in seq[0]:
            return seq[0].get(name)
    return None


def _series_id(path: Path, ds) -> str:
    """SeriesInstanceUID, or (where an anonymiser blanked it) a stand-in from the folder and series attributes."""
    uid = _text(ds.get("SeriesInstanceUID"))
    if uid:
        return uid
    keys = ("FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality", "SeriesDate", "SeriesTime")
    text = "|".join([str(path.parent)] + [_text(ds.get(k)) for k in keys])
    return "nouid-" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / (np.linalg.norm(n) or 1.0)


# ---------------------------------------------------------------------------
# scanning


def scan_dicom(root: str | Path, *, progress: bool = False) -> list[SeriesInfo]:
    """Every stack of DICOM images under ``root`` (a folder, any nesting, or one file).

    Only headers are read. Files that are not DICOM are skipped quietly; damaged DICOM
    headers are logged as warnings and skipped. Skipped objects (non-images, localizers...)
    are listed too, with ``skip_reason`` set.
    """
    stacks, broken = scan_path(root, progress)
    for path, why in broken:
        log.warning("%s: damaged DICOM header, file skipped (%s)", path, why)
    return stacks


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("DICOM input not found", path=path, expected="a DICOM folder or file",
                                 fix="check the path")
    return path


def scan_path(root: str | Path, progress: bool):
    root = _existing(root)
    if root.is_file():
        return _scan_files([root], progress)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder) / n for n in sorted(names) if not n.startswith("."))
    return _scan_files(files, progress)


def _scan_files(files: list[Path], progress: bool) -> tuple[list[SeriesInfo], list[tuple[Path, str]]]:
    """Stacks in ``files``, and the damaged files with the reason."""
    entries, broken, seen = [], [], {}
    shared: dict = {}  # one object per distinct header, orientation and pixel spacing, kept by every file that has it
    with progress_bar("scanning DICOM", total=len(files), enabled=progress) as advance:
        for path in files:
            advance()
            try:
                ds = _read_header(path)
                skip = None if ds is None else _skip_reason(ds)
                if ds is None or skip is _IGNORE:
                    continue
                frames, mosaic = None, _mosaic(ds)
                if skip is None:
                    try:
                        frames = _frames(ds, mosaic)
                        int(ds.Rows), int(ds.Columns)  # noqa: B018 - used as grouping keys below
                    except _NoGeometry as exc:
                        skip = f"no patient geometry ({exc})"
                series = sys.intern(_series_id(path, ds))
                header = _slim(ds, shared, mosaic)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
                # a header pydicom parsed but whose values make no sense (junk numbers, wrong multiplicity)
                why = str(exc) if isinstance(exc, ValueError) and not isinstance(exc, OverflowError) else \
                    f"{type(exc).__name__}: {exc}"
                broken.append((path, (why.splitlines() or [type(exc).__name__])[0][:200]))
                continue
            uid = (series, _text(ds.get("SOPInstanceUID")))
            if uid[1] and uid in seen:  # the same instance again: one instance, the copy kept in reserve
                seen[uid].copies += (path,)
                continue
            for f in frames or ():
                f.orientation = shared.setdefault(("orientation", f.orientation.tobytes()), f.orientation)
                f.spacing = shared.setdefault(("spacing", f.spacing), f.spacing)
            entry = _Entry(path, header, frames, skip, series)
            if uid[1]:
                seen[uid] = entry
            entries.append(entry)
    groups: dict[tuple, list[_Entry]] = defaultdict(list)
    for e in entries:
        key = (_text(e.ds.get("StudyInstanceUID")), e.series, e.skip)
        if not e.skip:  # orientation, matrix size, and whether the file holds many frames (enhanced) or one
            # several enhanced files of one series (one volume each, as Siemens XA writes a 4D series) are one stack
            # like classic slices: repeated positions are then split by echo, type or acquisition, or refused as 4D
            key += (tuple(np.round(e.frames[0].orientation, 3) + 0.0), int(e.ds.Rows), int(e.ds.Columns),
                    len(e.frames) > 1)
        groups[key].append(e)
    stacks = []
    for members in groups.values():
        parts = [(members, {})] if members[0].skip else _split_repeats(members, {}, _SPLITTERS)
        stacks.extend(_stack(part, labels) for part, labels in parts)
    stacks.sort(key=lambda s: (s.study_uid, s.series_number is None, s.series_number or 0, s.series_uid, s.stack_key))
    counter: dict[str, int] = defaultdict(int)
    result = []
    for s in stacks:
        result.append(replace(s, stack_index=counter[s.series_uid]))
        counter[s.series_uid] += 1
    return result, broken


#: What grouping, splitting and describing a stack read from a header after the scan; the rest is dropped, and what
#: is left is the same for every file of a series as a rule (no instance's own values), so the files share one copy.
_KEEP = ("StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "BodyPartExamined",
         "ImageType", "Rows", "Columns", "SliceThickness", "ContrastBolusAgent", "SOPClassUID", "NumberOfFrames",
         "EchoNumbers", "AcquisitionNumber")


class _Header(dict):
    """The few values of a header a stack needs after the scan, as plain Python values (``.get`` and attributes as a
    Dataset's); ``file_meta`` holds the transfer syntax and the SOP class, ``MosaicTiles`` a Siemens mosaic's tiles
    to a side."""

    file_meta: dict

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _plain(value):
    """A header value as a built-in type (pydicom's number and string types keep their source text beside them)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return tuple(str(v) for v in value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    return float(value) if isinstance(value, float) else str(value)


def _slim(ds, shared: dict, mosaic: _Mosaic | None) -> _Header:
    """:data:`_KEEP` of the header as plain values, the file meta's transfer syntax and SOP class, and a mosaic's
    tiles; one object for all files whose values are the same (``shared`` holds them)."""
    values = {k: _plain(ds.get(k)) for k in _KEEP if k in ds}
    if mosaic is not None:
        values["MosaicTiles"] = mosaic.tiles
    meta = getattr(ds, "file_meta", None)
    file_meta = {k: str(meta.get(k)) for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID")
                 if meta is not None and meta.get(k) is not None}
    key = ("header", tuple(values.items()), tuple(file_meta.items()))
    if key not in shared:
        shared[key] = _Header(values)
        shared[key].file_meta = file_meta
    return shared[key]


def _has_repeats(members: list[_Entry]) -> bool:
    normal = _normal(members[0].frames[0].orientation)
    t = np.sort([f.position @ normal for e in members for f in e.frames])
    return bool(np.any(np.diff(t) < SAME_POSITION_MM))


def _split_repeats(members: list[_Entry], labels: dict, splitters) -> list[tuple[list[_Entry], dict]]:
    """Split a group whose slice positions repeat by the first attribute that tells them apart."""
    if len(members) < 2 or not _has_repeats(members):
        return [(members, labels)]
    for i, (label, keyword) in enumerate(splitters):
        parts: dict[str, list[_Entry]] = defaultdict(list)
        for e in members:
            parts[_text(e.ds.get(keyword))].append(e)
        if len(parts) > 1:
            out = []
            for value in sorted(parts, key=lambda v: (len(v), v)):
                out += _split_repeats(parts[value], {**labels, label: value or "none"}, splitters[i + 1:])
            return out
    return [(members, labels)]


def _tile(ds, keyword: str) -> int:
    """Rows or Columns of one image (of one tile, for a Siemens mosaic)."""
    return int(ds.get(keyword) or 0) // int(ds.get("MosaicTiles") or 1)


def _stack(members: list[_Entry], labels: dict) -> SeriesInfo:
    ds = members[0].ds
    if members[0].frames:
        normal = _normal(members[0].frames[0].orientation)
        members = sorted(members, key=lambda e: (e.frames[0].position @ normal, e.frames[0].instance, str(e.path)))
        iop = tuple(float(v) for v in members[0].frames[0].orientation)
        orient = ",".join(f"{v:.3g}" for v in np.round(iop, 3) + 0.0)
        key = "; ".join([f"orientation {orient}"] + [f"{k} {v}" for k, v in labels.items()])
        spacing = members[0].frames[0].spacing
    else:
        members = sorted(members, key=lambda e: str(e.path))
        iop, key, spacing = None, members[0].skip, None
    n_slices = sum(len(e.frames) if e.frames else int(_number(e.ds.get("NumberOfFrames"), 1) or 1) for e in members)
    number = _number(ds.get("SeriesNumber"))
    meta = getattr(ds, "file_meta", None)
    return SeriesInfo(
        study_uid=_text(ds.get("StudyInstanceUID")), series_uid=members[0].series, stack_index=0, stack_key=key,
        modality=_text(ds.get("Modality")), series_description=_text(ds.get("SeriesDescription")),
        series_number=None if number is None else int(number), body_part=_text(ds.get("BodyPartExamined")),
        image_type=tuple(str(t) for t in (ds.get("ImageType") or [])), orientation=iop, n_files=len(members),
        n_slices=n_slices, rows=_tile(ds, "Rows"), cols=_tile(ds, "Columns"), pixel_spacing=spacing,
        slice_thickness=_number(ds.get("SliceThickness")), contrast=_text(ds.get("ContrastBolusAgent")),
        sop_class_uid=_sop_class(ds), transfer_syntax=_text(meta.get("TransferSyntaxUID")) if meta is not None else "",
        files=tuple(e.path for e in members),
        skip_reason=members[0].skip or ("single slice" if n_slices < 2 else None),
        duplicates=tuple((e.path, tuple(e.copies)) for e in members if e.copies))


# ---------------------------------------------------------------------------
# loading

_META_FIELDS = ("modality", "series_description", "series_number", "series_uid", "study_uid", "stack_key", "body_part",
                "contrast", "sop_class_uid", "transfer_syntax", "n_files", "n_slices")


def load_dicom_series(source: str | Path | Iterable[str | Path] | SeriesInfo, *, uneven: str = "resample",
                      tilt: str = "resample", progress: bool = False,
                      damaged: list[tuple[Path, str]] | None = None, philips: str = "precise") -> Volume:
    """Read one DICOM series into a :class:`Volume` (RAS+ affine, array ``(i, j, k)``).

    ``source`` is a folder holding one series (skipped objects beside it are ignored), a
    list of files, one file, or a :class:`SeriesInfo` from :func:`scan_dicom`. ``uneven``
    and ``tilt`` are ``"resample"`` or ``"error"`` (see the module documentation).

    Files with an unreadable header beside the series (``damaged``, or found in ``source``) never fail it on their
    own, nor does a copy of an instance another file holds. A file whose pixels cannot be decoded and that nothing
    else stands in for is a missing slice: left out (and the gap interpolated) with ``uneven="resample"``, refused
    by name with ``uneven="error"``.
    ``meta["duplicates"]`` and ``meta["unreadable"]`` name such files (file names only).

    ``philips`` chooses the values of Philips images with a private scale slope (:data:`PHILIPS`); which was
    applied is ``meta["philips_scaling"]``.
    """
    for name, value in (("uneven", uneven), ("tilt", tilt)):
        if value not in ("resample", "error"):
            raise ConfigError(f"unknown DICOM option {name}={value!r}", expected="'resample' or 'error'",
                              found=repr(value), fix=f"use {name}='resample' or {name}='error'")
    if philips not in PHILIPS:
        raise ConfigError(f"unknown DICOM option philips={philips!r}", expected=" or ".join(PHILIPS),
                          found=repr(philips), fix="use philips='precise' (as dcm2niix) or philips='display'")
    info, ignored, unreadable = _resolve(source, progress)
    frames, pixels, padding, notes = _read_stack(info, progress, uneven)
    scaled = [f for f in frames if f.philips_scale]
    if philips == "precise":  # Philips' floating-point values: dcm2niix's default
        for f in scaled:
            f.intercept, f.slope = f.intercept / (f.slope * f.philips_scale), 1.0 / f.philips_scale
    array, affine, meta = _assemble(frames, pixels, padding, info, uneven=uneven, tilt=tilt)
    if scaled:
        meta["philips_scaling"] = philips
    check_finite_geometry(affine, Path(info.files[0]).parent)
    meta.update({k: getattr(info, k) for k in _META_FIELDS})
    notes["unreadable"] += [[Path(p).name, why] for p, why in [*unreadable, *(damaged or [])]]
    meta.update(format="dicom", image_type=list(info.image_type), ignored=ignored,
                **{k: v for k, v in notes.items() if v})
    return Volume(array, affine, source=str(Path(info.files[0]).parent), meta=meta)


def _resolve(source, progress: bool) -> tuple[SeriesInfo, dict[str, int], list[tuple[Path, str]]]:
    """The one usable stack in ``source``, counts of the skipped files beside it, and the files beside it whose
    header cannot be read."""
    if isinstance(source, SeriesInfo):
        if source.skip_reason:
            raise UnsupportedInputError(f"this series is not loadable: {source.skip_reason}",
                                        path=Path(source.files[0]).parent, found=source.describe(),
                                        fix="choose an image series (scan_dicom lists them with skip_reason)")
        return source, {}, []
    if isinstance(source, (str, os.PathLike)):
        where = Path(source)
        stacks, broken = scan_path(source, progress)
    else:
        files = [_existing(p) for p in source]
        if not files:
            raise InputNotFoundError("empty list of DICOM files", expected="the files of one series",
                                     fix="pass the slice files of one series")
        where = files[0].parent
        stacks, broken = _scan_files(files, progress)
    usable = [s for s in stacks if s.usable]
    if broken and not usable:
        raise UnreadableFileError("cannot read DICOM header", path=broken[0][0], expected="a complete DICOM file",
                                  found=broken[0][1] + (f" ({len(broken)} damaged files)" if len(broken) > 1 else ""),
                                  fix="re-export or re-copy the file, or leave it out")
    ignored: dict[str, int] = defaultdict(int)
    for s in stacks:
        if not s.usable:
            ignored[s.skip_reason] += s.n_files
    if not stacks:
        raise InputNotFoundError("no DICOM files found", path=where, expected="a folder of DICOM slices",
                                 fix="check the folder; DICOM files are recognised by content, not name")
    if not usable:
        raise UnsupportedInputError("no loadable image series", path=where, expected="a stack of image slices",
                                    found="; ".join(f"{n} file(s): {r}" for r, n in ignored.items()),
                                    fix="point at a folder holding an image series")
    if len(usable) > 1:
        more = f"; ... {len(usable) - 10} more" if len(usable) > 10 else ""
        shown = "; ".join(s.describe() for s in usable[:10]) + more
        raise MultipleSeriesError(f"holds {len(usable)} image stacks, expected one", series=usable, path=where,
                                  found=shown, fix="pick one: pass its folder, its files or its SeriesInfo from "
                                                   "scan_dicom(), or give the study folder with selection rules")
    return usable[0], dict(ignored), broken


def _read_instance(path: Path):
    """``(frames, stored pixels, PixelPaddingValue)`` of one file; raises a MedsegError when it cannot be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user file
        raise UnreadableFileError("cannot read DICOM file", path=path, expected="a complete DICOM file",
                                  found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                                  fix="re-export or re-copy the file") from None
    if "PixelData" not in ds:
        raise UnreadableFileError("file has no pixel data", path=path, expected="a complete DICOM image",
                                  fix="re-export or re-copy the file; it may be truncated")
    mosaic = _mosaic(ds)
    try:
        file_frames = _frames(ds, mosaic)
    except _NoGeometry as exc:
        raise UnsupportedInputError("slice has no patient geometry", path=path, found=str(exc),
                                    fix="use images with patient position and orientation") from None
    for f in file_frames:
        f.path = path
    padding = int(ds.PixelPaddingValue) if ds.get("PixelPaddingValue") is not None else None
    return file_frames, _pixels(ds, path, len(file_frames), mosaic), padding


def _reason(exc: UnreadableFileError) -> str:
    return " ".join(f"{exc.problem}{': ' + exc.found if exc.found else ''}".split())[:160]


def _read_stack(info: SeriesInfo, progress: bool, uneven: str = "resample"):
    """Frames, stored pixels ``(frame, row, col)``, the PixelPaddingValue (or None) of a stack, and notes for its
    record. Copies of one instance (the same SOPInstanceUID) are one instance: the first copy that decodes is used,
    copies whose pixels differ are refused by name. A file whose pixels cannot be decoded and that no copy stands in
    for is left out (a missing slice, which the ``uneven`` rule then handles) and named in the notes."""
    copies = {Path(f): list(c) for f, c in info.duplicates}
    frames, pixels, padding = [], [], None
    notes: dict[str, list] = {"duplicates": [], "unreadable": []}
    with progress_bar("reading DICOM", total=len(info.files), enabled=progress) as advance:
        for path in info.files:
            advance()
            read, failed = [], []
            for candidate in [Path(path), *copies.get(Path(path), [])]:
                try:
                    read.append((candidate, _read_instance(candidate)))
                except UnreadableFileError as exc:  # truncated or corrupt; a missing decoder is raised as it is
                    failed.append((candidate, exc))
            if not read:  # nobody carries this slice: it is missing
                if uneven == "error":
                    raise failed[0][1]
                notes["unreadable"] += [[c.name, _reason(exc)] for c, exc in failed]
                continue
            used, (file_frames, file_pixels, file_padding) = read[0]
            for other, (_, other_pixels, _) in read[1:]:
                if other_pixels.shape != file_pixels.shape or not np.array_equal(other_pixels, file_pixels):
                    raise UnreadableFileError("two copies of one DICOM instance hold different pixel data",
                                              path=used, expected="identical copies (the same SOPInstanceUID)",
                                              found=f"{used.name} and {other.name} differ",
                                              fix="keep the right copy and move the other out of the folder")
                notes["duplicates"].append([used.name, other.name, "identical copy"])
            for other, exc in failed:
                notes["duplicates"].append([used.name, other.name, "unreadable copy: " + _reason(exc)])
            if padding is None:
                padding = file_padding
            frames += file_frames
            pixels.append(file_pixels)
    if not pixels:
        first = notes["unreadable"][0] if notes["unreadable"] else None
        raise UnreadableFileError("no slice of the series can be decoded", path=Path(info.files[0]).parent,
                                  found=f"{first[0]}: {first[1]}" if first else None,
                                  fix="re-export or re-copy the series")
    if notes["unreadable"]:
        log.warning("%s: %d file(s) of the series cannot be decoded and are left out (missing slices)",
                    Path(info.files[0]).parent, len(notes["unreadable"]))
    return frames, np.concatenate(pixels) if len(pixels) > 1 else pixels[0], padding, notes


def _pixels(ds, path: Path, n_frames: int, mosaic: _Mosaic | None) -> np.ndarray:
    """Stored pixel values as ``(frames, rows, cols)`` (a mosaic's tiles as frames)."""
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) if decoder is not None else "no decoder exists"
            raise UnsupportedInputError(f"cannot decode transfer syntax {ts.name}", path=path, found=missing,
                                        fix="reinstall medseg's decoders (pip install python-gdcm pylibjpeg "
                                            "pylibjpeg-openjpeg), or decompress the files (e.g. gdcmconv --raw)")
    expected = (n_frames, int(ds.Rows), int(ds.Columns)) if mosaic is None else (1, int(ds.Rows), int(ds.Columns))
    try:
        array = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - every decoder has its own errors
        raise UnreadableFileError("cannot decode pixel data", path=path,
                                  expected=f"{expected[0]} frame(s) of {expected[1]}x{expected[2]} pixels",
                                  found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                                  fix="re-export or re-copy the file; it is truncated or corrupt") from None
    array = array.reshape((1,) + array.shape) if array.ndim == 2 else array
    if array.shape != expected:
        raise UnreadableFileError("pixel data has the wrong size", path=path, expected=str(expected),
                                  found=str(array.shape), fix="re-export or re-copy the file")
    if mosaic is not None:  # tiles left to right, then top to bottom
        r, c, m = mosaic.rows, mosaic.cols, mosaic.tiles
        tiles = array[0].reshape(m, r, m, c).transpose(0, 2, 1, 3).reshape(m * m, r, c)
        array = np.ascontiguousarray(tiles[:mosaic.n])
    return array


def _assemble(frames: list[_Frame], pixels: np.ndarray, padding: int | None, info: SeriesInfo, *, uneven: str,
              tilt: str):
    """Sort, check and resample the slices; return the (i, j, k) array, its RAS affine and meta."""
    where = Path(info.files[0]).parent
    _check_frame_geometry(frames, where)
    iop = frames[0].orientation
    if any(not np.allclose(f.orientation, iop, atol=1e-3) for f in frames):
        raise UnsupportedInputError("slices have different orientations", path=where, expected="one orientation",
                                    fix="load each orientation as its own stack (scan_dicom separates them)")
    if any(not np.allclose(f.spacing, frames[0].spacing, atol=1e-4) for f in frames):
        raise UnsupportedInputError("slices have different pixel spacing", path=where,
                                    found=str(sorted({f.spacing for f in frames})), fix="load a consistent series")
    if len(frames) < 2:
        raise UnsupportedInputError("series has a single slice", path=where, expected="a 3D stack of slices",
                                    fix="use a 2D model for 2D images")
    dr, dc = frames[0].spacing
    col_dir = iop[:3] / np.linalg.norm(iop[:3])  # direction of increasing column index
    row_dir = iop[3:] / np.linalg.norm(iop[3:])  # direction of increasing row index
    normal = _normal(iop)
    pos = np.array([f.position for f in frames])
    order = np.lexsort(([f.instance for f in frames], pos @ normal))
    pos = pos[order]
    t = pos @ normal
    _check_repeats(t, where)
    offsets = (pos - pos[0]) @ np.stack([col_dir, row_dir], axis=1)  # in-plane drift (mm) of each slice
    steps = np.diff(t)
    array = _rescale(pixels[order], [frames[i] for i in order])
    meta: dict[str, Any] = {"resampled": False, "detilted": False, "rescaled": array.dtype == np.float32}
    origin = pos[0].copy()
    drift = float(np.abs(offsets).max())
    if drift > max(TILT_TOL[0], TILT_TOL[1] * min(dr, dc)):
        angle = math.degrees(math.atan2(drift, t[-1] - t[0]))
        if tilt == "error":
            raise UnsupportedInputError(f"slices are sheared: gantry tilt of about {angle:.1f} degrees", path=where,
                                        expected="slice positions along the slice normal",
                                        found=f"slice origins drift {drift:.2f} mm within the slice plane",
                                        fix="use tilt='resample' to de-tilt onto an orthogonal grid")
        pad = None if padding is None else float(_rescale(np.full((1, 1, 1), padding), frames[:1]).flat[0])
        array, shift_mm = _detilt(array, offsets, (dc, dr), float(array.min()), pad)
        origin = origin + shift_mm[0] * col_dir + shift_mm[1] * row_dir
        meta.update(detilted=True, gantry_tilt_deg=round(angle, 3))
    median = float(np.median(steps))
    bad = np.abs(steps - median) > max(UNEVEN_TOL[0], UNEVEN_TOL[1] * median)
    if bad.any():
        if uneven == "error":
            k = int(np.argmax(bad))
            names = ", ".join(frames[i].path.name for i in order[k:k + 2])
            raise UnsupportedInputError(
                f"uneven slice spacing: gap of {steps[k]:.3g} mm between slices {k} and {k + 1} ({names})",
                path=where, expected=f"every step {median:.3g} mm",
                found=f"{int(bad.sum())} uneven gap(s), steps {np.unique(np.round(steps, 3)).tolist()} mm",
                fix="use uneven='resample' to interpolate onto an even grid, or find the missing slices")
        array, step = _even_slices(array, t - t[0])
        meta.update(resampled=True, source_steps_mm=np.round(steps, 4).tolist())
    else:
        step = (t[-1] - t[0]) / (len(t) - 1)
    meta["slice_step_mm"] = float(step)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = col_dir * dc, row_dir * dr, normal * step, origin
    return np.ascontiguousarray(array.transpose(2, 1, 0)), LPS_TO_RAS @ lps, meta


def _check_frame_geometry(frames: list[_Frame], where: Path) -> None:
    """Refuse headers whose geometry cannot describe a grid: zero, negative or NaN pixel
    spacing, NaN positions, or orientation cosines that are not two unit vectors at right angles."""
    for f in frames:
        path = f.path or where
        if not all(math.isfinite(v) and v > 0 for v in f.spacing):
            raise UnsupportedInputError("PixelSpacing is zero, negative or not a number", path=path,
                                        expected="two positive spacings in mm", found=f"PixelSpacing {list(f.spacing)}",
                                        fix="repair the header or re-export the series")
        if not np.all(np.isfinite(f.position)):
            raise UnsupportedInputError("ImagePositionPatient is not a number", path=path,
                                        found=f"ImagePositionPatient {f.position.tolist()}",
                                        fix="repair the header or re-export the series")
        row, col = f.orientation[:3], f.orientation[3:]
        ok = np.all(np.isfinite(f.orientation)) and abs(np.linalg.norm(row) - 1) < 0.01 \
            and abs(np.linalg.norm(col) - 1) < 0.01 and abs(float(row @ col)) < 0.01
        if not ok:
            raise UnsupportedInputError("ImageOrientationPatient is not two perpendicular unit vectors", path=path,
                                        found=f"ImageOrientationPatient {np.round(f.orientation, 4).tolist()}",
                                        fix="repair the header or re-export the series")


def _check_repeats(t: np.ndarray, where: Path) -> None:
    same = np.diff(t) < SAME_POSITION_MM
    if not same.any():
        return
    groups = np.split(np.arange(len(t)), np.flatnonzero(~same) + 1)
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:
        raise UnsupportedInputError(
            f"4D series: {sizes.pop()} volumes at the same {len(groups)} slice positions", path=where,
            expected="one 3D volume", found="every slice position repeated (time points, echoes or repeats)",
            fix="pass the files of one volume as a list (e.g. those of one TemporalPositionIdentifier, "
                "TriggerTime or AcquisitionNumber), or split the series (dcm2niix writes one file per volume)")
    raise UnsupportedInputError(f"{int(same.sum())} slice(s) share a position with another slice", path=where,
                                expected="one slice per position", found=f"{len(groups)} positions for {len(t)} slices",
                                fix="remove duplicate slices or pass the files of one volume as a list")


def _rescale(stored: np.ndarray, frames: list[_Frame]) -> np.ndarray:
    """Apply RescaleSlope/Intercept (float32 when they change the values, else the stored integers)."""
    slopes, inters = np.array([f.slope for f in frames]), np.array([f.intercept for f in frames])
    if np.all(slopes == 1.0) and np.all(inters == 0.0):
        return stored
    out = np.empty(stored.shape, np.float32)
    for k in range(len(frames)):
        out[k] = stored[k].astype(np.float64) * slopes[k] + inters[k]
    return out


def _blend(a: np.ndarray, b: np.ndarray, w, pad: float | None = None) -> np.ndarray:
    """Linear interpolation ``a*(1-w) + b*w``, but the nearest of the two where either is
    ``pad`` (PixelPaddingValue): padding is never smeared into tissue, as in dcm2niix."""
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    w = np.asarray(w, np.float32)
    if pad is None:
        return a * (1 - w) + b * w
    return np.where((a == pad) | (b == pad), np.where(w < 0.5, a, b), a * (1 - w) + b * w)


def _shift(image: np.ndarray, shift: float, axis: int, size: int, fill: float, pad: float | None) -> np.ndarray:
    """``out[j] = image[j - shift]`` along ``axis`` (linear interpolation), ``size`` long; ``fill`` outside.

    The edges follow dcm2niix's de-tilting, so the two agree voxel for voxel: a target position up to one pixel
    before the first source row takes the first row's value, one beyond the last row is ``fill``. (Physically the
    acquired pixels cover half a pixel beyond either centre; dcm2niix's rule gives a full pixel on one side and none
    on the other. It decides one row per slice at the edge of the shifted field of view; docs/dicom.md.)"""
    src = np.arange(size) - shift
    if abs(shift - round(shift)) < 1e-6:
        src = np.round(src)
    lo = np.floor(src).astype(int)
    n = image.shape[axis]
    shape = [1] * image.ndim
    shape[axis] = size
    out = _blend(np.take(image, np.clip(lo, 0, n - 1), axis=axis), np.take(image, np.clip(lo + 1, 0, n - 1), axis=axis),
                 (src - lo).reshape(shape), pad)
    index = [slice(None)] * image.ndim
    index[axis] = (src <= -1.0 + 1e-6) | (src > n - 1 + 1e-6)
    out[tuple(index)] = fill
    return out


def _detilt(array: np.ndarray, offsets: np.ndarray, spacing: tuple[float, float], fill: float, pad: float | None):
    """Shift each slice within its plane so all share one grid orthogonal to the normal.

    ``array`` is ``(slice, row, col)``; ``offsets[k]`` the in-plane position (mm along the
    column and row directions) of slice k's origin relative to slice 0. Returns the new
    array (grown so no data is cut) and the grid origin's in-plane offset in mm. The grid
    keeps slice 0's pixel positions, as dcm2niix's ``_Tilt`` output does.
    """
    px = offsets / np.asarray(spacing)  # in pixels: (column shift, row shift)
    px[:, np.abs(px).max(axis=0) * np.asarray(spacing) <= TILT_TOL[0]] = 0.0
    low = np.floor(px.min(axis=0) + 1e-6)
    extra = (np.ceil(px.max(axis=0) - 1e-6) - low).astype(int)
    n, rows, cols = array.shape
    out = np.empty((n, rows + extra[1], cols + extra[0]), np.float32)
    for k in range(n):
        img = _shift(array[k], px[k, 1] - low[1], 0, rows + extra[1], fill, pad)
        out[k] = _shift(img, px[k, 0] - low[0], 1, cols + extra[0], fill, pad)
    return out, low * np.asarray(spacing)


def _even_slices(array: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """Interpolate ``(slice, row, col)`` slices at positions ``t`` (mm, from 0) onto an even grid.

    The step is at most the smallest gap, but at most twice as many slices as the input
    are made (as dcm2niix does); the first and the last slice are kept exactly.
    """
    span, n = float(t[-1]), len(t)
    n_out = min(int(math.ceil(span / float(np.diff(t).min()) - 1e-6)) + 1, 2 * n)
    step = span / (n_out - 1)
    target = np.arange(n_out) * step
    target[-1] = span
    hi = np.clip(np.searchsorted(t, target, side="left"), 1, n - 1)
    lo = hi - 1
    w = np.clip((target - t[lo]) / (t[hi] - t[lo]), 0.0, 1.0)
    out = np.empty((n_out,) + array.shape[1:], np.float32)
    for k in range(n_out):  # slices on the grid are copied exactly
        a, b = array[lo[k]], array[hi[k]]
        out[k] = b if w[k] == 1.0 else a if w[k] == 0.0 else _blend(a, b, w[k])
    return out, step
