"""RT Structure Set output (``--format rtstruct``): one ROI per label, closed planar contours on the source slices.

Radiotherapy planning systems and many viewers read RTSTRUCT rather than DICOM SEG. Each label becomes an ROI
named and coloured from the model's labels; on every source slice where the label has voxels, its outlines are
traced with contourpy's marching squares on the label mask at the level :data:`LEVEL`, so every outline runs
0.45 pixel outside the centres of the outermost labelled pixels: readers that test pixel centres against the
outline and readers that round contour points to the nearest pixel and fill the polygon with its edge (rt-utils)
both get the labelled pixels back. A hole in a structure is an inner contour of its own;
readers that fill contours by the even-odd rule (as rasterising nested ``CLOSED_PLANAR`` contours is commonly
done) get the holes back. Each contour references the SOP instance of its slice, and the structure set references
the source series, study and frame of reference.

Why not highdicom: it writes SEG but has no RT Structure Set; rt-utils does, but it needs OpenCV. The header is
built here with pydicom, and ``dciodvfy`` (dicom3tools) checks the result in the tests.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from medseg.core.errors import OutputError
from medseg.core.labels import LabelInfo
from medseg.io.dicom_seg import PATIENT_STUDY_TYPE2, source_labels
from medseg.io.volume import LPS_TO_RAS, Volume, atomic_write

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT Referenced Study items use

LEVEL = 0.55
"""Iso-level of the contours on the 0/1 mask: 0.45 pixel out from a labelled pixel centre towards its unlabelled
neighbour (0.5 would put points exactly half-way, where rounding to the nearest pixel goes either way)."""

_COPY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "PatientAge", "PatientWeight",
         "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D mask ``(i, j)`` as arrays of ``(i, j)`` points (continuous voxel indices), traced
    by marching squares at :data:`LEVEL`; the first point is not repeated at the end."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)  # outlines close at the image border too
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(LEVEL):
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        # contourpy's x runs along the array's second axis: (x, y) = (j + 1, i + 1) in the padded array
        out.append(_drop_collinear(np.stack([pts[:, 1] - 1.0, pts[:, 0] - 1.0], axis=1)))
    return out


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """The closed polygon without the points that lie on a straight run between their neighbours (the same
    outline, far fewer points along a structure's straight edges)."""
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    a, b = pts - prev, nxt - pts
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = (np.abs(cross) > 1e-9) | ((a * b).sum(1) <= 0)
    return pts[keep] if keep.sum() >= 3 else pts


def _item(**kw):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def write_rtstruct(labels: Volume, source_files, path: str | Path, infos: list[LabelInfo], *,
                   series_description: str = "medseg segmentation", series_number: int | None = None,
                   manufacturer: str = "medseg", model_name: str | None = None, series_uid: str | None = None,
                   anonymize: bool = False) -> Path:
    """Write ``labels`` as an RT Structure Set at ``path``, with contours on the slices of ``source_files``: labels on
    the source grid as they are, labels of a series the loader resampled or de-tilted mapped back onto the original
    slices (:func:`medseg.io.dicom_seg.source_labels`)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

    import medseg

    path = Path(path)
    files, headers, arr, slice_affines = source_labels(labels, source_files)
    values = [int(i.value) for i in infos]
    if len(set(values)) != len(values) or min(values, default=1) < 1:
        raise OutputError("label descriptions must have distinct values above 0", path=path, found=str(values),
                          fix="pass medseg.core.labels.label_infos(...) for the model's labels")
    missing = sorted(set(np.unique(arr).tolist()) - {0} - set(values))
    if missing:
        raise OutputError("label values without a description", path=path, expected=f"values in {values}",
                          found=str(missing[:10]), fix="pass a LabelInfo for every label value")
    src = headers[0]
    now = datetime.datetime.now()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    # implicit VR, as RT objects are usually written: a long contour's ContourData exceeds the 64 kB an explicit-VR
    # DS value can hold
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _COPY:
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number if series_number is not None else int(src.get("SeriesNumber") or 0) + 2000
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer, ds.ManufacturerModelName = manufacturer, "medseg"
    ds.SoftwareVersions = medseg.__version__
    ds.OperatorsName = ""
    ds.StructureSetLabel = (f"medseg {model_name}" if model_name else "medseg")[:16]
    ds.StructureSetName = (model_name or "medseg")[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    frame_uid = str(src.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")

    def image_ref(h):
        return _item(ReferencedSOPClassUID=h.SOPClassUID, ReferencedSOPInstanceUID=h.SOPInstanceUID)

    series = _item(SeriesInstanceUID=src.SeriesInstanceUID, ContourImageSequence=Sequence([image_ref(h) for h in headers]))
    study = _item(ReferencedSOPClassUID=STUDY_COMPONENT_SOP_CLASS, ReferencedSOPInstanceUID=src.StudyInstanceUID,
                  RTReferencedSeriesSequence=Sequence([series]))
    ds.ReferencedFrameOfReferenceSequence = Sequence([_item(FrameOfReferenceUID=frame_uid,
                                                            RTReferencedStudySequence=Sequence([study]))])
    rois, contours, observations = [], [], []
    for number, info in enumerate(sorted(infos, key=lambda i: int(i.value)), start=1):
        rois.append(_item(ROINumber=number, ReferencedFrameOfReferenceUID=frame_uid, ROIName=info.name[:64],
                          ROIGenerationAlgorithm="AUTOMATIC",
                          ROIGenerationDescription=(f"medseg {model_name}" if model_name else "medseg")[:64]))
        items = []
        for k in range(arr.shape[2]):
            mask = arr[..., k] == int(info.value)
            if not mask.any():
                continue
            to_lps = LPS_TO_RAS @ slice_affines[k]  # this slice's own plane (slices may be uneven or tilted)
            for ij in slice_contours(mask):
                pts = np.column_stack([ij, np.zeros(len(ij)), np.ones(len(ij))]) @ to_lps.T
                data = [f"{v:.4f}".rstrip("0").rstrip(".") or "0" for v in pts[:, :3].reshape(-1)]
                items.append(_item(ContourImageSequence=Sequence([image_ref(headers[k])]),
                                   ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(ij),
                                   ContourNumber=len(items) + 1, ContourData=data))
        roi = _item(ROIDisplayColor=[int(c) for c in info.color], ReferencedROINumber=number)
        if items:
            roi.ContourSequence = Sequence(items)
        contours.append(roi)
        observations.append(_item(ObservationNumber=number, ReferencedROINumber=number,
                                  RTROIInterpretedType="ORGAN", ROIInterpreter=""))
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    from medseg.core.privacy import anonymize_dataset, complete_deidentification_record

    if anonymize:
        anonymize_dataset(ds)
    complete_deidentification_record(ds)
    return atomic_write(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))
