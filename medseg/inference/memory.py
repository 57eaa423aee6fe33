"""Memory planning for ``predict``: estimate peak host and GPU memory before running.

For a volume and a model, :func:`plan_memory` estimates the peak resident host memory and
the peak GPU memory of one prediction (load, preprocess, sliding window, mapping back,
labels), then chooses

* how the full-volume probabilities are kept (float32 for small volumes, float16 for large
  ones: never float64),
* the sliding-window batch size (on a GPU: as many windows as fit; on the CPU: the model's),
* where the blending slab and the image live on a GPU run (on the GPU when they fit, else
  the volume stays on the CPU and only the windows are moved to the GPU, one batch at a time),

or refuses with a :class:`~medseg.core.errors.ResourceError` that says what to change. The
estimates are deliberately on the safe side; ``MEDSEG_MEMORY_LIMIT_GB`` caps the host memory
medseg may plan for (useful on shared machines and in job schedulers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.core.errors import ResourceError
from medseg.core.runtime import GB, available_device_bytes, available_host_bytes, current_rss_bytes

#: probabilities above this size are stored as float16 instead of float32
COMPACT_PROBS_BYTES = 256 * 1024 ** 2
#: share of the free GPU memory a plan may use (the CUDA caching allocator fragments)
DEVICE_FRACTION = 0.8


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB"


def processed_shape(shape, affine, cfg) -> tuple[int, int, int]:
    """Shape of the volume after reorientation and resampling to the model's spacing."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = np.asarray(shape[:3], dtype=np.float64)
    if cfg.preprocess.orientation:
        import nibabel as nib

        order = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # source axis -> world axis
        new_shape, new_spacing = np.empty(3), np.empty(3)
        for src_axis, world_axis in enumerate(order):
            new_shape[world_axis], new_spacing[world_axis] = shape[src_axis], spacing[src_axis]
        shape, spacing = new_shape, new_spacing
    if cfg.preprocess.spacing is not None:
        target = np.asarray(cfg.preprocess.spacing, dtype=np.float64)
        shape = np.maximum(1, np.round(shape * spacing / target))
    return tuple(int(s) for s in shape)


def window_activation_bytes(cfg, roi, num_classes: int, bytes_per_value: int = 4) -> int:
    """Rough peak activation memory of one window through the network (no gradients)."""
    vox = int(np.prod(roi))
    channels = list(cfg.model.channels or [32])
    strides = list(cfg.model.strides or [2] * (len(channels) - 1))
    level_vox, total = float(vox), 0.0
    for i, c in enumerate(channels):
        total += c * level_vox
        if i < len(strides):
            s = strides[i]
            level_vox /= float(np.prod(s)) if isinstance(s, (list, tuple)) else float(s) ** 3
    # encoder outputs are kept for the skips; each level holds a few convolution outputs at once
    units = max(1, int(getattr(cfg.model, "num_res_units", 1) or 1))
    return int(bytes_per_value * (total * (2 + units) + (num_classes + 2) * vox))


@dataclass
class MemoryPlan:
    source_shape: tuple[int, int, int]
    processed_shape: tuple[int, int, int]
    roi: list[int]
    num_classes: int
    device: str
    host_peak_bytes: int
    device_peak_bytes: int
    host_available_bytes: int | None
    device_available_bytes: int | None
    sw_batch_size: int
    probs_dtype: torch.dtype
    accumulate_on: str
    image_on_device: bool
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        dev = f", GPU peak {_fmt(self.device_peak_bytes)}" if self.device != "cpu" else ""
        avail = f" of {_fmt(self.host_available_bytes)} available" if self.host_available_bytes is not None else ""
        return (f"volume {self.source_shape} -> {self.processed_shape}: host peak {_fmt(self.host_peak_bytes)}{avail}"
                f"{dev}; windows {self.roi} x{self.sw_batch_size} on {self.device}, blending on {self.accumulate_on}, "
                f"probabilities {str(self.probs_dtype).replace('torch.', '')}")


def plan_memory(shape, affine, cfg, *, num_classes: int, device: torch.device | str = "cpu",
                source_itemsize: int = 4, groups: int = 1, sw_batch_size: int | None = None,
                roi=None, amp: bool = True, param_bytes: int = 0, check: bool = True, channels: int = 1) -> MemoryPlan:
    """Estimate peak memory for predicting one volume and choose how to run it (see module doc).
    ``channels``: the input sequences (each is read, normalised and windowed)."""
    from medseg.inference.engine import window_size
    from medseg.models.registry import get_spec

    device = torch.device(device)
    src = tuple(int(s) for s in shape[:3])
    proc = processed_shape(src, affine, cfg)
    dims = get_spec(cfg.model.name).dims
    roi = list(roi or window_size(cfg, proc, dims))
    padded = [max(p, r) for p, r in zip(proc, roi)]
    n_src, n_proc, n_pad = math.prod(src), math.prod(proc), math.prod(padded)
    probs_dtype = torch.float32 if num_classes * n_proc * 4 <= COMPACT_PROBS_BYTES else torch.float16
    pbytes = 4 if probs_dtype == torch.float32 else 2
    slab = (groups * num_classes + 1) * padded[0] * padded[1] * roi[2] * 4
    resampled = cfg.preprocess.spacing is not None

    # host phases (the loaded source array is resident throughout)
    base = n_src * source_itemsize * channels
    # float32 copy (and a reoriented copy) of the source, resampled image, slab grids, z-score mask and output
    preprocess = channels * (8 * n_src + 4 * n_proc + (4 * n_proc if resampled else 0)) + 5 * n_proc
    window_batch = sw_batch_size or cfg.inference.sw_batch_size
    act = window_activation_bytes(cfg, roi, groups * num_classes)
    on_cpu = device.type == "cpu"
    infer = (4 * n_pad * channels + num_classes * n_proc * pbytes * (2 if groups > 1 else 1) + 2 * slab
             + (window_batch * act * groups if on_cpu else 0))
    invert = num_classes * n_proc * pbytes + n_src + (24 << 20) * num_classes
    # the process itself (libraries, model) counts too: peak resident memory is what a job scheduler sees
    # 15 % for allocator slack and library buffers (calibrated: 512x512x600 CT, planned 3.1 GB, measured 3.0 GB)
    host_peak = max(current_rss_bytes(), base) + int(1.15 * max(preprocess, infer, invert))
    host_avail = available_host_bytes()
    notes = []

    dev_avail = available_device_bytes(device)
    device_peak, accumulate_on, image_on_device = 0, ("cpu" if on_cpu else "device"), False
    if not on_cpu:
        act_dev = window_activation_bytes(cfg, roi, groups * num_classes, 2 if amp else 4)
        budget = int(DEVICE_FRACTION * dev_avail) if dev_avail is not None else None
        fixed = param_bytes * 2 + (1 << 27)  # weights, CUDA context slack
        accumulate_on = "device" if budget is None or fixed + slab + act_dev * groups <= budget else "cpu"
        fixed += slab if accumulate_on == "device" else 0
        if sw_batch_size is None:
            batch = max(1, cfg.inference.sw_batch_size)
            if budget is not None:
                batch = max(1, min(32, (budget - fixed) // max(1, act_dev * groups)))
                batch = max(batch, 1)
        else:
            batch = sw_batch_size
        window_batch = int(batch)
        image_on_device = budget is None or fixed + 4 * n_pad * channels + window_batch * act_dev * groups <= budget
        device_peak = fixed + window_batch * act_dev * groups + (4 * n_pad * channels if image_on_device else 0)
        if budget is not None and device_peak > budget and check:
            raise ResourceError("the model does not fit the GPU even one window at a time", path=None,
                                expected=f"at most {_fmt(budget)} of GPU memory",
                                found=f"about {_fmt(device_peak)} for windows of {roi}",
                                fix="use a smaller inference.roi_size, free the GPU, or use --device cpu")
        if not image_on_device:
            notes.append("volume kept on the CPU; windows moved to the GPU one batch at a time")
    else:
        window_batch = int(sw_batch_size or cfg.inference.sw_batch_size)
        if host_avail is not None and window_batch > 1 and window_batch * act > host_avail // 4:
            window_batch = max(1, int(host_avail // 4 // max(1, act)))
            notes.append(f"sliding-window batch lowered to {window_batch} to fit host memory")
    plan = MemoryPlan(src, proc, roi, num_classes, str(device), int(host_peak), int(device_peak), host_avail, dev_avail,
                      int(window_batch), probs_dtype, accumulate_on, image_on_device, notes)
    needed = int(1.15 * max(preprocess, infer, invert))
    if check and host_avail is not None and needed > host_avail:
        shrink = math.ceil((needed / max(1, host_avail)) ** (1 / 3) * 100) / 100
        raise ResourceError(
            "not enough memory to segment this volume",
            expected=f"at most {_fmt(host_avail)} of host memory free",
            found=f"an estimated peak of {_fmt(host_peak)} for {src} voxels ({proc} after resampling, "
                  f"{num_classes} classes)",
            fix=f"free memory or use a machine with more; or crop the image, or predict at a coarser spacing "
                f"(about {shrink}x the model's) with a model trained for it; MEDSEG_MEMORY_LIMIT_GB sets the budget")
    return plan
