"""Output formats for label volumes, chosen with ``--format`` (several at once allowed).

| format      | file                       | for                                       |
|-------------|----------------------------|-------------------------------------------|
| ``nifti``   | ``<name>.nii.gz``          | research tools, nnU-Net, FSL, ITK-SNAP    |
| ``nrrd``    | ``<name>.nrrd``            | ITK, plain 3D Slicer label maps           |
| ``seg.nrrd``| ``<name>.seg.nrrd``        | 3D Slicer segmentations with names, colours, terminology |
| ``dicom-seg``| ``<name>.dcm``            | PACS and DICOM viewers (DICOM input only) |
| ``rtstruct``| ``<name>.rtstruct.dcm``    | radiotherapy planning, viewers that take RT structures (DICOM input only) |

Every writer checks that the labels lie on the source grid before it writes, and writes
atomically.
"""

from __future__ import annotations

from pathlib import Path

from medseg.core.errors import ConfigError, UnsupportedInputError
from medseg.io.volume import Volume, save_volume

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm",
           "rtstruct": ".rtstruct.dcm"}
DICOM_FORMATS = ("dicom-seg", "rtstruct")
"""Formats that reference the source DICOM series (DICOM input only)."""


def check_formats(formats: list[str] | None, *, default: str = "nifti") -> list[str]:
    out = list(dict.fromkeys(formats or [default]))
    for fmt in out:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown output format '{fmt}'", expected=" | ".join(FORMATS), found=repr(fmt),
                              fix="use --format with one of those (repeat it for several)")
    return out


def write_labels(labels: Volume, source: Volume, base: Path, formats: list[str], *, infos=None,
                 source_files: list[Path] | None = None, model_name: str = "medseg",
                 anonymize: bool = False) -> list[Path]:
    """Write ``labels`` as every format in ``formats``; ``base`` is the output path without suffix.

    ``anonymize`` de-identifies DICOM SEG and RTSTRUCT outputs (the other formats hold no patient data)."""
    written = []
    for fmt in formats:
        path = base.parent / f"{base.name}{FORMATS[fmt]}"
        if fmt in ("nifti", "nrrd"):
            written.append(save_volume(labels, path, reference=source))
        elif fmt == "seg.nrrd":
            from medseg.io.slicer_formats import write_seg_nrrd

            written.append(write_seg_nrrd(labels, path, infos, reference=source))
        elif fmt in DICOM_FORMATS:
            if not source_files:
                what = "DICOM SEG" if fmt == "dicom-seg" else "RTSTRUCT"
                raise UnsupportedInputError(f"{what} output needs a DICOM input series", path=source.source,
                                            expected="a DICOM series as input", found="a NIfTI/NRRD volume",
                                            fix="use --format nifti, nrrd or seg.nrrd for this input")
            if fmt == "dicom-seg":
                from medseg.io.dicom_seg import write_dicom_seg

                written.append(write_dicom_seg(labels, source_files, path, infos, model_name=model_name,
                                               anonymize=anonymize))
            else:
                from medseg.io.rtstruct import write_rtstruct

                written.append(write_rtstruct(labels, source_files, path, infos, model_name=model_name,
                                              anonymize=anonymize))
    return written


def write_color_tables(outdir: Path, formats: list[str], infos) -> list[Path]:
    """``labels.ctbl`` and ``labels.csv`` (3D Slicer colour tables) beside plain NIfTI/NRRD label maps."""
    if not set(formats) & {"nifti", "nrrd"}:
        return []
    from medseg.io.slicer_formats import write_color_table

    return [write_color_table(outdir / "labels.ctbl", infos), write_color_table(outdir / "labels.csv", infos)]
