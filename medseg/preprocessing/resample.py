"""Bounded-memory resampling for inference.

MONAI's ``Spacing`` resamples a whole volume at once with a float64 sampling grid (about 40
bytes per output voxel); :class:`ChunkedSpacingd` does the same resampling a slab of output
planes at a time, onto the same target grid, so a CT-size volume fits in a few GB.
:func:`separable_slabs` interpolates one axis at a time between grids that differ by reorientation and spacing
only (what Spacing makes of any input), for this step and for mapping predictions back onto the input's grid.
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

    The target grid (affine and shape) is MONAI's own, read from a lazy ``Spacingd``. Where it keeps the source's
    direction cosines (Spacing only rescales the axes) each slab is interpolated one axis at a time
    (:func:`separable_slabs`, values within about 1e-7 of MONAI's, relative); otherwise each slab is resampled by
    MONAI's ``SpatialResample`` with the same settings (bilinear, border padding, float64 coordinates) onto the
    slab's part of that grid, so the values are the same as one whole-volume ``Spacingd`` call. Small volumes go
    straight through ``Spacingd``.
    """

    def __init__(self, spacingd) -> None:
        self.inner = spacingd
        self.keys = list(spacingd.keys)

    def __call__(self, data):
        from monai.data import MetaTensor
        from monai.transforms import Spacingd

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
            src_affine = torch.as_tensor(src.affine, dtype=torch.float64)
            axes = scaled_permutation(torch.linalg.inv(src_affine) @ affine)
            if axes is not None:  # the usual case: Spacing keeps the direction cosines
                for k0, k1, block in separable_slabs(src.as_tensor(), axes, shape):
                    out[..., k0:k1] = block
            else:
                _resample_in_slabs(src, affine, shape, out)
            meta = {k: v for k, v in src.meta.items() if k != "affine"}
            meta["spatial_shape"] = np.asarray(shape)
            d[key] = MetaTensor(out, affine=affine, meta=meta)
            del src, img
        return d


def _resample_in_slabs(src, affine: torch.Tensor, shape, out: torch.Tensor) -> None:
    """``out`` (channel first) filled with ``src`` resampled onto the grid ``affine``/``shape`` by MONAI's
    ``SpatialResample`` (bilinear, border, float64 coordinates), one slab of last-axis planes at a time."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    resample = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False, dtype=torch.float64)
    for k0, k1 in last_axis_slabs(shape, SLAB_VOXELS):
        dst = affine.clone()
        dst[:3, 3] = affine[:3, :3] @ torch.tensor([0.0, 0.0, float(k0)], dtype=torch.float64) + affine[:3, 3]
        size = (shape[0], shape[1], k1 - k0)
        slab = resample(_source_for_slab(src, dst, size), dst_affine=dst, spatial_size=size)
        out[..., k0:k1] = slab.as_tensor() if isinstance(slab, MetaTensor) else slab
        del slab


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


# ---------------------------------------------------------------------------
# separable linear resampling between grids that differ by reorientation and spacing only


def scaled_permutation(index_map, tol: float = 1e-6) -> list[tuple[int, float, float]] | None:
    """``[(source axis, scale, offset)]`` per destination axis when the 4×4 ``index_map`` (destination voxel index to
    source voxel index) reads each destination axis along one source axis only, as between any grid and the grid
    that reorientation and resampling make of it (both keep the direction cosines, up to axis order and sign);
    ``None`` for a rotation or shear between the grids."""
    m = torch.as_tensor(np.asarray(index_map), dtype=torch.float64)
    r = m[:3, :3]
    limit = tol * float(r.abs().max())
    axes = []
    for j in range(3):
        nonzero = torch.nonzero(r[:, j].abs() > limit).flatten()
        if len(nonzero) != 1:
            return None
        i = int(nonzero[0])
        axes.append((i, float(r[i, j]), float(m[i, 3])))
    return axes if sorted(a for a, _, _ in axes) == [0, 1, 2] else None


def _linear_along(x: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``x`` sampled along ``dim`` at fractional ``positions`` (float64, within ``[0, size - 1]``), linearly."""
    n = x.shape[dim]
    i0 = positions.floor().long().clamp_(0, n - 1)
    w = (positions - i0).to(torch.float32)
    if bool((w.abs() < 1e-7).all()):
        first = int(i0[0])
        if bool((i0 == torch.arange(first, first + len(i0))).all()):
            return x.narrow(dim, first, len(i0))
        return x.index_select(dim, i0)
    lo = x.index_select(dim, i0)
    hi = x.index_select(dim, (i0 + 1).clamp_(max=n - 1))
    shape = [1] * x.dim()
    shape[dim] = -1
    return lo.add_(hi.sub_(lo).mul_(w.view(shape)))


def separable_slabs(src: torch.Tensor, axes, dst_shape, voxels: int = SLAB_VOXELS):
    """Trilinear resampling of channel-first ``src`` ``(C, …)`` onto a destination grid whose axes each read along
    one source axis (``axes`` from :func:`scaled_permutation`), as three passes of linear interpolation, one per
    axis, with positions clamped to the source (border padding): the values MONAI's ``SpatialResample`` and
    ``grid_sample`` compute for such grids (bilinear, border), at a fraction of the cost. Yields ``(k0, k1, block)``,
    ``block`` being destination planes ``[k0, k1)`` of the last axis, ``(C, X, Y, k1 - k0)`` float32, in destination
    axis order. A 512×512×600 CT brought to 1 mm (410×410×600) took 8.5 s through ``SpatialResample`` in slabs and
    its 3-class probabilities back 15.7 s through ``grid_sample`` on 2 cores (``docs/benchmarks.md``)."""
    dst_shape = [int(s) for s in dst_shape]
    positions = []
    for j, (i, scale, offset) in enumerate(axes):
        p = torch.arange(dst_shape[j], dtype=torch.float64) * scale + offset
        positions.append(p.clamp_(0, int(src.shape[1 + i]) - 1))
    last_src = axes[2][0]
    for k0, k1 in last_axis_slabs(dst_shape, voxels):
        p = positions[2][k0:k1]
        lo = int(p.min().floor())
        hi = min(int(p.max().ceil()) + 1, int(src.shape[1 + last_src]))
        block = src.narrow(1 + last_src, lo, hi - lo)
        if block.dtype != torch.float32:
            block = block.float()
        block = _linear_along(block, 1 + last_src, p - lo)
        for j in (0, 1):
            block = _linear_along(block, 1 + axes[j][0], positions[j])
        block = block.permute(0, *[1 + axes[j][0] for j in range(3)])
        yield k0, k1, block
