"""Preprocessing pipelines built from a config: the same steps for training,
validation and inference, so a model always sees data prepared the same way."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from medseg.io.volume import Volume, load_volume
from medseg.preprocessing.intensity import intensity_transform


def volume_to_metatensor(vol: Volume, dtype=torch.float32) -> MetaTensor:
    """Channel-first MetaTensor ``(1, X, Y, Z)`` carrying the volume's affine."""
    data = torch.as_tensor(np.ascontiguousarray(vol.array)).to(dtype)[None]
    affine = torch.as_tensor(vol.affine, dtype=torch.float64)
    meta = {
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(vol.shape),
        "filename_or_obj": vol.source or "",
        "space": "RAS",
    }
    return MetaTensor(data, affine=affine, meta=meta)


class LoadVolumed(MapTransform):
    """Load file paths under ``keys`` with :func:`medseg.io.load_volume` (geometry kept).

    Labels (``label_keys``) are read as integers, images as float32.
    """

    def __init__(self, keys, label_keys=(), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, Volume):
                vol = value
            else:
                vol = load_volume(value)
            if key in self.label_keys:
                d[key] = volume_to_metatensor(vol, dtype=torch.float32).round()
            else:
                d[key] = volume_to_metatensor(vol, dtype=torch.float32)
        return d


def preprocess_transforms(cfg, *, with_label: bool, train: bool = False) -> list:
    """Deterministic steps: load, reorient, resample, normalise (and crop for training)."""
    keys = ["image", "label"] if with_label else ["image"]
    pp = cfg.preprocess
    steps: list = [LoadVolumed(keys, label_keys=["label"] if with_label else [])]
    if pp.orientation:
        steps.append(Orientationd(keys, axcodes=pp.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pp.spacing is not None:
        modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
        steps.append(Spacingd(keys, pixdim=pp.spacing, mode=modes))
    norm = intensity_transform(pp.intensity, ["image"])
    if norm is not None:
        steps.append(norm)
    if train and pp.crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
    return steps


def train_transforms(cfg) -> Compose:
    patch = list(cfg.patch.size)
    ratio = cfg.patch.foreground_ratio
    steps = preprocess_transforms(cfg, with_label=True, train=True)
    steps += [
        SpatialPadd(["image", "label"], spatial_size=patch),
        RandCropByPosNegLabeld(
            ["image", "label"], label_key="label", spatial_size=patch,
            pos=ratio, neg=1.0 - ratio, num_samples=cfg.patch.samples_per_volume,
            image_key="image", image_threshold=-np.inf,
        ),
    ]
    aug = cfg.augment
    if aug.enabled:
        for axis in aug.flip_axes:
            steps.append(RandFlipd(["image", "label"], prob=aug.flip_prob, spatial_axis=axis))
        if aug.affine_prob > 0 and (aug.rotate_deg > 0 or aug.scale > 0):
            rad = float(np.deg2rad(aug.rotate_deg))
            steps.append(RandAffined(
                ["image", "label"], prob=aug.affine_prob, rotate_range=(rad, rad, rad),
                scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="border",
            ))
        if aug.elastic_prob > 0:
            steps.append(Rand3DElasticd(
                ["image", "label"], sigma_range=tuple(aug.elastic_sigma), magnitude_range=tuple(aug.elastic_magnitude),
                prob=aug.elastic_prob, mode=("bilinear", "nearest"), padding_mode="border",
            ))
        if aug.intensity_prob > 0:
            steps.append(RandScaleIntensityd("image", factors=aug.intensity_scale, prob=aug.intensity_prob))
            steps.append(RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.intensity_prob))
        if aug.noise_prob > 0:
            steps.append(RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std))
        if aug.blur_prob > 0:
            lo, hi = aug.blur_sigma
            steps.append(RandGaussianSmoothd("image", sigma_x=(lo, hi), sigma_y=(lo, hi), sigma_z=(lo, hi),
                                             prob=aug.blur_prob))
        if aug.gamma_prob > 0:
            steps.append(RandAdjustContrastd("image", gamma=tuple(aug.gamma), prob=aug.gamma_prob))
    steps.append(EnsureTyped(["image", "label"], track_meta=False))
    return Compose(steps)


def val_transforms(cfg) -> Compose:
    return Compose(preprocess_transforms(cfg, with_label=True))


def inference_transforms(cfg) -> Compose:
    return Compose(preprocess_transforms(cfg, with_label=False))
