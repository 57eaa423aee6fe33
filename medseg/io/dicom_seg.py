"""DICOM Segmentation objects (SEG) on the slices of their source series, written with highdicom.

A SEG references its source study, series, frame of reference and slices, and every frame
lies exactly on one source slice (same ImagePositionPatient). Labels must therefore be on
the original slices: labels of a series that :func:`medseg.io.dicom.load_dicom_series`
resampled (uneven or missing slices) or de-tilted are refused; write NIfTI or seg.nrrd
for those. The geometry is checked before anything is written.

The SEG has type BINARY (read by every DICOM SEG viewer), one segment per :class:`LabelInfo`
in the order given (segment numbers 1..N, equal to the label values when these are 1..N),
and stores only non-empty frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.core.errors import (
    GeometryError,
    OutputError,
    UnreadableFileError,
    UnsupportedInputError,
)
from medseg.io.dicom import SAME_POSITION_MM, TILT_TOL, UNEVEN_TOL
from medseg.io.volume import LPS_TO_RAS, Volume, atomic_write
from medseg.core.labels import Code, LabelInfo

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
GRID_TOL_MM = 1e-3
_ON_ORIGINAL = "the source slices are not one regular grid"
_OTHER_FORMAT = "write labels predicted on this series as loaded (they are mapped back onto its original slices)"


def _read_headers(files) -> list:
    import pydicom

    out = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure of a user file
            raise UnreadableFileError("cannot read DICOM file", path=path, expected="a DICOM image",
                                      found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                                      fix="pass the files of the source series") from None
        meta = getattr(ds, "file_meta", None) or {}
        for keyword in ("SOPClassUID", "SOPInstanceUID"):  # blanked by some exports; the file meta keeps them
            if not ds.get(keyword) and meta.get(f"MediaStorage{keyword}"):
                setattr(ds, keyword, meta.get(f"MediaStorage{keyword}"))
        out.append(ds)
    _fill_blank_uids(out)
    return out


def _fill_blank_uids(headers: list) -> None:
    """Study and series UIDs some exports blank (type 1 in the source, so a SEG referencing them would be invalid):
    the same derived UID for every file of the series, from its instances' UIDs, so writing twice gives the same
    references."""
    from pydicom.uid import generate_uid

    instances = sorted(str(ds.get("SOPInstanceUID", "")) for ds in headers)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(not str(ds.get(keyword, "") or "").strip() for ds in headers):
            uid = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in headers:
                if not str(ds.get(keyword, "") or "").strip():
                    setattr(ds, keyword, uid)


#: Patient/study attributes (type 2: present, may be empty) a SEG copies from its source; blank ones are added.
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _plane(ds, path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
    if int(ds.get("NumberOfFrames") or 1) > 1 or not ipp or not iop or not ps:
        raise UnsupportedInputError("source is not a single-frame image with patient geometry", path=path,
                                    expected="single-frame slices with ImagePositionPatient/Orientation",
                                    fix="pass the slice files of one classic (single-frame) series")
    return np.array(ipp, float), np.array(iop, float), (float(ps[0]), float(ps[1]))


def source_slices(files) -> tuple[list[Path], list, list[np.ndarray]]:
    """Files and headers of one stack of slices sorted along its normal, and each slice's own RAS affine (pixel
    column ``i``, row ``j`` of that slice at ``k = 0``), whatever the gaps between slices or their tilt."""
    files = [Path(p) for p in files]
    where = files[0].parent if files else None
    if len(files) < 2:
        raise UnsupportedInputError("DICOM SEG source needs at least two slices", path=where,
                                    found=f"{len(files)} file(s)", fix="pass the files of the source series")
    headers = _read_headers(files)
    planes = [_plane(ds, p) for ds, p in zip(headers, files)]
    ds0, (_, iop, (dr, dc)) = headers[0], planes[0]
    for ds, (_, o, s), path in zip(headers, planes, files):
        same = all(str(ds.get(k)) == str(ds0.get(k)) for k in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows",
                                                               "Columns"))
        if not same or not np.allclose(o, iop, atol=1e-3) or not np.allclose(s, (dr, dc), atol=1e-4):
            raise UnsupportedInputError("source files are not one stack of slices", path=path,
                                        expected="one series, orientation, matrix size and pixel spacing",
                                        fix="pass the files of one stack (scan_dicom(...).files)")
    col_dir, row_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(col_dir, row_dir) / np.linalg.norm(np.cross(col_dir, row_dir))
    pos = np.array([p for p, _, _ in planes])
    order = np.argsort(pos @ normal, kind="stable")
    if np.any(np.diff((pos @ normal)[order]) < SAME_POSITION_MM):
        raise UnsupportedInputError("source slices share a position (4D or duplicated series)", path=where,
                                    expected="one slice per position", fix="pass the files of one 3D volume")
    affines = []
    for i in order:
        lps = np.eye(4)
        lps[:3] = np.stack([col_dir * dc, row_dir * dr, normal, pos[i]], axis=1)
        affines.append(LPS_TO_RAS @ lps)
    return [files[i] for i in order], [headers[i] for i in order], affines


def source_grid(files) -> tuple[list[Path], list, np.ndarray]:
    """Files and headers sorted along the slice normal, and the RAS affine of their grid.

    The affine is the one :func:`load_dicom_series` builds for these files when it does not
    resample. Raises :class:`GeometryError` when it would resample or de-tilt them.
    """
    files, headers, affines = source_slices(files)
    where = files[0].parent
    pos = np.array([a[:3, 3] for a in affines])
    col_dir, row_dir, normal = (affines[0][:3, c] / np.linalg.norm(affines[0][:3, c]) for c in range(3))
    dc, dr = (float(np.linalg.norm(affines[0][:3, c])) for c in range(2))
    t = pos @ normal
    steps = np.diff(t)
    drift = float(np.abs((pos - pos[0]) @ np.stack([col_dir, row_dir], axis=1)).max())
    median = float(np.median(steps))
    found = None
    if drift > max(TILT_TOL[0], TILT_TOL[1] * min(dr, dc)):
        found = f"gantry-tilted slices (origins drift {drift:.2f} mm in-plane), which are de-tilted when loaded"
    elif np.any(np.abs(steps - median) > max(UNEVEN_TOL[0], UNEVEN_TOL[1] * median)):
        found = (f"uneven slice gaps {np.unique(np.round(steps, 3)).tolist()} mm (missing slices?), "
                 "which are resampled when loaded")
    if found:
        raise GeometryError(_ON_ORIGINAL, path=where, expected="evenly spaced, untilted slices", found=found,
                            fix=_OTHER_FORMAT)
    affine = affines[0].copy()
    affine[:3, 2] = affines[0][:3, 2] * (t[-1] - t[0]) / (len(t) - 1)
    return files, headers, affine


def labels_on_slices(labels: Volume, slice_affines: list[np.ndarray], cols: int, rows: int) -> np.ndarray:
    """Labels ``(cols, rows, n)`` on the original source slices, each pixel taking the label of the nearest voxel of
    ``labels`` (any grid, e.g. the even or de-tilted one the series was resampled to); 0 outside it."""
    inv = np.linalg.inv(np.asarray(labels.affine, dtype=np.float64))
    arr = np.asarray(labels.array)
    shape = np.array(arr.shape[:3])
    ii, jj = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64), indexing="ij")
    pix = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
    out = np.zeros((cols, rows, len(slice_affines)), dtype=arr.dtype)
    for k, aff in enumerate(slice_affines):
        idx = np.rint((inv @ aff @ pix)[:3]).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < shape[:, None]), axis=0)
        plane = np.zeros(ii.size, dtype=arr.dtype)
        plane[ok] = arr[idx[0, ok], idx[1, ok], idx[2, ok]]
        out[..., k] = plane.reshape(cols, rows)
    return out


def source_labels(labels: Volume, source_files) -> tuple[list[Path], list, np.ndarray, list[np.ndarray]]:
    """``(files, headers, labels, slice_affines)``: the source slices sorted along their normal and the labels on
    them. Labels on the source grid are taken as they are (checked voxel for voxel); labels of a series the loader
    resampled (uneven gaps, missing slices) or de-tilted are mapped back onto the original slices, each pixel
    from the nearest voxel."""
    files, headers, affines = source_slices(source_files)
    where = files[0].parent
    cols, rows = int(headers[0].Columns), int(headers[0].Rows)
    try:
        _, _, affine = source_grid(files)
    except GeometryError:
        affine = None  # irregular slices: the labels can only lie on a resampled grid
    if affine is not None and not (labels.meta.get("resampled") or labels.meta.get("detilted")):
        check_labels_on_source(labels, affine, headers, where)
        return files, headers, np.asarray(labels.array), affines
    if np.asarray(labels.array).ndim != 3:
        raise GeometryError("labels are not a 3D volume", path=where, expected="a 3D label map",
                            found=str(np.asarray(labels.array).shape), fix="pass the label volume medseg predicted")
    return files, headers, labels_on_slices(labels, affines, cols, rows), affines


def check_labels_on_source(labels: Volume, affine: np.ndarray, headers, where: Path) -> None:
    """Refuses labels that do not lie exactly on the grid of the source slices (``source_grid``'s affine)."""
    cols, rows, n = int(headers[0].Columns), int(headers[0].Rows), len(headers)
    if labels.array.ndim != 3 or labels.shape != (cols, rows, n):
        what = "slice count" if labels.shape[:2] == (cols, rows) else "shape"
        raise GeometryError(f"label {what} differs from the source series", path=where,
                            expected=f"{(cols, rows, n)} (columns, rows, slices)", found=str(labels.array.shape),
                            fix="predict on this series as loaded by load_dicom_series")
    diff = float(np.abs(labels.affine - affine).max())
    if diff > GRID_TOL_MM:
        raise GeometryError(f"label grid differs from the source slices by {diff:.3g} mm", path=where,
                            expected=np.array2string(affine, precision=4),
                            found=np.array2string(labels.affine, precision=4),
                            fix="predict on this series as loaded by load_dicom_series, or write NIfTI output")


def _descriptions(infos: list[LabelInfo], model_name: str | None, model_version: str | None) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medseg

    def _concept(code: Code):
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medseg {model_name}" if model_name else "medseg", family=codes.cid7162.ArtificialIntelligence,
        version=model_version or medseg.__version__, source="medseg")
    out = []
    for number, info in enumerate(infos, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=info.name[:64], segmented_property_category=_concept(info.category),
            segmented_property_type=_concept(info.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(*info.color))
        if info.modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_concept(info.modifier)]
        out.append(desc)
    return out


def write_dicom_seg(labels: Volume, source_files, path: str | Path, infos: list[LabelInfo], *,
                    series_description: str = "medseg segmentation", series_number: int | None = None,
                    manufacturer: str = "medseg", software_version: str | None = None,
                    model_name: str | None = None, model_version: str | None = None,
                    content_creator: str | None = None, series_uid: str | None = None,
                    anonymize: bool = False) -> Path:
    """Write ``labels`` (on the grid of ``source_files``) as a BINARY DICOM SEG at ``path``.

    One segment per ``infos`` entry; every non-zero label value needs one. ``series_number``
    defaults to the source's plus 1000. Labels must lie exactly on the grid of the source slices (else
    :class:`GeometryError`), unless they come from a series the loader resampled (uneven gaps, missing slices) or
    de-tilted: those are mapped back onto the original slices (:func:`source_labels`). ``anonymize`` de-identifies
    the patient and study
    attributes the SEG copies from its source (:func:`medseg.core.privacy.anonymize_dataset`).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    import medseg

    path = Path(path)
    files, headers, array, _ = source_labels(labels, source_files)
    where = files[0].parent
    for ds in headers:
        for keyword in (k for k in PATIENT_STUDY_TYPE2 if k not in ds):
            setattr(ds, keyword, "")
    values = [int(i.value) for i in infos]
    if len(set(values)) != len(values) or min(values, default=1) < 1:
        raise OutputError("label descriptions must have distinct values above 0", path=path,
                          found=str(values), fix="pass medseg.core.labels.label_infos(...) for the model's labels")
    present = np.unique(array)
    missing = sorted(set(present.tolist()) - {0} - set(values))
    if missing:
        raise OutputError("label values without a description", path=path, expected=f"values in {values}",
                          found=str(missing[:10]), fix="pass a LabelInfo for every label value")
    lut = np.zeros(max(values + [int(present.max())]) + 1, np.uint8 if len(values) < 256 else np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    frames = lut[array.astype(np.int64)].transpose(2, 1, 0)  # (i, j, k) -> (slice, row, column)
    number = series_number if series_number is not None else int(headers[0].get("SeriesNumber") or 0) + 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=np.ascontiguousarray(frames),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(infos, model_name, model_version),
            series_instance_uid=series_uid or generate_uid(), series_number=number, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer=manufacturer, manufacturer_model_name="medseg",
            software_versions=software_version or medseg.__version__, device_serial_number="0",
            series_description=series_description[:64], content_label="SEGMENTATION",
            content_description=series_description[:64], content_creator_name=content_creator,
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError("cannot build the DICOM SEG from this source series", path=where,
                          found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                          fix="check that the files are the slices of one image series") from None
    from medseg.core.privacy import anonymize_dataset, complete_deidentification_record

    if anonymize:
        anonymize_dataset(seg)
    complete_deidentification_record(seg)
    return atomic_write(path, lambda tmp: seg.save_as(tmp))


def _code(item) -> Code:
    return Code(str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))


def _segment(desc) -> dict[str, Any]:
    typ = desc.SegmentedPropertyTypeCodeSequence[0]
    mod = typ.get("SegmentedPropertyTypeModifierCodeSequence")
    algo = (desc.get("SegmentationAlgorithmIdentificationSequence") or [{}])[0]
    return {"label": str(desc.SegmentLabel), "category": _code(desc.SegmentedPropertyCategoryCodeSequence[0]),
            "type": _code(typ), "modifier": _code(mod[0]) if mod else None,
            "algorithm_type": str(desc.SegmentAlgorithmType), "algorithm_name": str(algo.get("AlgorithmName", "")),
            "algorithm_version": str(algo.get("AlgorithmVersion", "")),
            "cielab": tuple(desc.get("RecommendedDisplayCIELabValue") or ())}


def read_dicom_seg(path: str | Path, source_files=None) -> tuple[np.ndarray, dict[str, Any]]:
    """The label array ``(i, j, k)`` of a SEG (values: segment numbers) and what describes it.

    With ``source_files`` the array has one slice per file in the given order; frames are
    matched by ReferencedSOPInstanceUID, else by position. Without them, slice k is the k-th
    distinct frame position along the slice normal (only slices holding a segment).
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user file
        raise UnreadableFileError("cannot read DICOM SEG", path=path, expected="a DICOM Segmentation",
                                  found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200], fix="check the file") from None
    n, rows, cols = int(seg.get("NumberOfFrames") or 1), int(seg.Rows), int(seg.Columns)
    pixels = np.asarray(seg.pixel_array).reshape(n, rows, cols)
    if (kind := str(seg.SegmentationType)) == "FRACTIONAL":
        pixels = pixels > int(seg.MaximumFractionalValue) / 2
    iop = np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    numbers, refs, positions = [], [], []
    for item in seg.PerFrameFunctionalGroupsSequence:
        ident = item.get("SegmentIdentificationSequence")
        numbers.append(int(ident[0].ReferencedSegmentNumber) if ident else None)
        positions.append([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        src = [s for d in item.get("DerivationImageSequence") or [] for s in d.get("SourceImageSequence") or []]
        refs.append(str(src[0].ReferencedSOPInstanceUID) if src else None)
    positions = np.array(positions).reshape(n, 3)
    if source_files is not None:
        headers = _read_headers(source_files)
        if (int(headers[0].Rows), int(headers[0].Columns)) != (rows, cols):
            raise GeometryError("SEG frames and source slices differ in size", path=path,
                                expected=f"{rows}x{cols}", found=f"{headers[0].Rows}x{headers[0].Columns}",
                                fix="pass the source series of this SEG")
        uids = {str(ds.SOPInstanceUID): k for k, ds in enumerate(headers)}
        slice_pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    else:
        t = positions @ normal
        keep = np.sort(t)[np.r_[True, np.diff(np.sort(t)) > SAME_POSITION_MM]]
        uids, slice_pos = {}, np.array([positions[np.argmin(np.abs(t - v))] for v in keep]).reshape(-1, 3)
    out = np.zeros((len(slice_pos), rows, cols), np.uint16)
    frame_slice = []
    for f in range(n):
        k = uids.get(refs[f])
        if k is None:
            dist = np.linalg.norm(slice_pos - positions[f], axis=1)
            k = int(np.argmin(dist)) if dist.min() < SAME_POSITION_MM else None
        if k is None:
            raise GeometryError(f"SEG frame {f + 1} lies on no source slice", path=path,
                                found=f"frame position {positions[f].round(3).tolist()}",
                                fix="pass the source series this SEG was made on")
        frame_slice.append(k)
        if numbers[f] is None:  # LABELMAP: pixel values are segment numbers
            np.copyto(out[k], pixels[f], where=pixels[f] > 0, casting="unsafe")
        else:
            out[k][pixels[f] > 0] = numbers[f]
    ref_series = seg.get("ReferencedSeriesSequence") or []
    info = {
        "segments": {int(d.SegmentNumber): _segment(d) for d in seg.SegmentSequence},
        "frame_positions": positions, "frame_slices": frame_slice, "frame_segments": numbers, "frame_sources": refs,
        "slice_positions": slice_pos, "segmentation_type": kind, "sop_class_uid": str(seg.SOPClassUID),
        "study_uid": str(seg.StudyInstanceUID), "series_uid": str(seg.SeriesInstanceUID),
        "frame_of_reference_uid": str(seg.get("FrameOfReferenceUID", "")),
        "referenced_series_uids": [str(s.SeriesInstanceUID) for s in ref_series],
        "referenced_instances": [str(i.ReferencedSOPInstanceUID) for s in ref_series
                                 for i in s.ReferencedInstanceSequence],
    }
    return np.ascontiguousarray(out.transpose(2, 1, 0)), info
