"""Preprocessing and augmentation transforms (MONAI array transforms plus dictionary wrappers)."""

from medseg.preprocessing.intensity import (
    CT_PRESETS,
    INTENSITY_MODES,
    CTWindow,
    CTWindowd,
    PercentileNorm,
    PercentileNormd,
    ZScore,
    ZScored,
    ct_window_bounds,
)
from medseg.preprocessing.pipeline import (
    LoadVolumed,
    inference_transforms,
    preprocess_transforms,
    train_transforms,
    val_transforms,
    volume_to_metatensor,
)

__all__ = [
    "CT_PRESETS",
    "INTENSITY_MODES",
    "CTWindow",
    "CTWindowd",
    "LoadVolumed",
    "PercentileNorm",
    "PercentileNormd",
    "ZScore",
    "ZScored",
    "ct_window_bounds",
    "inference_transforms",
    "preprocess_transforms",
    "train_transforms",
    "val_transforms",
    "volume_to_metatensor",
]
