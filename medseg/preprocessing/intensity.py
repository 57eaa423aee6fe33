"""Intensity transforms: CT windowing with named HU presets and MRI normalisation.

Array transforms work on numpy arrays or tensors; the dictionary wrappers apply
them to the given keys (MONAI style).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

from medseg.core.config import CT_PRESETS, INTENSITY_MODES
from medseg.core.errors import ConfigError
from medseg.io.volume import background_value

def ct_window_bounds(preset: str | None = None, window: Sequence[float] | None = None) -> tuple[float, float]:
    """(low, high) HU bounds for a preset name or an explicit ``[level, width]``."""
    if window is not None:
        if len(window) != 2 or window[1] <= 0:
            raise ConfigError("bad CT window", expected="[level, width] with width > 0", found=str(window),
                              fix="e.g. window: [40, 80]")
        level, width = float(window[0]), float(window[1])
    else:
        if preset not in CT_PRESETS:
            raise ConfigError("unknown CT window preset", expected=" | ".join(CT_PRESETS), found=repr(preset),
                              fix="pick one of the presets or give window: [level, width]")
        level, width = CT_PRESETS[preset]
    return level - width / 2.0, level + width / 2.0


def _as_float(img):
    if isinstance(img, torch.Tensor):
        return img.float()
    return np.asarray(img, dtype=np.float32)


class CTWindow(Transform):
    """Clip to a HU window and scale it to [0, 1]."""

    def __init__(self, preset: str | None = None, window: Sequence[float] | None = None) -> None:
        self.low, self.high = ct_window_bounds(preset, window)

    def __call__(self, img):
        img = _as_float(img)
        out = (img - self.low) / (self.high - self.low)
        return out.clamp(0.0, 1.0) if isinstance(out, torch.Tensor) else np.clip(out, 0.0, 1.0)


def _slab_mean_std(plain: torch.Tensor, mask: torch.Tensor | None, slab_voxels: int) -> tuple[float, float]:
    """Mean and population std over ``mask`` (or all voxels) in one pass of last-axis slabs.

    Each slab gives its count, mean and sum of squared deviations, summed in float64; slabs are
    merged with Chan's pairwise update, so no float64 copy of the volume and no boolean-indexed
    copies are made (the two-pass version indexed every slab twice, about 3x slower on a CT).
    """
    from medseg.core.runtime import last_axis_slabs

    n, mean, m2 = 0, 0.0, 0.0
    for a, b in last_axis_slabs(plain.shape, slab_voxels):
        x = plain[..., a:b]
        m = mask[..., a:b] if mask is not None else None
        k = int(m.sum()) if m is not None else x.numel()
        if k == 0:
            continue
        xm = torch.where(m, x, 0.0) if m is not None else x.clone()
        mu = float(xm.sum(dtype=torch.float64)) / k
        d = xm.sub_(mu)
        if m is not None:
            d.mul_(m)
        q = float(d.square_().sum(dtype=torch.float64))
        delta, total = mu - mean, n + k
        mean += delta * k / total
        m2 += q + delta * delta * n * k / total
        n = total
    return mean, float(np.sqrt(m2 / n))


class ZScore(Transform):
    """Zero mean, unit variance, per channel (each MRI sequence on its own, as nnU-Net normalises MR).

    With ``nonzero`` the statistics cover the foreground only, the voxels that differ from the image's
    background fill (:func:`medseg.io.volume.background_value`: 0 for skull-stripped MR, the constant
    of an image normalised after stripping), and the background becomes 0. So raw scanner intensities and
    an already normalised copy of the same scan give the same input."""

    one_pass_voxels = 1 << 24  # above this, statistics are gathered slab by slab ...
    slab_voxels = 1 << 22  # ... of about this many voxels

    def __init__(self, nonzero: bool = True, eps: float = 1e-8) -> None:
        self.nonzero = nonzero
        self.eps = eps

    def __call__(self, img):
        img = _as_float(img)
        if isinstance(img, torch.Tensor):
            return self._torch(img)
        if img.ndim == 4:  # channel first
            return np.stack([self._numpy(c) for c in img])
        return self._numpy(img)

    def _numpy(self, img: np.ndarray) -> np.ndarray:
        mask = (img != background_value(img)) if self.nonzero else np.ones(img.shape, bool)
        if int(mask.sum()) == 0:
            return img * 0
        vals = img[mask]
        mean = vals.mean()
        std = float(vals.std())
        std = std if std > self.eps else 1.0
        out = (img - mean) / std
        if self.nonzero:
            out = out * mask
        return out

    def _torch(self, img: torch.Tensor) -> torch.Tensor:
        """Same result in bounded memory: statistics in float64 over slabs, one output tensor."""
        from monai.data import MetaTensor

        plain = img.as_tensor() if isinstance(img, MetaTensor) else img  # no per-operation metadata work
        if plain.ndim == 4 and plain.shape[0] > 1:
            out = torch.cat([self._channel(plain[c:c + 1]) for c in range(plain.shape[0])])
        else:
            out = self._channel(plain)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out

    def _channel(self, plain: torch.Tensor) -> torch.Tensor:
        spatial = plain[0] if plain.ndim == 4 else plain
        mask = (plain != background_value(spatial)) if self.nonzero else None
        count = int(mask.sum()) if mask is not None else plain.numel()
        if count == 0:
            return plain * 0
        if plain.numel() <= self.one_pass_voxels:  # small: one pass, as the numpy path computes it
            vals = plain[mask] if mask is not None else plain.reshape(-1)
            mean, std = float(vals.mean()), float(vals.std(unbiased=False))
        else:
            mean, std = _slab_mean_std(plain, mask, self.slab_voxels)
        std = std if std > self.eps else 1.0
        out = plain - mean
        out.div_(std)
        if mask is not None:
            out.mul_(mask)
        return out


class PercentileNorm(Transform):
    """Clip to the [lower, upper] percentiles, then z-score (robust for MR with outliers)."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5) -> None:
        self.lower = lower
        self.upper = upper

    def __call__(self, img):
        img = _as_float(img)
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img
        lo, hi = np.percentile(arr, [self.lower, self.upper])
        out = img.clamp(float(lo), float(hi)) if isinstance(img, torch.Tensor) else np.clip(img, lo, hi)
        return ZScore(nonzero=False)(out)


class ClipZScore(Transform):
    """Clip to fixed ``[lower, upper]``, then ``(x - mean) / std`` with fixed dataset statistics.

    The values come from a dataset fingerprint (nnU-Net's CT scheme: the 0.5/99.5 percentiles,
    mean and std of foreground voxels over the training set), so every image is scaled alike.
    """

    def __init__(self, lower: float, upper: float, mean: float, std: float) -> None:
        if not lower < upper or not std > 0:
            raise ConfigError("bad ct_fingerprint values", expected="clip [lower, upper] with lower < upper, std > 0",
                              found=f"clip [{lower}, {upper}], std {std}", fix="plan the dataset again")
        self.lower, self.upper, self.mean, self.std = float(lower), float(upper), float(mean), float(std)

    def __call__(self, img):
        img = _as_float(img)
        if isinstance(img, torch.Tensor):
            return (img.clamp(self.lower, self.upper) - self.mean) / self.std
        return (np.clip(img, self.lower, self.upper) - self.mean) / self.std


class _Dict(MapTransform):
    transform: Transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class CTWindowd(_Dict):
    def __init__(self, keys, preset=None, window=None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CTWindow(preset, window)


class ZScored(_Dict):
    def __init__(self, keys, nonzero: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ZScore(nonzero)


class PercentileNormd(_Dict):
    def __init__(self, keys, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = PercentileNorm(lower, upper)


class ClipZScored(_Dict):
    def __init__(self, keys, lower: float, upper: float, mean: float, std: float,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ClipZScore(lower, upper, mean, std)


def _fingerprint_values(cfg) -> tuple[float, float, float, float]:
    """``clip``, ``mean`` and ``std`` of an ``IntensityConfig`` for mode ``ct_fingerprint``."""
    clip, mean, std = getattr(cfg, "clip", None), getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if clip is None or mean is None or std is None or len(clip) != 2:
        raise ConfigError("intensity mode ct_fingerprint needs clip, mean and std",
                          expected="preprocess.intensity.clip: [lower, upper], .mean and .std",
                          found=f"clip {clip}, mean {mean}, std {std}",
                          fix="run the planner (medseg.planning) or set them from the dataset's foreground")
    return float(clip[0]), float(clip[1]), float(mean), float(std)


def intensity_transform(cfg, keys) -> MapTransform | None:
    """The dictionary intensity transform chosen by an :class:`~medseg.core.config.IntensityConfig`."""
    if cfg.mode == "zscore":
        return ZScored(keys, nonzero=cfg.nonzero)
    if cfg.mode == "percentile":
        return PercentileNormd(keys, cfg.lower_percentile, cfg.upper_percentile)
    if cfg.mode == "ct_window":
        return CTWindowd(keys, cfg.ct_preset, cfg.window)
    if cfg.mode == "ct_fingerprint":
        return ClipZScored(keys, *_fingerprint_values(cfg))
    if cfg.mode == "range":
        from monai.transforms import ScaleIntensityRanged

        a_min, a_max, b_min, b_max = cfg.scale_range
        return ScaleIntensityRanged(keys, a_min, a_max, b_min, b_max, clip=cfg.scale_clip)
    if cfg.mode == "none":
        return None
    raise ConfigError("unknown intensity mode", expected=" | ".join(INTENSITY_MODES), found=repr(cfg.mode),
                      fix="set preprocess.intensity.mode")
