"""Bounded-memory resampling for inference.

MONAI's ``Spacing`` resamples a whole volume at once with a float64 sampling grid (about 40
bytes per output voxel); :class:`ChunkedSpacingd` does the same resampling a slab of output
planes at a time, onto the same target grid, so a CT-size volume fits in a few GB.
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.core.runtime import last_axis_slabs

#: output voxels above which resampling is done in slabs
CHUNKED_RESAMPLE_VOXELS = 1 << 23


SLAB_VOXELS = 1 << 21


class ChunkedSpacingd:
    """``Spacingd(keys, pixdim, mode="bilinear")`` for one image, computed in slabs of output planes.

    The target grid (affine and shape) is MONAI's own, read from a lazy ``Spacingd``; each slab is
    resampled by MONAI's ``SpatialResample`` with the same settings (bilinear, border padding,
    float64 coordinates) onto the slab's part of that grid, so the values are the same as one
    whole-volume ``Spacingd`` call. Small volumes go straight through ``Spacingd``.
    """

    def __init__(self, spacingd) -> None:
        self.inner = spacingd
        self.keys = list(spacingd.keys)

    def __call__(self, data):
        from monai.data import MetaTensor
        from monai.transforms import Spacingd, SpatialResample

        d = dict(data)
        for key in self.keys:
            img = d[key]
            sp = self.inner.spacing_transform
            lazy = Spacingd([key], pixdim=sp.pixdim, mode="bilinear", lazy=True)({key: img})[key]
            shape = [int(s) for s in lazy.peek_pending_shape()]
            affine = torch.as_tensor(lazy.peek_pending_affine(), dtype=torch.float64)
            del lazy
            if int(np.prod(shape)) <= CHUNKED_RESAMPLE_VOXELS:
                d = self.inner(d)
                continue
            src = img if isinstance(img, MetaTensor) else MetaTensor(img)
            out = torch.empty((src.shape[0], *shape), dtype=torch.float32)
            resample = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False,
                                       dtype=torch.float64)
            for k0, k1 in last_axis_slabs(shape, SLAB_VOXELS):
                dst = affine.clone()
                dst[:3, 3] = affine[:3, :3] @ torch.tensor([0.0, 0.0, float(k0)], dtype=torch.float64) + affine[:3, 3]
                size = (shape[0], shape[1], k1 - k0)
                slab = resample(_source_for_slab(src, dst, size), dst_affine=dst, spatial_size=size)
                out[..., k0:k1] = slab.as_tensor() if isinstance(slab, MetaTensor) else slab
                del slab
            meta = {k: v for k, v in src.meta.items() if k != "affine"}
            meta["spatial_shape"] = np.asarray(shape)
            d[key] = MetaTensor(out, affine=affine, meta=meta)
            del src, img
        return d


def _source_for_slab(src, dst_affine: torch.Tensor, size: tuple[int, int, int]):
    """The part of ``src`` that bilinear sampling onto a slab (``dst_affine``, ``size``) reads, with its affine.

    The slab's corners are mapped into source voxels; the box around them, one voxel wider on every side
    and clipped to the image, holds every voxel the interpolation touches, and where the box meets the
    image's edge border padding clamps to the same edge voxels as on the whole image. Resampling the crop
    gives the slab the whole image would give, while converting only the crop to float64 (converting the
    whole source once per slab cost a CT-size volume about a minute)."""
    from monai.data import MetaTensor

    src_affine = torch.as_tensor(src.affine, dtype=torch.float64)
    to_src = torch.linalg.inv(src_affine) @ dst_affine
    corners = torch.tensor([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                            for k in (0, size[2] - 1)], dtype=torch.float64)
    pts = (to_src @ corners.T)[:3]
    extent = torch.tensor(src.shape[1:4], dtype=torch.float64) - 1
    lo = torch.minimum(torch.clamp(torch.floor(pts.min(1).values) - 1, min=0), extent).long()
    hi = torch.minimum(torch.clamp(torch.ceil(pts.max(1).values) + 1, min=0), extent).long()
    crop = src.as_tensor()[:, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    crop_affine = src_affine.clone()
    crop_affine[:3, 3] = src_affine[:3, :3] @ lo.to(torch.float64) + src_affine[:3, 3]
    return MetaTensor(crop, affine=crop_affine)


def bounded_memory_transforms(compose):
    """The inference ``Compose`` with every ``Spacingd`` resampling in slabs (same results)."""
    from monai.transforms import Compose, Spacingd

    steps = [ChunkedSpacingd(t) if isinstance(t, Spacingd) else t for t in compose.transforms]
    return Compose(steps)
