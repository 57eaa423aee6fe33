"""Sliding-window inference and mapping predictions back to the source grid."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from medseg.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA requested but no GPU is available", expected="a CUDA build of torch and a GPU",
                          found=f"torch {torch.__version__} with CUDA available = False",
                          fix="use --device cpu, or install a CUDA build of torch (see README)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError("unknown device", expected="auto, cpu, cuda or cuda:N", found=repr(device),
                          fix="use --device auto") from None


def autocast(device: torch.device, enabled: bool = True):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def window_size(cfg, spatial_shape, dims: int) -> list[int]:
    roi = list(cfg.inference.roi_size or cfg.patch.size)
    if dims == 2 and roi[2] == 1:
        # a slice-wise 2D model takes any depth: feed several slices per window
        roi[2] = int(min(spatial_shape[2], 32))
    return roi


@torch.no_grad()
def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, cfg, device: torch.device,
                          dims: int = 3, amp: bool = True, sw_batch_size: int | None = None,
                          overlap: float | None = None) -> torch.Tensor:
    """Logits ``(1, C, X, Y, Z)`` on the CPU for a channel-first image ``(1, X, Y, Z)``."""
    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    x = x[None].to(device=device, dtype=torch.float32)
    roi = window_size(cfg, x.shape[2:], dims)
    with autocast(device, amp):
        out = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=sw_batch_size or cfg.inference.sw_batch_size, predictor=model,
            overlap=cfg.inference.overlap if overlap is None else overlap, mode=cfg.inference.blend,
            sw_device=device, device=torch.device("cpu"),
        )
    return out.float()


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
