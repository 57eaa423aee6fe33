"""Reading and writing volumes with their geometry."""

from medseg.io.dicom import (
    MultipleSeriesError,
    SeriesInfo,
    load_dicom_series,
    scan_dicom,
)
from medseg.io.volume import (
    VOLUME_SUFFIXES,
    Volume,
    affine_from_itk,
    atomic_write,
    case_name,
    check_same_grid,
    load_volume,
    same_grid,
    save_volume,
    volume_suffix,
)

__all__ = [
    "MultipleSeriesError",
    "SeriesInfo",
    "VOLUME_SUFFIXES",
    "Volume",
    "affine_from_itk",
    "atomic_write",
    "case_name",
    "check_same_grid",
    "load_dicom_series",
    "load_volume",
    "same_grid",
    "save_volume",
    "scan_dicom",
    "volume_suffix",
]
