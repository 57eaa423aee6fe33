"""Model registry: a name maps to a builder, its dimensionality and when to use it.

Add a model by writing a builder ``(model_cfg, in_channels, out_channels) -> nn.Module``
and one :class:`ModelSpec` entry in :data:`MODELS`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medseg.core.errors import UnknownModelError


class SliceWise(nn.Module):
    """Run a 2D network on every slice of a 3D input ``(B, C, X, Y, Z)`` along the last axis."""

    def __init__(self, net2d: nn.Module) -> None:
        super().__init__()
        self.net = net2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.net(x)
        b, c, h, w, d = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        out = self.net(slices)
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)


def _unet(spatial_dims: int):
    def build(cfg, in_channels: int, out_channels: int) -> nn.Module:
        from monai.networks.nets import UNet

        if len(cfg.strides) != len(cfg.channels) - 1:
            from medseg.core.errors import ConfigError

            raise ConfigError("model.strides must have one entry fewer than model.channels",
                              expected=f"{len(cfg.channels) - 1} strides", found=str(cfg.strides),
                              fix="e.g. channels [16, 32, 64, 128] with strides [2, 2, 2]")
        net = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
            dropout=cfg.dropout,
            norm=cfg.norm,
        )
        return net if spatial_dims == 3 else SliceWise(net)

    return build


def _dynunet(cfg, in_channels: int, out_channels: int) -> nn.Module:
    """nnU-Net-style residual-free U-Net (MONAI ``DynUNet``): 3x3x3 kernels, the config's strides.

    ``channels`` sets the filters per level (one more entry than ``strides``), and
    ``deep_supervision`` adds that many auxiliary heads while training.
    """
    from monai.networks.nets import DynUNet

    from medseg.core.errors import ConfigError

    if len(cfg.strides) != len(cfg.channels) - 1:
        raise ConfigError("model.strides must have one entry fewer than model.channels",
                          expected=f"{len(cfg.channels) - 1} strides", found=str(cfg.strides),
                          fix="e.g. channels [16, 32, 64, 128] with strides [2, 2, 2]")
    if cfg.deep_supervision > len(cfg.strides) - 1:
        raise ConfigError("too many deep-supervision heads", expected=f"at most {len(cfg.strides) - 1}",
                          found=str(cfg.deep_supervision), fix="lower model.deep_supervision")
    strides = [1, *cfg.strides]
    kernels = cfg.kernel_sizes or [3] * len(strides)
    if len(kernels) != len(strides) or any(
            not isinstance(k, int) and (len(k) != 3 or min(k) < 1) for k in kernels):
        raise ConfigError("model.kernel_sizes must have one [x, y, z] entry per level", expected=f"{len(strides)} "
                          "entries (one more than strides)", found=str(kernels),
                          fix="e.g. [[1, 3, 3], [3, 3, 3], ...], or null for 3x3x3 everywhere")
    return DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
        kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
        filters=list(cfg.channels), dropout=cfg.dropout or None, norm_name=cfg.norm,
        deep_supervision=cfg.deep_supervision > 0, deep_supr_num=max(1, cfg.deep_supervision),
        res_block=cfg.num_res_units > 0,
    )


def _nnunet(cfg, in_channels: int, out_channels: int) -> nn.Module:
    from medseg.models.imported_nets import build_nnunet

    return build_nnunet(cfg, in_channels, out_channels)


def _monai(cfg, in_channels: int, out_channels: int) -> nn.Module:
    from medseg.models.imported_nets import build_monai

    return build_monai(cfg, in_channels, out_channels)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dims: int
    description: str
    build: Callable[..., nn.Module]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("unet3d", 3, "MONAI residual U-Net on 3D patches; the default for CT and MR volumes.", _unet(3)),
        ModelSpec("unet2d", 2, "MONAI residual U-Net on 2D slices; applied slice by slice to volumes "
                               "(use patch depth 1). Lighter than 3D for thick-slice scans. Also takes "
                               "task: image2d (plain U-Net from scratch on images).", _unet(2)),
        ModelSpec("dynunet3d", 3, "nnU-Net-style 3D U-Net (MONAI DynUNet) with optional deep supervision; "
                                  "residual blocks when num_res_units > 0.", _dynunet),
        ModelSpec("nnunet", 3, "A network imported from an nnU-Net v2 results folder ('medseg import-model nnunet'), "
                               "built from its plans by dynamic-network-architectures; predicts only.", _nnunet),
        ModelSpec("monai", 3, "A network of monai.networks.nets with its arguments, imported from a MONAI bundle "
                              "('medseg import-model monai-bundle'); predicts only.", _monai),
    ]
}

# 2D image models (task: image2d; RGB PNG/JPEG in), see medseg/models/nets2d.py
from medseg.models import nets2d  # noqa: E402

MODELS.update({
    spec.name: spec
    for spec in [
        ModelSpec("fcn_resnet", 2, "Images: FCN on a MONAI ResNet encoder (model.backbone, default resnet18) with "
                                   "skip heads at 8s/16s/32s (model.output_stride). A solid, simple baseline; "
                                   "choose it when a ResNet backbone's weights are at hand.", nets2d.build_fcn),
        ModelSpec("segnet", 2, "Images: SegNet encoder-decoder that unpools with the max-pooling indices "
                               "(widths: model.channels). The small one (0.6 M parameters at 16-128): little "
                               "data, few classes, small images, tight memory; narrow it for speed.",
                  nets2d.build_segnet),
        ModelSpec("deeplabv3plus_mobilenetv3", 2, "Images: DeepLabV3+ (atrous MobileNetV3 encoder, ASPP, decoder "
                                                  "with stride-4 features). Real-time on modest hardware with good "
                                                  "accuracy on large scenes (street, indoor).", nets2d.build_deeplab),
        ModelSpec("flexunet2d", 2, "Images: U-Net with a MONAI EfficientNet/ResNet encoder (FlexibleUNet; "
                                   "model.backbone, default efficientnet-b0). Choose it for fine boundaries and "
                                   "small structures (cells, defects, documents).", nets2d.build_flexunet),
    ]
})


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        fix = f"did you mean '{close[0]}'?" if close else "run 'medseg models' to list them"
        raise UnknownModelError(f"unknown model '{name}'", expected=f"one of {', '.join(MODELS)}",
                                found=repr(name), fix=fix)
    return MODELS[name]


def build_model(model_cfg, in_channels: int, out_channels: int) -> nn.Module:
    return get_spec(model_cfg.name).build(model_cfg, in_channels, out_channels)


def register_model(spec: ModelSpec, *, replace: bool = False) -> None:
    """Add an architecture to the registry (e.g. from a plugin or a test)."""
    if spec.name in MODELS and not replace:
        from medseg.core.errors import ConfigError

        raise ConfigError(f"model '{spec.name}' is already registered", fix="pick another name or pass replace=True")
    MODELS[spec.name] = spec
