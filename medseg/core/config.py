"""Typed configuration loaded from YAML.

A config file maps onto :class:`Config`, a tree of dataclasses. Unknown keys and
wrong types are reported with the file, the key and the allowed values. The
resolved config (after ``--set`` overrides) is stored inside every checkpoint, so a
model file alone is enough to predict.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg.core.errors import ConfigError, InputNotFoundError


#: Named CT windows as (level, width) in Hounsfield units (``preprocess.intensity.ct_preset``).
CT_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
#: ``preprocess.intensity.mode`` values.
INTENSITY_MODES = ("zscore", "percentile", "ct_window", "ct_fingerprint", "range", "none")
#: ``inference.postprocess`` steps, in the order they are applied.
POSTPROCESS_STEPS = ("keep_largest_foreground", "keep_largest")
#: ``data.layout`` values of ``task: image2d``.
LAYOUTS = ("auto", "folders", "voc", "cityscapes", "camvid")
#: Models that take PNG/JPEG images only (``task: image2d``), and every model that takes them.
IMAGE_ONLY_MODELS = ("fcn_resnet", "segnet", "deeplabv3plus_mobilenetv3", "flexunet2d")
IMAGE2D_MODELS = (*IMAGE_ONLY_MODELS, "unet2d")
#: Models that take volumes only (``task: volume``).
VOLUME_ONLY_MODELS = ("unet3d", "dynunet3d")


@dataclass
class ChannelConfig:
    """One MRI sequence (input channel) of a case: ``{name: flair, patterns: ["*flair*", "*t2f*"]}``, or just
    its name (``flair``), which stands for the pattern ``*flair*``."""

    name: str = ""
    patterns: list[str] = field(default_factory=list)
    """Shell-style patterns matched, ignoring case, against the file names in a case folder (``*`` any text);
    exactly one file of a case must match. Empty: ``*NAME*``."""

    def file_patterns(self) -> list[str]:
        return list(self.patterns) or [f"*{self.name}*"]


@dataclass
class RegionConfig:
    """A region trained and scored as one sigmoid output: the union of some label values (nnU-Net's
    region-based training), e.g. ``{name: tumour_core, labels: [1, 3, 4]}``."""

    name: str = ""
    labels: list[int] = field(default_factory=list)
    value: int | None = None
    """The label value written for voxels of this region that no later region claims; ``null`` = the smallest
    of its labels that no later region lists (so regions listed from largest to smallest write back the
    label map they came from, as far as the regions can tell the labels apart)."""


#: Default ``data.label_patterns``: the label file of a case folder.
LABEL_PATTERNS = ["*seg*", "*label*"]


@dataclass
class DataConfig:
    root: str | None = None
    """A dataset folder: MSD/nnU-Net style with ``imagesTr/`` and ``labelsTr/``, or one sub-folder per case
    whose files are matched to ``channels`` by their patterns (BraTS style)."""
    datalist: str | None = None
    """JSON file with ``{"training": [{"image": ..., "label": ...}, ...]}`` (MSD dataset.json style); with several
    sequences, ``"image"`` is a list in ``channels`` order or a mapping from sequence name to file."""
    channels: list[ChannelConfig] = field(default_factory=list)
    """The sequences of a case, in the order the model takes them (``[flair, t1c]``, or mappings with file
    ``patterns``). Empty: one image per case. nnU-Net files ``CASE_0000``, ``CASE_0001``... and the channels of a
    4D image are taken in this order."""
    reference: str | None = None
    """The sequence whose grid the others are resampled onto and the output lies on; ``null`` = the first."""
    label_patterns: list[str] = field(default_factory=lambda: list(LABEL_PATTERNS))
    """Case folders: patterns of the label file (ignoring case)."""
    val_fraction: float = 0.2
    seed: int = 0
    test_fraction: float = 0.0
    """Cases set aside before any split (the validation side of a ``val_fraction`` split of this size and
    seed), never trained or validated on, also not by cross-validation; benchmarks score them as unseen."""
    cache: bool = True
    folds: int = 0
    """Cross-validation: split the cases into this many folds (0 = one split by ``val_fraction``)."""
    fold: int = 0
    """Which fold is the validation set when ``folds`` > 1 (``medseg train --folds`` sets it)."""
    layout: str = "auto"
    """``task: image2d`` only: ``auto`` (recognise the folder), ``folders`` (``images``/``masks``), ``voc``,
    ``cityscapes`` or ``camvid``."""
    images: str = "images"
    """``layout: folders``: sub-folder of ``root`` with the images (PNG/JPEG)."""
    masks: str = "masks"
    """``layout: folders``: sub-folder of ``root`` with the index or palette mask PNGs (same stems)."""
    ignore_index: int = 255
    """``task: image2d``: mask value that is left out of the loss and of IoU (void, borders)."""


@dataclass
class IntensityConfig:
    mode: str = "zscore"
    """One of ``zscore``, ``percentile``, ``ct_window``, ``none``."""
    nonzero: bool = True
    """For ``zscore``: statistics over non-zero voxels only (the foreground of skull-stripped or cropped MR)."""
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    ct_preset: str | None = None
    """For ``ct_window``: a named HU preset (see ``medseg.preprocessing.CT_PRESETS``)."""
    window: list[float] | None = None
    """For ``ct_window``: explicit ``[level, width]`` in HU, overrides ``ct_preset``."""
    clip: list[float] | None = None
    """For ``ct_fingerprint``: ``[lower, upper]`` clip values (the dataset's foreground 0.5/99.5 percentiles)."""
    mean: float | None = None
    """For ``ct_fingerprint``: foreground mean after clipping (from ``medseg plan``)."""
    std: float | None = None
    """For ``ct_fingerprint``: foreground standard deviation (from ``medseg plan``)."""
    scale_range: list[float] | None = None
    """For ``range``: ``[a_min, a_max, b_min, b_max]``, MONAI's ``ScaleIntensityRange`` (linear map of
    ``[a_min, a_max]`` onto ``[b_min, b_max]``; models imported from MONAI bundles)."""
    scale_clip: bool = False
    """For ``range``: clip to ``[b_min, b_max]``."""


@dataclass
class NnUNetPreprocessConfig:
    """nnU-Net v2's preprocessing of an imported model (``medseg import-model nnunet``), from its plans and
    dataset fingerprint; :mod:`medseg.preprocessing.nnunet` applies it. Axis orders are nnU-Net's (after
    ``transpose``)."""

    configuration: str = "3d_fullres"
    transpose: list[int] = field(default_factory=lambda: [0, 1, 2])
    """The plans' ``transpose_forward`` (axes of the image as SimpleITK reads it, ``(k, j, i)``)."""
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Target spacing (transposed order)."""
    normalization: list[str] = field(default_factory=lambda: ["ZScoreNormalization"])
    """One scheme per input channel."""
    mask_for_norm: list[bool] = field(default_factory=lambda: [False])
    intensity_properties: list[dict[str, float]] = field(default_factory=list)
    """Per channel: the dataset's foreground ``mean``, ``std``, ``percentile_00_5``, ``percentile_99_5``."""
    data_resampling: dict[str, Any] = field(default_factory=lambda: {"order": 3, "order_z": 0,
                                                                     "force_separate_z": None})
    probabilities_resampling: dict[str, Any] = field(default_factory=lambda: {"order": 1, "order_z": 0,
                                                                              "force_separate_z": None})


@dataclass
class PreprocessConfig:
    orientation: str | None = "RAS"
    spacing: list[float] | None = None
    """Target voxel spacing in mm; ``null`` keeps the native spacing."""
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = False
    """Crop to the bounding box of the foreground (voxels that differ from the background fill in any
    sequence): training volumes, and at prediction the image, whose outside is then background. Speeds up
    skull-stripped MR, where the brain is a fraction of the grid."""
    nnunet: NnUNetPreprocessConfig | None = None
    """Set for models imported from nnU-Net: its preprocessing replaces ``spacing``, ``intensity`` and
    ``crop_foreground`` (``orientation`` still applies first when set)."""


@dataclass
class PatchConfig:
    size: list[int] = field(default_factory=lambda: [96, 96, 96])
    foreground_ratio: float = 0.67
    """Fraction of sampled patches centred on a labelled voxel."""
    samples_per_volume: int = 2


@dataclass
class AugmentConfig:
    enabled: bool = True
    flip_axes: list[int] = field(default_factory=lambda: [0])
    """Axes (after reorientation) that may be mirrored. Mirror only along axes whose flip keeps label meaning."""
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    affine_prob: float = 0.2
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    intensity_prob: float = 0.3
    noise_std: float = 0.05
    noise_prob: float = 0.15
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    """Range of the contrast (gamma) adjustment."""
    gamma_prob: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Range of the Gaussian blur sigma, in voxels."""
    blur_prob: float = 0.0
    elastic_prob: float = 0.0
    """Probability of an elastic deformation (slow on CPU; nnU-Net uses it sparingly)."""
    elastic_sigma: list[float] = field(default_factory=lambda: [9.0, 13.0])
    """Range of the Gaussian smoothing of the displacement field, in voxels."""
    elastic_magnitude: list[float] = field(default_factory=lambda: [0.0, 200.0])
    """Range of the displacement magnitude before smoothing (nnU-Net's alpha)."""


@dataclass
class ModelConfig:
    name: str = "unet3d"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int | list[int]] = field(default_factory=lambda: [2, 2, 2])
    """One stride per level: an int, or ``[x, y, z]`` for anisotropic data (from ``medseg plan``)."""
    num_res_units: int = 2
    dropout: float = 0.0
    norm: str = "instance"
    deep_supervision: int = 0
    """``dynunet3d`` only: number of extra deep-supervision heads during training (0 = off)."""
    kernel_sizes: list[list[int]] | None = None
    """``dynunet3d`` only: convolution kernel per level, ``[x, y, z]`` (one more entry than ``strides``);
    ``null`` = 3x3x3 everywhere. ``medseg plan`` uses 1 along axes too coarse for a 3-voxel kernel (nnU-Net)."""
    backbone: str | None = None
    """2D image models: the encoder (``fcn_resnet``: resnet18/34/50...; ``flexunet2d``: efficientnet-b0.../resnet18...;
    ``deeplabv3plus_mobilenetv3``: mobilenetv3_large or mobilenetv3_small); ``null`` = the model's default."""
    output_stride: int | None = None
    """``fcn_resnet``: finest skip, 8/16/32 (FCN-8s/16s/32s, default 8); ``deeplabv3plus_mobilenetv3``: encoder
    output stride, 8/16/32 (atrous convolution beyond it, default 16)."""
    weights: str | None = None
    """2D image models: a state_dict file (whole model or its encoder) to start training from."""
    arch: dict[str, Any] | None = None
    """Imported networks (``nnunet``): the network class and its keyword arguments, as nnU-Net's plans give them
    (``network_class_name``, ``arch_kwargs``, ``arch_kwargs_requires_import``)."""


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    """``adamw``, or ``sgd``: nnU-Net's choice, SGD with Nesterov momentum 0.99 (use it with e.g. ``lr: 0.01``
    and ``weight_decay: 3.0e-5``). Either way the learning rate decays polynomially to zero (power 0.9)."""
    loss: str = "dicece"
    """``dicece`` (Dice + cross-entropy) or ``dice``."""
    batch_dice: bool = False
    """3D tasks: compute the Dice term over the whole batch as one volume (nnU-Net's choice for its 3D
    configurations) instead of per patch and then averaged."""
    val_every: int = 5
    output_dir: str = "runs/default"
    device: str = "auto"
    amp: bool = True
    """Mixed precision: on CUDA always (``amp_dtype``); on the CPU only when ``amp_dtype`` is ``bf16``."""
    amp_dtype: str = "fp16"
    """``fp16`` (CUDA; the CPU then trains in fp32) or ``bf16`` (CUDA, and the CPU: 1.4-2.5x faster
    3D training steps on CPUs with AMX, e.g. Intel Xeon 4th generation and newer; slower without it)."""
    num_workers: int = 0
    threads: int | None = None
    """CPU threads for torch; ``null`` leaves torch's default."""
    seed: int = 0
    channels_last: bool = True
    """Channels-last (NDHWC) memory layout for 3D models: on CUDA, and on the CPU under bf16 (``amp_dtype: bf16``),
    where oneDNN's bf16 convolutions run faster in it; fp32 CPU training keeps the default layout."""
    ema: float = 0.0
    """Exponential moving average of the weights (e.g. 0.999); validated and saved instead of the raw weights. 0 = off."""
    init_from: str | None = None
    """Start from the weights of this checkpoint (same model config); the optimizer and schedule start fresh."""
    checkpoint_every: int = 1
    """Write ``last.pt`` (and ``history.json``) every this many epochs and at the last one. A kill loses at
    most this many epochs; raise it when epochs take a second or two (a GPU) and the writes start to count."""
    deterministic: bool = True
    """CUDA only: ``false`` lets cuDNN benchmark and pick its fastest, non-deterministic convolution
    algorithms (faster 3D training on a GPU; runs with the same seed then differ slightly)."""
    teacher: str | None = None
    """Knowledge distillation: a trained model (file or bundled name, e.g. an ensemble packed by ``pack-model``)
    whose class probabilities, mirror TTA included, become soft targets beside the manual labels. They are
    computed once per case on the preprocessed grid (cached with the data) and follow every augmentation. The
    teacher must share the student's labels and preprocessing. Label models only (not ``regions``)."""
    distill: float = 0.5
    """With ``teacher``: weight of the soft-target loss (soft Dice + cross-entropy against the teacher's
    probabilities); the manual labels' loss gets ``1 - distill``."""
    keep: str = "best"
    """What ``best.pt`` holds: ``best``, the weights of the epoch with the highest validation Dice; ``last``,
    the final weights whatever the validation says (nnU-Net's choice for cross-validation: the held-out
    fold is then scored without having chosen anything). Validation is still run and logged."""


@dataclass
class InferenceConfig:
    roi_size: list[int] | None = None
    """Sliding-window size; ``null`` uses the training patch size."""
    overlap: float = 0.5
    blend: str = "gaussian"
    sw_batch_size: int = 4
    tta: bool = False
    """Mirror test-time augmentation by default: each window is also predicted mirrored along
    ``augment.flip_axes`` and the probabilities averaged (one extra pass per axis). ``medseg predict
    --tta/--no-tta`` overrides it; cross-validation predicts its held-out cases with this setting."""
    mirror: str = "axes"
    """Mirror TTA passes: ``axes`` (one mirror image per axis of ``augment.flip_axes``) or ``combinations``
    (every combination of those axes, 2^n - 1 mirror images, as nnU-Net predicts)."""
    average: str = "probabilities"
    """How ensemble members and mirror passes are combined: ``probabilities`` (averaged after the softmax or
    sigmoid) or ``logits`` (averaged before it, as nnU-Net does)."""
    crop_to_body: bool = True
    """Run the sliding window only on the body's bounding box (:func:`medseg.preprocessing.pipeline.body_box`:
    planes of air, with no voxel above the Otsu threshold between air and tissue, or of fill are cut from the
    sides where the outermost plane is air or fill; 8 voxels of air kept) when that needs fewer windows;
    outside it the output is background. A third fewer windows on the shared CTs. Models imported from
    nnU-Net predict the whole grid, as nnU-Net does."""
    window_steps: str = "monai"
    """Window placement: ``monai`` (``sliding_window_inference``'s steps) or ``nnunet`` (nnU-Net's evenly spread
    steps of at most ``(1 - overlap)`` of a window)."""
    postprocess: dict[str, list[int]] = field(default_factory=dict)
    """Applied to predicted labels: ``keep_largest: [1, 2]`` keeps the largest connected component of each
    listed class; ``keep_largest_foreground: [1]`` keeps the largest component of all foreground together.
    ``medseg train --folds`` chooses it on cross-validation results."""


def check_overlap(value: float, source: str | Path = "config") -> None:
    """Sliding-window overlap (``inference.overlap`` or ``--overlap``) must lie in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError("inference.overlap must be in [0, 1)", path=source, found=str(value),
                          fix="use e.g. 0.5 (or --overlap 0.25)")


@dataclass
class Config:
    name: str = "model"
    plan: str | None = None
    """``auto`` (fingerprint the dataset and plan at train time) or a plan YAML from ``medseg plan``;
    planned values never override keys set in the config or with ``--set``."""
    labels: dict[int, str] = field(default_factory=lambda: {0: "background", 1: "foreground"})
    colors: dict[int, list[int]] | None = None
    """RGB colour per label (0-255); defaults to a fixed palette."""
    terminology: dict[int, str] | None = None
    """Coded meaning per label, a key of ``medseg.core.labels.KNOWN_TERMS`` (e.g. ``hippocampus:anterior``)."""
    modality: str = "MR"
    task: str = "volume"
    """``volume`` (NIfTI/NRRD/DICOM volumes) or ``image2d`` (PNG/JPEG images with mask PNGs, 2D image models)."""
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    regions: list[RegionConfig] = field(default_factory=list)
    """Region-based training: one sigmoid output per region (overlapping regions such as whole tumour >
    tumour core > enhancing tumour), decoded back to a label map in the listed order. Empty: one softmax
    output per label."""

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region with ``regions``, else one per label value."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def channel_names(self) -> list[str]:
        """The input sequences' names (``["image"]`` for one unnamed image)."""
        return [c.name for c in self.data.channels] or ["image"]

    @property
    def in_channels(self) -> int:
        return 3 if self.task == "image2d" else max(1, len(self.data.channels))

    @property
    def reference_channel(self) -> str:
        return self.data.reference or self.channel_names[0]

    def region_values(self) -> list[int]:
        """The label value each region writes back (:attr:`RegionConfig.value`, or its default)."""
        from medseg.core.regions import region_values

        return region_values(self.regions)

    def validate(self, source: str = "config") -> None:
        if 0 not in self.labels:
            raise ConfigError("labels must include 0 (background)", path=source,
                              expected="a 'labels' mapping with key 0", found=str(sorted(self.labels)),
                              fix="add '0: background' under labels")
        if self.task not in ("volume", "image2d"):
            raise ConfigError("unknown task", path=source, expected="'volume' or 'image2d'", found=repr(self.task),
                              fix="set task: image2d for PNG/JPEG images, or leave it out for volumes")
        if self.task == "image2d":
            if self.data.channels or self.regions:
                raise ConfigError("data.channels and regions are for volume tasks", path=source,
                                  found="task: image2d", fix="drop them; 2D image models take RGB images")
            validate_image2d(self, source)
            return
        if self.model.name in IMAGE_ONLY_MODELS:
            raise ConfigError(f"model '{self.model.name}' is for 2D images", path=source,
                              expected="task: image2d with this model, or a volume model (unet3d, unet2d, dynunet3d)",
                              found="task: volume", fix="add 'task: image2d' to the config")
        validate_channels_and_regions(self, source)
        spatial = 3
        if len(self.patch.size) != spatial:
            raise ConfigError("patch.size must have three entries", path=source,
                              expected="[x, y, z]", found=str(self.patch.size),
                              fix="for a 2D model on volumes use a depth of 1, e.g. [160, 160, 1]")
        if self.preprocess.spacing is not None and (
            len(self.preprocess.spacing) != 3 or min(self.preprocess.spacing) <= 0
        ):
            raise ConfigError("preprocess.spacing must be three positive numbers or null", path=source,
                              expected="e.g. [1.0, 1.0, 1.0]", found=str(self.preprocess.spacing),
                              fix="set preprocess.spacing to three positive values in mm")
        if not 0.0 <= self.patch.foreground_ratio <= 1.0:
            raise ConfigError("patch.foreground_ratio must be between 0 and 1", path=source,
                              found=str(self.patch.foreground_ratio), fix="use e.g. 0.67")
        if self.train.loss not in ("dicece", "dice"):
            raise ConfigError("unknown loss", path=source, expected="'dicece' or 'dice'",
                              found=repr(self.train.loss), fix="set train.loss to dicece or dice")
        check_overlap(self.inference.overlap, source)
        if self.data.folds == 1 or self.data.folds < 0 or (self.data.folds and not 0 <= self.data.fold < self.data.folds):
            raise ConfigError("invalid cross-validation setting", path=source,
                              expected="data.folds 0 (off) or >= 2, and 0 <= data.fold < data.folds",
                              found=f"folds {self.data.folds}, fold {self.data.fold}", fix="e.g. folds: 5, fold: 0")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self.data, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{key} must be in [0, 1)", path=source, found=str(value),
                                  fix="use e.g. 0.2 (a fifth of the cases) or 0 (none)")
        if self.train.keep not in ("best", "last"):
            raise ConfigError("unknown train.keep", path=source, expected="'best' or 'last'",
                              found=repr(self.train.keep), fix="set train.keep to best (default) or last")
        if self.train.optimizer not in ("adamw", "sgd"):
            raise ConfigError("unknown train.optimizer", path=source, expected="'adamw' or 'sgd'",
                              found=repr(self.train.optimizer), fix="set train.optimizer to adamw (default) or sgd")
        if self.train.checkpoint_every < 1 or self.train.val_every < 1:
            raise ConfigError("train.checkpoint_every and train.val_every must be at least 1", path=source,
                              found=f"checkpoint_every {self.train.checkpoint_every}, val_every {self.train.val_every}",
                              fix="use 1 (every epoch) or a larger whole number")
        if not 0.0 <= self.train.distill <= 1.0:
            raise ConfigError("train.distill must be in [0, 1]", path=source, found=str(self.train.distill),
                              fix="use e.g. 0.5 (half the loss from the teacher's probabilities)")
        if self.train.teacher and self.regions:
            raise ConfigError("train.teacher works for label models only", path=source,
                              expected="no regions: with train.teacher", found=f"{len(self.regions)} regions",
                              fix="remove train.teacher, or train the region model without a teacher")
        if not 0.0 <= self.train.ema < 1.0:
            raise ConfigError("train.ema must be in [0, 1)", path=source, found=str(self.train.ema),
                              fix="use 0 (off) or a decay such as 0.999")
        for key, classes in self.inference.postprocess.items():
            if key not in POSTPROCESS_STEPS:
                raise ConfigError("unknown postprocessing step", path=source,
                                  expected=" | ".join(POSTPROCESS_STEPS), found=repr(key),
                                  fix="fix the key under inference.postprocess")
            bad = [c for c in classes if c not in self.labels or c == 0]
            if bad:
                raise ConfigError(f"inference.postprocess.{key} names classes that are not labels", path=source,
                                  expected=f"some of {sorted(c for c in self.labels if c)}", found=str(bad),
                                  fix="list foreground label values only")
        for key, allowed in (("mirror", ("axes", "combinations")), ("average", ("probabilities", "logits")),
                             ("window_steps", ("monai", "nnunet"))):
            if getattr(self.inference, key) not in allowed:
                raise ConfigError(f"unknown inference.{key}", path=source, expected=" | ".join(allowed),
                                  found=repr(getattr(self.inference, key)), fix=f"set inference.{key}: {allowed[0]}")
        mode = self.preprocess.intensity.mode
        if mode not in INTENSITY_MODES:
            raise ConfigError("unknown intensity mode", path=source, expected=" | ".join(INTENSITY_MODES),
                              found=repr(mode), fix="set preprocess.intensity.mode to one of those")
        scale = self.preprocess.intensity.scale_range
        if mode == "range" and (scale is None or len(scale) != 4 or scale[0] == scale[1]):
            raise ConfigError("preprocess.intensity.scale_range needs [a_min, a_max, b_min, b_max]", path=source,
                              found=str(scale), fix="e.g. scale_range: [-57, 164, 0, 1]")
        preset = self.preprocess.intensity.ct_preset
        if mode == "ct_window" and self.preprocess.intensity.window is None:
            if preset not in CT_PRESETS:
                raise ConfigError("unknown CT window preset", path=source,
                                  expected=" | ".join(CT_PRESETS), found=repr(preset),
                                  fix="set preprocess.intensity.ct_preset or give window: [level, width]")


def validate_channels_and_regions(cfg, source: str = "config") -> None:
    """Checks of ``data.channels``, ``data.reference`` and ``regions`` (part of :meth:`Config.validate`)."""
    names = [c.name for c in cfg.data.channels]
    if any(not n or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", n) for n in names) or len(set(names)) != len(names):
        raise ConfigError("data.channels needs distinct sequence names", path=source,
                          expected="names of letters, digits, '_', '-', e.g. [flair, t1c]", found=str(names),
                          fix="name every sequence once")
    if cfg.data.reference is not None and cfg.data.reference not in cfg.channel_names:
        raise ConfigError("data.reference is not one of data.channels", path=source,
                          expected=" | ".join(cfg.channel_names), found=repr(cfg.data.reference),
                          fix="name the sequence whose grid the output should lie on, or drop data.reference")
    rnames = [r.name for r in cfg.regions]
    if len(set(rnames)) != len(rnames) or any(not n for n in rnames):
        raise ConfigError("regions need distinct names", path=source, found=str(rnames),
                          fix="e.g. whole_tumour, tumour_core, enhancing")
    for r in cfg.regions:
        bad = [v for v in r.labels if v not in cfg.labels or v == 0]
        if not r.labels or bad:
            raise ConfigError(f"region '{r.name}' must list foreground label values", path=source,
                              expected=f"some of {sorted(v for v in cfg.labels if v)}", found=str(r.labels),
                              fix="list the labels the region is the union of, e.g. labels: [1, 3, 4]")
        if r.value is not None and r.value not in cfg.labels:
            raise ConfigError(f"region '{r.name}' writes a value that is not a label", path=source,
                              expected=f"one of {sorted(cfg.labels)}", found=str(r.value), fix="drop 'value' or fix it")
    if cfg.regions and cfg.inference.postprocess:
        listed = {c for classes in cfg.inference.postprocess.values() for c in classes}
        unused = sorted(listed - set(cfg.region_values()))
        if unused:
            raise ConfigError("inference.postprocess names labels the regions never write", path=source,
                              expected=f"some of {cfg.region_values()}", found=str(unused), fix="list written labels")


def validate_image2d(cfg, source: str = "config") -> None:
    """Checks of a ``task: image2d`` config (part of :meth:`Config.validate`)."""
    if cfg.model.name not in IMAGE2D_MODELS:
        if cfg.model.name in VOLUME_ONLY_MODELS:
            raise ConfigError(f"model '{cfg.model.name}' is not a 2D image model", path=source,
                              expected=" | ".join(IMAGE2D_MODELS), found=repr(cfg.model.name),
                              fix="pick a 2D model ('medseg models' lists them)")
    size = cfg.patch.size
    if len(size) != 2 or min(size) < 64 or any(s % 32 for s in size):
        raise ConfigError("patch.size of a 2D image task must be [height, width], multiples of 32 from 64", path=source,
                          expected="e.g. [256, 256]", found=str(size), fix="set patch.size: [256, 256]")
    if cfg.train.loss not in ("dicece", "dice", "ce"):
        raise ConfigError("unknown loss", path=source, expected="'dicece', 'dice' or 'ce'",
                          found=repr(cfg.train.loss), fix="set train.loss to dicece, dice or ce")
    if cfg.data.layout not in LAYOUTS:
        raise ConfigError("unknown data.layout", path=source, expected=" | ".join(LAYOUTS),
                          found=repr(cfg.data.layout), fix="use auto to recognise the folder")
    if any(a not in (0, 1) for a in cfg.augment.flip_axes):
        raise ConfigError("augment.flip_axes of a 2D image task are 0 (up-down) and 1 (left-right)", path=source,
                          found=str(cfg.augment.flip_axes), fix="e.g. flip_axes: [1]")
    if cfg.data.ignore_index in cfg.labels or not 0 <= cfg.data.ignore_index <= 255:
        raise ConfigError("data.ignore_index must be a value in 0-255 that is not a label", path=source,
                          found=str(cfg.data.ignore_index), fix="use 255")
    if max(cfg.labels) > 254 or min(cfg.labels) < 0:
        raise ConfigError("2D labels must lie in 0-254", path=source, found=f"{min(cfg.labels)}..{max(cfg.labels)}",
                          fix="renumber the labels")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be in [0, 1)", path=source, found=str(cfg.data.val_fraction),
                          fix="use e.g. 0.2")


# ---------------------------------------------------------------------------
# dict <-> dataclass conversion


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
                value = {"name": value}  # ``channels: [flair, t1c]``
            if not isinstance(value, dict):
                raise TypeError
            return dataclass_from_dict(tp, value, source, prefix=key + ".")
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(v, item_tp, key, source) for v in value]
        if origin is dict:
            k_tp, v_tp = typing.get_args(tp)
            if not isinstance(value, dict):
                raise TypeError
            return {_coerce(k, k_tp, key, source): _coerce(v, v_tp, key, source) for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for '{key}'", path=source, expected=_type_name(tp),
                          found=repr(value), fix=f"correct '{key}' in the config or its --set override") from None
    return value


def _type_name(tp: Any) -> str:
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def dataclass_from_dict(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"remove it; allowed keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'", path=source,
                              expected=f"one of {', '.join(prefix + n for n in names)}",
                              found=f"'{prefix}{key}'", fix=hint)
        kwargs[key] = _coerce(value, hints[key], prefix + key, source)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-Python dict (YAML and ``torch.load(weights_only=True)`` safe)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "config") -> Config:
    cfg = dataclass_from_dict(Config, data, source)
    cfg.validate(source)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("bad --set override", expected="key=value, e.g. train.epochs=10",
                          found=repr(item), fix="write overrides as dotted.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set '{'.'.join(keys)}': '{k}' is not a section",
                                  found=repr(item), fix="check the key path")
        node[keys[-1]] = value
    return data


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise InputNotFoundError("config file not found", path=path, expected="a YAML file",
                                 fix="check the path; example configs live in configs/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}", path=path, found=str(getattr(exc, "problem", exc)),
                          fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping", path=path, found=type(data).__name__,
                          fix="start the file with top-level keys such as 'name:' and 'labels:'")
    return data


def merge_configs(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key (the child's keys win); lists and scalars are replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = value
    return out


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(value: Any, source: str | Path = "config") -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in every string of a config tree, from the environment."""
    if isinstance(value, dict):
        return {k: expand_environment(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_environment(v, source) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set", path=source,
                              expected=f"{name} in the environment (the config says ${{{name}}})", found="unset",
                              fix=f"export {name}=..., or write ${{{name}:-default}} in the config, or --set the key")
        return default

    return _ENV_VAR.sub(sub, value)


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The raw mapping of a config file: its ``extends:`` chain merged (paths relative to the file that names
    them), ``${VAR:-default}`` expanded, ``key=value`` overrides applied. Nothing is planned or validated."""
    path = Path(path)
    chain: list[Path] = []
    data: dict = {}
    current: Path | None = path
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            raise ConfigError("configs extend each other in a circle", path=current,
                              found=" -> ".join(str(p) for p in [*chain, resolved]),
                              fix="remove one of the 'extends:' keys")
        chain.append(resolved)
        layer = _read_yaml_mapping(current)
        parent = layer.pop("extends", None)
        data = merge_configs(layer, data)  # what was read first (the child) wins
        if parent is not None and not isinstance(parent, str):
            raise ConfigError("'extends' must name one config file", path=current, expected="extends: base.yaml",
                              found=repr(parent), fix="give the path of the base config, relative to this file")
        current = (current.parent / parent) if parent else None
    data = expand_environment(data, path)
    return apply_overrides(data, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (with its ``extends:`` chain), apply ``key=value`` overrides and validate it.

    A ``plan:`` key is kept as written: planning is the trainer's job
    (:func:`medseg.planning.load_planned_config`)."""
    return from_dict(read_config(path, overrides), source=str(path))


def explicit_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a raw config mapping sets (a section's keys, not the section)."""
    keys = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            keys |= explicit_keys(v, key + ".")
        else:
            keys.add(key)
    return keys
