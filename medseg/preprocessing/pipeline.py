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

from medseg.io.volume import Volume, background_value, load_volume
from medseg.preprocessing.intensity import intensity_transform


#: arrays above this many voxels that are not in C order are copied into one in slabs (:func:`_channel_first_tensor`)
SLAB_COPY_VOXELS = 1 << 22


def _channel_first_tensor(array: np.ndarray, dtype) -> torch.Tensor:
    """``(C, X, Y, Z)`` in C order and ``dtype`` from a ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array in any order.

    NIfTI and NRRD readers hand over arrays in Fortran order; one whole-volume copy into C order walks memory
    with large strides (a 512×512×600 int16 CT: 4.4 s through ``np.ascontiguousarray`` on 2 cores), while
    copying 16 planes of the last axis at a time keeps each block in cache (1.1 s, the same values)."""
    if array.flags.c_contiguous or array.size < SLAB_COPY_VOXELS or any(s < 0 for s in array.strides) or \
            not array.dtype.isnative or array.dtype.kind not in "biuf":
        data = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)
        return data.permute(3, 0, 1, 2).contiguous() if data.ndim == 4 else data[None]
    import warnings

    with warnings.catch_warnings():  # a read-only array is only read here
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(array)
    src = src.permute(3, 0, 1, 2) if src.ndim == 4 else src[None]
    out = torch.empty(src.shape, dtype=dtype)
    for k in range(0, src.shape[-1], 16):
        out[..., k:k + 16] = src[..., k:k + 16]
    return out


def volume_to_metatensor(vol: Volume, dtype=torch.float32) -> MetaTensor:
    """Channel-first MetaTensor ``(C, X, Y, Z)`` carrying the volume's affine (C = 1 for a 3D array; the
    sequences of a ``(X, Y, Z, C)`` array otherwise)."""
    data = _channel_first_tensor(vol.array, dtype)
    affine = torch.as_tensor(vol.affine, dtype=torch.float64)
    meta = {
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(vol.shape),
        "filename_or_obj": vol.source or "",
        "space": "RAS",
    }
    return MetaTensor(data, affine=affine, meta=meta)


def load_case_image(value, channels: list[str] | None = None, reference: str | None = None,
                    case: str = "case") -> Volume:
    """The image of a case as one Volume: a file or Volume (one sequence, or a 4D image holding all of them in
    ``channels`` order), or a list/mapping of one file per sequence, read onto the ``reference`` sequence's grid."""
    from medseg.io.sequences import load_sequences, split_channels

    names = list(channels or ["image"])
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        if missing:
            from medseg.core.errors import DataError

            raise DataError(f"case {case} has no {missing[0]} sequence", expected=", ".join(names),
                            found=", ".join(value) or "none", fix=f"give the {missing[0]} file")
        return load_sequences({n: value[n] for n in names}, reference or names[0], case)
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        else:
            if len(value) != len(names):
                from medseg.core.errors import DataError

                raise DataError(f"case {case} has {len(value)} sequence files, the model takes {len(names)}",
                                expected=f"{len(names)} ({', '.join(names)})", found=str(len(value)),
                                fix="give one file per sequence, in data.channels order")
            return load_sequences(dict(zip(names, value)), reference or names[0], case)
    vol = value if isinstance(value, Volume) else load_volume(value, channels=len(names) > 1)
    if len(names) > 1 or vol.channels > 1:
        vol = split_channels(vol, names, case)
    return vol


class LoadVolumed(MapTransform):
    """Load file paths under ``keys`` with :func:`medseg.io.load_volume` (geometry kept).

    Labels (``label_keys``) are read as integers, images as float32. An image of several sequences (a
    list of files, a mapping from sequence name to file, or a 4D file) becomes ``(C, X, Y, Z)`` on the
    ``reference`` sequence's grid; ``channels`` names the sequences in the model's order.
    """

    def __init__(self, keys, label_keys=(), allow_missing_keys: bool = False, channels: list[str] | None = None,
                 reference: str | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)
        self.channels = channels
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if key in self.label_keys:
                vol = value if isinstance(value, Volume) else load_volume(value)
            else:
                vol = load_case_image(value, self.channels, self.reference, str(d.get("name", "case")))
            if key in self.label_keys:
                d[key] = volume_to_metatensor(vol, dtype=torch.float32).round()
            else:
                d[key] = volume_to_metatensor(vol, dtype=torch.float32)
        return d


def preprocess_transforms(cfg, *, with_label: bool, train: bool = False, teacher=None) -> list:
    """Deterministic steps: load, reorient, resample, normalise (and crop for training).

    ``teacher``: a transform that adds ``soft`` (a teacher model's foreground-class probabilities on the
    preprocessed grid, knowledge distillation); it runs after normalisation, and ``soft`` is cropped with
    the image and label."""
    keys = ["image", "label"] if with_label else ["image"]
    pp = cfg.preprocess
    steps: list = [LoadVolumed(keys, label_keys=["label"] if with_label else [], channels=cfg.channel_names,
                               reference=cfg.reference_channel)]
    if pp.orientation:
        steps.append(Orientationd(keys, axcodes=pp.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pp.nnunet is not None:
        if with_label or train or teacher is not None:
            from medseg.core.errors import ConfigError

            raise ConfigError("models imported from nnU-Net predict only", expected="medseg predict/batch/pacs",
                              found="training or validation with an imported nnU-Net model",
                              fix="train with nnU-Net and import the result again, or train a medseg model")
        return [*steps, NnUNetPreprocessd("image", pp.nnunet)]
    if pp.spacing is not None:
        modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
        steps.append(Spacingd(keys, pixdim=pp.spacing, mode=modes))
    norm = intensity_transform(pp.intensity, ["image"])
    if norm is not None:
        steps.append(norm)
    if teacher is not None:
        steps.append(teacher)
        keys = [*keys, "soft"]
    if train and pp.crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", select_fn=foreground_mask, allow_smaller=True))
    return steps


class NnUNetPreprocessd(MapTransform):
    """nnU-Net v2's preprocessing of an imported model (:mod:`medseg.preprocessing.nnunet`): the image becomes the
    network's input in nnU-Net's axis order, with the affine of that grid; ``meta["nnunet"]`` keeps what the way
    back needs (crop box, shapes, spacings, and the grid it started from)."""

    def __init__(self, keys, cfg) -> None:
        super().__init__(keys)
        self.cfg = cfg

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from dataclasses import asdict

        from medseg.preprocessing import nnunet

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            affine = np.asarray(img.affine, dtype=np.float64)
            out, proc_affine, grid = nnunet.preprocess(img.as_tensor(), affine, self.cfg)
            meta = {"nnunet": {**asdict(grid), "input_affine": affine, "input_shape": list(img.shape[1:])},
                    "filename_or_obj": img.meta.get("filename_or_obj", "")}
            d[key] = MetaTensor(torch.from_numpy(out), affine=torch.as_tensor(proc_affine), meta=meta)
        return d


def foreground_mask(image) -> torch.Tensor:
    """Voxels where any channel differs from its background fill (0 after ``nonzero`` z-scoring), shaped
    like ``image`` (MONAI's ``CropForeground`` selection function)."""
    x = torch.as_tensor(image)
    mask = torch.zeros_like(x[:1], dtype=torch.bool)
    for c in range(x.shape[0]):
        mask |= x[c:c + 1] != background_value(x[c])
    return mask.expand_as(x)


def foreground_box(image, margin: int = 0) -> tuple[slice, ...] | None:
    """The bounding box (spatial slices) of :func:`foreground_mask` grown by ``margin`` voxels, or None when
    the image has no foreground."""
    mask = foreground_mask(image)[0]
    if not bool(mask.any()):
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = torch.nonzero(mask.any(dim=other)).flatten()
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the cut that maximises the between-class variance of its histogram.
    Where empty bins between two classes tie for the maximum, the middle of that gap."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    m0 = (hist * centres).cumsum(0)
    total, mean_all = w0[-1], m0[-1]
    w1 = total - w0
    between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1 / total).clamp_min(1e-12)
    between[w1 <= 0] = 0
    between = between[:-1]
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten()
    k = (int(best[0]) + int(best[-1]) + 2) / 2  # cuts after bins best[0] .. best[-1]: their middle
    return float(lo + k * (hi - lo) / bins)


#: voxels of background kept around the body by :func:`body_box`, on the model's grid
BODY_MARGIN = 8
#: a face of the volume counts as air when at least this share of its voxels (the fill aside) is below the threshold
AIR_FACE_SHARE = 0.75


def _body_extent(x: torch.Tensor, sample_step: int) -> list[tuple[int, int]]:
    """Per axis, the planes ``[first, last + 1)`` of one sequence ``x`` (spatial) that hold body (see
    :func:`body_box`)."""
    corners = x[tuple(slice(None, None, n - 1) if n > 1 else slice(None) for n in x.shape)].reshape(-1)
    fill = float(corners[0]) if bool((corners == corners[0]).all()) else None
    sample = x[tuple(slice(None, None, sample_step) for _ in x.shape)].reshape(-1)
    if fill is not None:
        sample = sample[sample != fill]
    t = otsu_threshold(sample) if sample.numel() > 1 and float(sample.max()) > float(sample.min()) else None
    masks = {}  # what each kind of face leaves inside: voxels above the threshold, voxels that are not fill
    if fill is not None:
        masks["fill"] = x != fill
    if t is not None:
        masks["air"] = x > t if fill is None else (x > t) & masks["fill"]
    dims = range(x.ndim)
    extent = []
    for axis in dims:
        other = tuple(d for d in dims if d != axis)
        planes = {kind: mask.any(dim=other) for kind, mask in masks.items()}
        ends = []
        for side in (0, x.shape[axis] - 1):
            face = x.select(axis, side).reshape(-1)
            if fill is not None:
                face = face[face != fill]
            if face.numel() == 0 and "fill" in planes:
                kind = "fill"  # the face is all fill: planes of fill alone are outside
            elif t is not None and face.numel() and float((face <= t).float().mean()) >= AIR_FACE_SHARE:
                kind = "air"  # the face is air: planes with no voxel above the threshold are outside
            else:
                kind = None  # tissue reaches this face: nothing is cut on this side
            if kind is None:
                ends.append(side)
                continue
            idx = torch.nonzero(planes[kind]).flatten()
            if idx.numel() == 0:
                ends.append(side)
            else:
                ends.append(int(idx[0]) if side == 0 else int(idx[-1]))
        extent.append((ends[0], ends[1] + 1))
    return extent


def body_box(image, margin: int = BODY_MARGIN, sample_step: int = 4) -> tuple[slice, ...] | None:
    """The bounding box of the body over all sequences, grown by ``margin`` voxels; None for an image of one
    intensity.

    Per sequence, Otsu's threshold (on every ``sample_step``-th voxel along each axis, the fill aside) separates
    the dark class (air, scanner background) from tissue. A side of the volume is cut only where its outermost
    plane is air (at least :data:`AIR_FACE_SHARE` of it below the threshold) or all fill (the constant outside
    a mask or a CT's field of view, the value all eight corners share), and only up to the first plane that holds
    one voxel above the threshold (or one that is not fill): dark tissue inside the body (lungs, bowel gas,
    CSF) is never cut, and a side that tissue reaches is kept whole."""
    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    if all(float(x[c].max()) <= float(x[c].min()) for c in range(x.shape[0])):
        return None
    spatial = tuple(int(s) for s in x.shape[1:])
    lo, hi = list(spatial), [0] * len(spatial)
    for c in range(x.shape[0]):
        for axis, (a, b) in enumerate(_body_extent(x[c], sample_step)):
            lo[axis], hi[axis] = min(lo[axis], a), max(hi[axis], b)
    return tuple(slice(max(a - margin, 0), min(b + margin, n)) for a, b, n in zip(lo, hi, spatial))


def train_transforms(cfg, teacher=None) -> Compose:
    """Preprocessing, patch sampling and augmentation for training. With a ``teacher`` transform (knowledge
    distillation), its soft targets (``soft``) are sampled and augmented with the image: interpolated
    bilinearly where the label is taken nearest, padded with 0 (background certain)."""
    patch = list(cfg.patch.size)
    ratio = cfg.patch.foreground_ratio
    steps = preprocess_transforms(cfg, with_label=True, train=True, teacher=teacher)
    keys = ["image", "label"] + (["soft"] if teacher is not None else [])
    modes = ("bilinear", "nearest") + (("bilinear",) if teacher is not None else ())
    steps += [
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=patch,
            pos=ratio, neg=1.0 - ratio, num_samples=cfg.patch.samples_per_volume,
            image_key="image", image_threshold=-np.inf,
        ),
    ]
    aug = cfg.augment
    if aug.enabled:
        for axis in aug.flip_axes:
            steps.append(RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis))
        if aug.affine_prob > 0 and (aug.rotate_deg > 0 or aug.scale > 0):
            rad = float(np.deg2rad(aug.rotate_deg))
            steps.append(RandAffined(
                keys, prob=aug.affine_prob, rotate_range=(rad, rad, rad),
                scale_range=(aug.scale,) * 3, mode=modes, padding_mode="border",
            ))
        if aug.elastic_prob > 0:
            steps.append(Rand3DElasticd(
                keys, sigma_range=tuple(aug.elastic_sigma), magnitude_range=tuple(aug.elastic_magnitude),
                prob=aug.elastic_prob, mode=modes, padding_mode="border",
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
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)


def val_transforms(cfg) -> Compose:
    return Compose(preprocess_transforms(cfg, with_label=True))


def inference_transforms(cfg) -> Compose:
    return Compose(preprocess_transforms(cfg, with_label=False))
