"""Predict label volumes on the exact grid of the input."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.core.config import Config, check_overlap
from medseg.core.errors import ConfigError, MedsegError, UnsupportedInputError
from medseg.core.runtime import resolve_device
from medseg.inference.engine import (
    channel_argmax,
    labels_on_source_grid,
    sliding_window_probs,
    to_source_grid,
    window_count,
    window_size,
)
from medseg.inference.postprocess import apply_postprocessing
from medseg.io.volume import Volume, load_volume, save_volume
from medseg.models.loading import EXPORT_SUFFIXES, LoadedModel, load_model
from medseg.preprocessing.pipeline import body_box, foreground_box

def background_probabilities(cfg: Config, spatial, dtype=torch.float32) -> torch.Tensor:
    """Probabilities of pure background (all regions off; class 0 certain) on a grid of shape ``spatial``."""
    probs = torch.zeros((cfg.out_channels, *spatial), dtype=dtype)
    if not cfg.regions:
        probs[0] = 1
    return probs


def within_box(cfg: Config, image, box: tuple[slice, ...], run) -> torch.Tensor:
    """``run`` on the spatial ``box`` of ``image`` only, background probabilities outside it."""
    probs = run(torch.as_tensor(image)[(slice(None), *box)])
    full = background_probabilities(cfg, image.shape[1:], probs.dtype)
    full[(slice(None), *box)] = probs
    return full


def on_foreground(cfg: Config, image, run) -> torch.Tensor:
    """``run(image)``, or with ``preprocess.crop_foreground`` ``run`` on the foreground's bounding box only and
    background outside it: what prediction and validation during training both do."""
    if not cfg.preprocess.crop_foreground:
        return run(image)
    box = foreground_box(image)
    if box is None:  # nothing but background
        return background_probabilities(cfg, image.shape[1:])
    return within_box(cfg, image, box, run)


def body_crop(cfg: Config, image, roi) -> tuple[slice, ...] | None:
    """The body's bounding box (:func:`medseg.preprocessing.pipeline.body_box`) when ``inference.crop_to_body``
    is on and the box needs fewer sliding windows than the whole grid; otherwise None (the whole grid)."""
    if not cfg.inference.crop_to_body or cfg.preprocess.nnunet is not None:
        return None
    spatial = tuple(int(s) for s in image.shape[1:])
    whole = window_count(spatial, roi, cfg.inference.overlap, cfg.inference.window_steps)
    if whole <= 1:
        return None
    box = body_box(image)
    if box is None:
        return None
    inside = window_count([b.stop - b.start for b in box], roi, cfg.inference.overlap, cfg.inference.window_steps)
    return box if inside < whole else None


def _case_label(vol: Volume) -> str:
    """How messages name the case of ``vol``: its file name (a DICOM folder's name may hold patient data)."""
    return Path(vol.source).name if vol.source and vol.meta.get("format") != "dicom" else "input"


@dataclass
class Prediction:
    labels: Volume
    seconds: float


class Predictor:
    """Load a checkpoint once, then segment volumes.

    >>> p = Predictor("hippocampus", device="cpu")
    >>> out = p.predict_volume(load_volume("case.nii.gz"))  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | LoadedModel | None = None, device: str = "auto", *,
                 overlap: float | None = None, sw_batch_size: int | None = None, amp: bool = True,
                 tta: bool | None = None, backend: str = "auto", amp_dtype: str = "auto", compile: bool = False,
                 threads: int | None = None, plan_memory: bool = True, crop_to_body: bool | None = None) -> None:
        from medseg.inference.backends import check_backend
        from medseg.preprocessing.pipeline import inference_transforms
        from medseg.preprocessing.resample import bounded_memory_transforms

        loaded = load_model(model)  # a LoadedModel is taken as it is: the file is read once
        self.model_path = loaded.path
        self.loaded_exported = loaded.exported
        suffix_backend = EXPORT_SUFFIXES.get(self.model_path.suffix.lower())
        self.backend = check_backend(backend) if backend not in (None, "", "auto") else (suffix_backend or "torch")
        if loaded.exported and self.backend != suffix_backend:
            raise ConfigError(f"{self.model_path.suffix} models run with the {suffix_backend} backend",
                              path=self.model_path, expected=f"--backend {suffix_backend} (or auto)",
                              found=f"--backend {self.backend}",
                              fix=f"use --backend {suffix_backend}, or the .pt checkpoint for --backend torch")
        self.cfg: Config = copy.deepcopy(loaded.cfg)  # overlap, TTA and batch size are this predictor's
        if self.cfg.task != "volume":
            raise UnsupportedInputError("this model segments 2D images, not volumes", path=self.model_path,
                                        expected="a volume model (task: volume)", found=f"task: {self.cfg.task}",
                                        fix="use 'medseg predict IMAGE.png --model ...' for 2D images, "
                                            "or a 3D model for volumes")
        if overlap is not None:
            check_overlap(overlap, self.model_path)
            self.cfg.inference.overlap = overlap
        if sw_batch_size is not None:
            self.cfg.inference.sw_batch_size = sw_batch_size
        if crop_to_body is not None:  # None follows the model's inference.crop_to_body
            self.cfg.inference.crop_to_body = bool(crop_to_body)
        self._sw_batch_size = sw_batch_size
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(int(threads))
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.plan_memory = plan_memory
        self.last_plan = None
        self.set_tta(self.cfg.inference.tta if tta is None else tta)  # None follows the model's inference.tta
        self.spec = loaded.spec
        # a packed ensemble carries one network per member; their probabilities are averaged
        self.nets = [net.to(self.device) for net in loaded.nets]
        self.net = self.nets[0] if self.nets else None
        self.runner = self._make_runner(compile, threads)
        self.transforms = bounded_memory_transforms(inference_transforms(self.cfg))
        self.meta = loaded.meta
        self.stage_seconds = {"preprocess": 0.0, "network": 0.0, "to_grid": 0.0}
        """Seconds spent so far per stage (``benchmarks/speed.py`` prints them): preprocess (reorient, resample,
        normalise), network (sliding window, TTA, ensemble), to_grid (labels back on the input grid, postprocessing)."""

    def _make_runner(self, compile: bool, threads: int | None):
        from medseg.inference import backends

        if self.backend == "torch":
            return backends.TorchRunner(self.nets, self.device, amp=self.amp, amp_dtype=self.amp_dtype, compile=compile,
                                        channels_last=self.spec.dims == 3 and self.device.type == "cuda",
                                        average_logits=self.cfg.inference.average == "logits")
        fmt = "onnx" if self.backend == "onnxruntime" else "torchscript"
        path = self.model_path
        if not self.loaded_exported:
            from medseg.inference.export import cached_export

            path = cached_export(path, fmt)
        if fmt == "onnx":
            return backends.OnnxRunner(path, device=self.device, threads=threads)
        return backends.TorchScriptRunner(path, device=self.device, amp=self.amp, amp_dtype=self.amp_dtype)

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.cfg.labels)

    def plan(self, vol: Volume):
        """Estimated peak memory and the run settings for ``vol`` (see :mod:`medseg.inference.memory`)."""
        try:
            plan = self._memory_plan(vol.shape, vol.affine, vol.array.dtype.itemsize, self.plan_memory)
        except MedsegError as exc:  # the message names the volume that does not fit
            if exc.path is None and vol.source:
                exc.path = str(vol.source)
                exc.args = (exc.format(),)
            raise
        self.last_plan = plan
        return plan

    def _memory_plan(self, shape, affine, source_itemsize: int, check: bool):
        from medseg.inference.memory import plan_memory

        params = sum(p.numel() * 4 for n in self.nets for p in n.parameters())
        # mirror TTA runs inside the window batch (MirrorRunner): its passes count as ensemble groups
        return plan_memory(shape, affine, self.cfg, num_classes=self.cfg.out_channels, channels=self.cfg.in_channels,
                           device=self.runner.device, source_itemsize=source_itemsize,
                           groups=self.window_runner.groups, sw_batch_size=self._sw_batch_size, amp=self.amp,
                           param_bytes=params, check=check)

    def processed_probabilities(self, vol: Volume, plan=None):
        """``(probs, image)``: probabilities ``(C, …)`` on the processed grid and the processed image."""
        if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
            from medseg.core.errors import UnsupportedInputError

            bad = int((~np.isfinite(vol.array)).sum())
            raise UnsupportedInputError("image contains NaN or Inf voxels", path=vol.source,
                                        expected="finite intensities", found=f"{bad} non-finite voxels",
                                        fix="repair or mask the image before segmenting it")
        t0 = time.perf_counter()
        plan = plan or self.plan(vol)
        try:  # a sequence count the model does not take is refused by the loading step (split_channels)
            item = self.transforms({"image": vol, "name": _case_label(vol)})
        except RuntimeError as exc:  # MONAI's Compose wraps errors raised inside a transform
            if isinstance(exc.__cause__, MedsegError):
                raise exc.__cause__ from None
            raise
        image = item["image"]
        del item
        t1 = time.perf_counter()
        probs = self.model_grid_probabilities(image, plan)
        self.stage_seconds["preprocess"] += t1 - t0
        self.stage_seconds["network"] += time.perf_counter() - t1
        return probs, image

    def model_grid_probabilities(self, image, plan=None) -> torch.Tensor:
        """Probabilities ``(C, …)`` for an image already preprocessed for this model (``(S, …)`` on the model
        grid): the sliding window, mirror TTA and ensemble members, on the foreground box when the model
        crops to it. Training uses it to compute a teacher's soft targets."""
        if plan is None:
            plan = self._memory_plan(tuple(image.shape[1:]), np.asarray(image.affine), 4, check=False)
        return on_foreground(self.cfg, image, lambda work: self._probs(work, plan))

    @property
    def activation(self) -> str:
        return "sigmoid" if self.cfg.regions else "softmax"

    def decode(self, probs: torch.Tensor) -> torch.Tensor:
        """Labels from probabilities ``(C, ...)``: the argmax, or a region model's regions painted in order."""
        if self.cfg.regions:
            from medseg.core.regions import region_parents, regions_to_labels

            # nnU-Net paints its regions in order with no nesting rule; an imported model decodes as nnU-Net does
            parents = None if self.cfg.preprocess.nnunet is not None else region_parents(self.cfg.regions)
            return regions_to_labels(probs, self.cfg.region_values(), parents=parents)
        return channel_argmax(probs)

    def probabilities(self, vol: Volume) -> torch.Tensor:
        """Class probabilities ``(C, X, Y, Z)`` (float32) on the source grid of ``vol``."""
        probs, image = self.processed_probabilities(vol)
        if self.cfg.preprocess.nnunet is not None:
            from medseg.preprocessing import nnunet

            meta = image.meta["nnunet"]
            probs = nnunet.probabilities_to_input_grid(probs, nnunet.grid_of(meta), self.cfg.preprocess.nnunet,
                                                       softmax=not self.cfg.regions)
            return to_source_grid(probs, meta["input_affine"], vol.affine, vol.shape)
        return to_source_grid(probs.float(), image.affine, vol.affine, vol.shape)

    def _labels_on_input_grid(self, probs: torch.Tensor, image, vol: Volume, dtype) -> np.ndarray:
        """Labels on ``vol``'s grid from probabilities on the processed grid of ``image``."""
        if self.cfg.preprocess.nnunet is None:
            return labels_on_source_grid(probs, image.affine, vol.affine, vol.shape, dtype=dtype, decode=self.decode)
        from medseg.preprocessing import nnunet

        meta = image.meta["nnunet"]
        labels = nnunet.to_input_grid(probs, nnunet.grid_of(meta), self.cfg.preprocess.nnunet, self.decode, dtype)
        # preprocess.orientation permuted/flipped the input first: the same voxels, re-indexed back
        return labels_on_source_grid(torch.from_numpy(labels)[None], meta["input_affine"], vol.affine, vol.shape,
                                     dtype=dtype, decode=lambda x: x[0])

    def _probs(self, image, plan) -> torch.Tensor:
        roi = window_size(self.cfg, image.shape[1:], self.spec.dims)
        box = body_crop(self.cfg, image, roi)
        if box is not None:
            return within_box(self.cfg, image, box, lambda work: self._sliding_window(work, roi, plan))
        return self._sliding_window(image, roi, plan)

    def _sliding_window(self, image, roi, plan) -> torch.Tensor:
        run_dev = self.runner.device
        return sliding_window_probs(
            self.window_runner, image, roi, num_classes=self.cfg.out_channels, overlap=self.cfg.inference.overlap,
            activation=self.activation, steps=self.cfg.inference.window_steps,
            blend=self.cfg.inference.blend, sw_batch_size=plan.sw_batch_size, device=run_dev,
            out_dtype=plan.probs_dtype, groups=self.window_runner.groups,
            accumulate_on=run_dev if plan.accumulate_on == "device" else torch.device("cpu"),
            image_on_device=plan.image_on_device)

    def set_tta(self, on: bool) -> None:
        """Mirror test-time augmentation on or off; only along the axes the model was trained to be
        mirror-invariant on (``augment.flip_axes``)."""
        self.cfg.inference.tta = bool(on)
        self.tta_axes = sorted(set(self.cfg.augment.flip_axes)) if (on and self.cfg.augment.enabled) else []

    @property
    def window_runner(self):
        """The runner the sliding window calls: the backend's, wrapped in mirror TTA when it is on."""
        from medseg.inference.backends import MirrorRunner

        if not self.tta_axes:
            return self.runner
        return MirrorRunner(self.runner, self.tta_axes, combinations=self.cfg.inference.mirror == "combinations",
                            average_logits=self.cfg.inference.average == "logits")

    def predict_volume(self, vol: Volume, probabilities_to: str | Path | None = None) -> Volume:
        """Integer label volume with exactly ``vol``'s shape and affine. ``probabilities_to``: also write the
        class probabilities it is the argmax of (processed grid, see :mod:`medseg.inference.probabilities`)."""
        probs, image = self.processed_probabilities(vol)
        if probabilities_to is not None:
            from medseg.inference.probabilities import save_probabilities

            save_probabilities(probabilities_to, probs, image.affine)
        t0 = time.perf_counter()
        dtype = np.uint8 if self.cfg.num_classes <= 256 else np.uint16
        labels = self._labels_on_input_grid(probs, image, vol, dtype)
        del probs, image
        labels = apply_postprocessing(labels, self.cfg.inference.postprocess)
        self.stage_seconds["to_grid"] += time.perf_counter() - t0
        return vol.with_array(labels, kind="labels", label_names=self.labels)

    def predict_file(self, path: str | Path, out_path: str | Path) -> Prediction:
        t0 = time.perf_counter()
        vol = load_volume(path)
        labels = self.predict_volume(vol)
        save_volume(labels, out_path, reference=vol)
        return Prediction(labels, time.perf_counter() - t0)
