"""Reading and writing volumes with their geometry."""

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
    "VOLUME_SUFFIXES",
    "Volume",
    "affine_from_itk",
    "atomic_write",
    "case_name",
    "check_same_grid",
    "load_volume",
    "same_grid",
    "save_volume",
    "volume_suffix",
]
