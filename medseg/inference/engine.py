"""The sliding window (for validation during training and for prediction alike) and mapping
predictions back to the source grid.

:func:`sliding_window_probs` places and blends windows exactly as MONAI's
``sliding_window_inference`` does (same positions, same Gaussian weights; ``tests/test_memory.py``
checks it against MONAI), but keeps only a slab one window deep in float32 and stores finished
slabs as probabilities, float16 for large volumes, and averages ensemble members' probabilities
as it goes. MONAI's function (also with ``buffer_steps``) returns the full-volume float32 logits of
every member; docs/architecture.md gives the measured difference.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from medseg.core.runtime import last_axis_slabs
from medseg.preprocessing.resample import scaled_permutation, separable_slabs


def window_size(cfg, spatial_shape, dims: int) -> list[int]:
    roi = list(cfg.inference.roi_size or cfg.patch.size)
    if dims == 2 and roi[2] == 1:
        # a slice-wise 2D model takes any depth: feed several slices per window
        roi[2] = int(min(spatial_shape[2], 32))
    return roi


def to_source_grid(probs: torch.Tensor, processed_affine, source_affine, source_shape) -> torch.Tensor:
    """Resample channel-first ``probs`` from the processed grid onto the source grid.

    The processed grid is the source grid after reorientation and resampling; this is
    their exact inverse (one resampling with the composed affine), not a resize.
    """
    proc = torch.as_tensor(np.asarray(processed_affine), dtype=torch.float64)
    src = torch.as_tensor(np.asarray(source_affine), dtype=torch.float64)
    shape = tuple(int(s) for s in source_shape)
    if tuple(probs.shape[1:]) == shape and torch.allclose(proc, src, atol=1e-6):
        return probs
    # an axis permutation/flip on the same voxel centres needs no interpolation
    exact = _index_map(proc, src, probs.shape[1:], shape)
    if exact is not None:
        return exact(probs)
    plain = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
    axes = scaled_permutation(torch.linalg.inv(proc) @ src)
    if axes is not None:  # grids that differ by reorientation and spacing only: one axis at a time
        out = torch.empty((plain.shape[0], *shape), dtype=torch.float32)
        for k0, k1, block in separable_slabs(plain, axes, shape):
            out[..., k0:k1] = block
        return out
    mt = MetaTensor(plain, affine=proc)
    out = SpatialResample(mode="bilinear", padding_mode="border", align_corners=True, dtype=torch.float32)(
        mt, dst_affine=src, spatial_size=shape)
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def _index_map(proc: torch.Tensor, src: torch.Tensor, proc_shape, src_shape):
    """If source voxels map onto processed voxels by permutation/flip, return that indexing."""
    m = torch.linalg.inv(proc) @ src  # source index -> processed index
    r = m[:3, :3]
    if not torch.allclose(r, r.round(), atol=1e-4) or not torch.allclose(m[:3, 3], m[:3, 3].round(), atol=1e-3):
        return None
    r = r.round().to(torch.int64)
    if not torch.all(r.abs().sum(0) == 1) or not torch.all(r.abs().sum(1) == 1):
        return None
    t = m[:3, 3].round().to(torch.int64)
    perm, flips = [], []
    for j in range(3):  # source axis j
        i = int(torch.nonzero(r[:, j])[0])
        perm.append(i)
        flips.append(int(r[i, j]) < 0)
    # processed index i = sign*src_j + t_i ; check ranges fit
    for j, i in enumerate(perm):
        lo = int(t[i]) if not flips[j] else int(t[i]) - (src_shape[j] - 1)
        hi = lo + src_shape[j] - 1
        if lo < 0 or hi >= proc_shape[i]:
            return None

    def apply(probs: torch.Tensor) -> torch.Tensor:
        out = probs.permute(0, *[1 + i for i in perm])  # axis j+1 is now processed axis perm[j]
        index, flip_dims = [slice(None)], []
        for j, i in enumerate(perm):
            n, ti = src_shape[j], int(t[i])
            if flips[j]:
                index.append(slice(ti - (n - 1), ti + 1))
                flip_dims.append(j + 1)
            else:
                index.append(slice(ti, ti + n))
        out = out[tuple(index)]
        if flip_dims:
            out = torch.flip(out, flip_dims)
        return out.contiguous()

    return apply


# ---------------------------------------------------------------------------
# memory-bounded sliding window: windows go to the compute device one batch at a time,
# logits are blended in a slab as deep as one window, and each finished slab is turned
# into probabilities stored compactly (float16 for large volumes) in the full-volume output.


def _pad_to_roi(x: torch.Tensor, roi) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad ``(1, X, Y, Z)`` symmetrically to at least ``roi``, as MONAI's sliding window does."""
    pads = []
    for size, r in zip(x.shape[1:], roi):
        diff = max(int(r) - int(size), 0)
        pads.append((diff // 2, diff - diff // 2))
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        x = torch.nn.functional.pad(x[None], flat, mode="constant", value=0.0)[0]
    return x, pads


def scan_interval(spatial_shape, roi, overlap: float) -> tuple[int, ...]:
    """Step between window starts per axis: ``int(roi * (1 - overlap))``, at least 1, or one whole window where
    the window spans the axis (MONAI's rule, so positions match ``sliding_window_inference``'s)."""
    return tuple(int(r) if int(r) == int(s) else max(1, int(int(r) * (1 - overlap)))
                 for s, r in zip(spatial_shape, roi))


def nnunet_steps(size: int, window: int, overlap: float) -> list[int]:
    """nnU-Net's window starts along one axis (``compute_steps_for_sliding_window``): as few windows as keep
    the step at most ``(1 - overlap)`` of a window, spread evenly from the first voxel to the last."""
    step = window * (1.0 - overlap)
    n = int(np.ceil((size - window) / step)) + 1
    if n <= 1:
        return [0]
    actual = (size - window) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def window_starts(spatial_shape, roi, overlap: float, steps: str = "monai") -> list[tuple[int, int, int]]:
    """Window start corners: the positions MONAI's ``sliding_window_inference`` uses, or with ``steps="nnunet"``
    nnU-Net's (:func:`nnunet_steps`); ordered by the last axis, as the slab-wise blending needs."""
    if steps == "nnunet":
        axes = [nnunet_steps(int(s), int(r), overlap) for s, r in zip(spatial_shape, roi)]
        corners = {(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]}
        return sorted(corners, key=lambda s: (s[-1], *s[:-1]))
    from monai.data.utils import dense_patch_slices

    interval = scan_interval(spatial_shape, roi, overlap)
    slices = dense_patch_slices(tuple(spatial_shape), tuple(roi), interval, return_slice=False)
    return sorted({tuple(int(s[0]) for s in sl) for sl in slices}, key=lambda s: (s[-1], *s[:-1]))


def window_count(spatial_shape, roi, overlap: float, steps: str = "monai") -> int:
    """How many windows :func:`sliding_window_probs` runs on a grid of ``spatial_shape`` (padded to ``roi``)."""
    padded = tuple(max(int(s), int(r)) for s, r in zip(spatial_shape, roi))
    return len(window_starts(padded, roi, overlap, steps))


def importance_map(roi, blend: str, device: torch.device) -> torch.Tensor:
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(int(r) for r in roi), mode=blend, sigma_scale=0.125, device=device,
                                  dtype=torch.float32)


@torch.no_grad()
def sliding_window_probs(runner, image: torch.Tensor, roi, *, num_classes: int, overlap: float,
                         blend: str = "gaussian", sw_batch_size: int = 4, device: torch.device | None = None,
                         out_dtype: torch.dtype = torch.float32, groups: int = 1,
                         accumulate_on: torch.device | None = None, image_on_device: bool = False,
                         activation: str = "softmax", steps: str = "monai") -> torch.Tensor:
    """Probabilities ``(C, X, Y, Z)`` on the CPU for a channel-first image ``(S, X, Y, Z)`` (S sequences).

    ``activation``: ``softmax`` over the C classes, or ``sigmoid`` per output (region models). ``steps``: window
    placement (:func:`window_starts`).
    ``runner(batch)`` maps windows ``(B, S, *roi)`` on ``device`` to logits ``(B, groups*C, *roi)``
    (``groups`` > 1: an ensemble whose members' probabilities are averaged). Logits are blended
    exactly as MONAI's ``sliding_window_inference`` blends them (same positions, same Gaussian
    weights), but only a slab one window deep is kept in float32; every finished slab is
    normalised, turned into probabilities and stored in the ``out_dtype`` result. Peak memory is
    the image, the result and one slab, whatever the volume's depth.
    """
    device = device or torch.device("cpu")
    acc_dev = accumulate_on or device

    def activate(logits: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=dim)

    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    if x.dtype != torch.float32:
        x = x.float()
    spatial = tuple(int(s) for s in x.shape[1:])
    roi = [int(r) for r in roi]
    x, pads = _pad_to_roi(x, roi)
    if image_on_device and device.type != "cpu":
        x = x.to(device)
    padded = tuple(int(s) for s in x.shape[1:])
    starts = window_starts(padded, roi, overlap, steps)
    if len(starts) == 1:  # one window (small volumes): blending weights cancel out
        tile = x[None].to(device) if x.device != device else x[None]
        logits = runner(tile)[0].float()
        crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, spatial))
        logits = logits[(slice(None), *crop)]
        if groups > 1:
            return activate(logits.reshape(groups, num_classes, *logits.shape[1:]), 1).mean(0).to("cpu", out_dtype)
        return activate(logits, 0).to("cpu", out_dtype)
    imp = importance_map(roi, blend, acc_dev)
    imp_run = imp if acc_dev == device else imp.to(device)
    channels = groups * num_classes
    slab = (padded[0], padded[1], roi[2])
    acc = torch.zeros((channels, *slab), dtype=torch.float32, device=acc_dev)
    wsum = torch.zeros((1, *slab), dtype=torch.float32, device=acc_dev)
    out = torch.empty((num_classes, *spatial), dtype=out_dtype)
    pin = device.type == "cuda" and x.device.type == "cpu"

    def finalize(n: int, z0: int) -> None:
        # planes [z0, z0 + n) of the padded grid are complete
        lo, hi = max(z0, pads[2][0]), min(z0 + n, pads[2][0] + spatial[2])
        if hi <= lo:
            return
        a, b = lo - z0, hi - z0
        xs = slice(pads[0][0], pads[0][0] + spatial[0])
        ys = slice(pads[1][0], pads[1][0] + spatial[1])
        logits = acc[:, xs, ys, a:b] / wsum[:, xs, ys, a:b]
        if groups > 1:
            p = activate(logits.view(groups, num_classes, *logits.shape[1:]), 1).mean(0)
        else:
            p = activate(logits, 0)
        out[..., lo - pads[2][0]: hi - pads[2][0]] = p.to("cpu", out_dtype)

    def run(batch: list[tuple[int, int, int]]) -> None:
        tiles = torch.stack([x[:, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]] for s in batch])
        if pin:
            tiles = tiles.pin_memory().to(device, non_blocking=True)
        elif tiles.device != device:
            tiles = tiles.to(device)
        logits = runner(tiles).float() * imp_run
        if logits.device != acc_dev:
            logits = logits.to(acc_dev)
        for k, s in enumerate(batch):
            acc[:, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], :] += logits[k]
            wsum[:, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], :] += imp

    z_prev = None
    group: list[tuple[int, int, int]] = []
    for s in starts + [None]:
        if group and (s is None or s[2] != group[0][2]):
            z = group[0][2]
            if z_prev is not None:  # planes before this group's start are finished: emit them, shift the slab
                d = z - z_prev
                finalize(d, z_prev)
                acc[..., : roi[2] - d] = acc[..., d:].clone()
                acc[..., roi[2] - d:] = 0
                wsum[..., : roi[2] - d] = wsum[..., d:].clone()
                wsum[..., roi[2] - d:] = 0
            for i in range(0, len(group), max(1, int(sw_batch_size))):
                run(group[i:i + max(1, int(sw_batch_size))])
            z_prev, group = z, []
        if s is not None:
            group.append(s)
    finalize(roi[2], z_prev)
    return out


def channel_argmax(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` for ``(C, ...)`` with few channels, about 3x faster on the CPU: one pass of
    elementwise comparisons per channel instead of a strided reduction. Ties go to the lower channel, as
    ``argmax``'s do. uint8 indices for up to 256 channels, else int64."""
    if values.shape[0] > 256:
        return values.argmax(0)
    best, index = values[0], torch.zeros(values.shape[1:], dtype=torch.uint8)
    for c in range(1, values.shape[0]):
        higher = values[c] > best
        index[higher] = c
        best = torch.maximum(best, values[c])
    return index


def argmax_labels(probs: torch.Tensor, dtype=np.uint8, chunk_voxels: int = 1 << 22, decode=None) -> np.ndarray:
    """Argmax over channels of ``(C, X, Y, Z)`` (or ``decode``), slab by slab (no full-volume int64 index array)."""
    decode = decode or channel_argmax
    spatial = probs.shape[1:]
    out = np.empty(tuple(spatial), dtype=dtype)
    for z0, z1 in last_axis_slabs(spatial, chunk_voxels):
        out[..., z0:z1] = decode(probs[..., z0:z1]).numpy().astype(dtype, copy=False)
    return out


def labels_on_source_grid(probs: torch.Tensor, processed_affine, source_affine, source_shape, *,
                          dtype=np.uint8, chunk_voxels: int = 1 << 21, decode=None) -> np.ndarray:
    """Labels on the source grid from probabilities on the processed grid, in bounded memory.

    ``decode`` turns probabilities ``(C, ...)`` into labels (default: the argmax; region models paint
    their thresholded regions, :func:`medseg.core.regions.regions_to_labels`).

    Same mapping as :func:`to_source_grid` followed by an argmax: exact index permutation/flip
    when the grids share voxel centres (argmax first, then the labels are re-indexed), otherwise
    trilinear interpolation of the probabilities (border padding, voxel centres aligned) done a
    few source slices at a time, each slice block reading only the part of the processed grid it
    needs: one axis at a time where the grids differ by reorientation and spacing only
    (:func:`~medseg.preprocessing.resample.separable_slabs`), else through ``grid_sample``.
    """
    proc = torch.as_tensor(np.asarray(processed_affine), dtype=torch.float64)
    src = torch.as_tensor(np.asarray(source_affine), dtype=torch.float64)
    shape = tuple(int(s) for s in source_shape)
    plain = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
    decode = decode or channel_argmax
    if tuple(plain.shape[1:]) == shape and torch.allclose(proc, src, atol=1e-6):
        return argmax_labels(plain, dtype, decode=decode)
    exact = _index_map(proc, src, plain.shape[1:], shape)
    if exact is not None:
        labels = torch.from_numpy(argmax_labels(plain, dtype, decode=decode))
        return exact(labels[None])[0].numpy()
    m = torch.linalg.inv(proc) @ src  # source index -> processed index
    out = np.empty(shape, dtype=dtype)
    axes = scaled_permutation(m)
    if axes is not None:  # grids that differ by reorientation and spacing only: one axis at a time
        for k0, k1, block in separable_slabs(plain, axes, shape, chunk_voxels):
            out[..., k0:k1] = decode(block).numpy().astype(dtype, copy=False)
        return out
    psize = [int(s) for s in plain.shape[1:]]
    ii = torch.arange(shape[0], dtype=torch.float64).view(-1, 1, 1)
    jj = torch.arange(shape[1], dtype=torch.float64).view(1, -1, 1)
    for k0, k1 in last_axis_slabs(shape, chunk_voxels):
        kk = torch.arange(k0, k1, dtype=torch.float64).view(1, 1, -1)
        coords, box = [], []
        for a in range(3):
            p = (m[a, 0] * ii + m[a, 1] * jj + m[a, 2] * kk + m[a, 3]).clamp_(0, psize[a] - 1)
            lo = int(np.floor(float(p.min())))
            hi = min(int(np.ceil(float(p.max()))) + 1, psize[a])
            n = hi - lo
            local = (p - lo).float()
            coords.append(local * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(local))
            box.append(slice(lo, hi))
        block = plain[(slice(None), *box)].float()[None]
        grid = torch.stack([coords[2], coords[1], coords[0]], dim=-1)[None]  # grid_sample wants (z, y, x) order
        vals = torch.nn.functional.grid_sample(block, grid, mode="bilinear", padding_mode="border",
                                               align_corners=True)[0]
        out[..., k0:k0 + vals.shape[-1]] = decode(vals).numpy().astype(dtype, copy=False)
    return out
