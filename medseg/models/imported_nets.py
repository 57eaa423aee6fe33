"""Networks of models imported from elsewhere, built from plain data in the model's config (``model.arch``).

Kept apart from the importers (:mod:`medseg.models.nnunet`, :mod:`medseg.models.monai_bundle`) so the
registry builds them without importing what reads and writes model files.
"""

from __future__ import annotations

import copy

import torch

from medseg.core.errors import ConfigError

NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
"""The network classes an imported plans file may name (nnU-Net's default and its residual-encoder presets)."""

LAYERS = {
    f"torch.nn.{prefix}{name}": name
    for name, prefixes in {
        "Conv2d": ("", "modules.conv."), "Conv3d": ("", "modules.conv."),
        "InstanceNorm2d": ("", "modules.instancenorm."), "InstanceNorm3d": ("", "modules.instancenorm."),
        "BatchNorm2d": ("", "modules.batchnorm."), "BatchNorm3d": ("", "modules.batchnorm."),
        "GroupNorm": ("", "modules.normalization."),
        "Dropout": ("", "modules.dropout."), "Dropout2d": ("", "modules.dropout."), "Dropout3d": ("", "modules.dropout."),
        "LeakyReLU": ("", "modules.activation."), "ReLU": ("", "modules.activation."),
        "PReLU": ("", "modules.activation."), "GELU": ("", "modules.activation."),
    }.items()
    for prefix in prefixes
}
"""Layer types plans may name for ``arch_kwargs_requires_import`` (dotted names as nnU-Net writes them)."""

CONFIGURATIONS = ("3d_fullres", "3d_lowres", "2d")

INSTALL_FIX = ("pip install --no-deps 'dynamic-network-architectures>=0.4,<0.5' "
               "(no dependencies: its timm dependency pulls a torchvision that does not import beside this torch)")


def _import_dna():
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise ConfigError("nnU-Net models need the dynamic-network-architectures package",
                          expected="dynamic_network_architectures importable", found="not installed",
                          fix=INSTALL_FIX) from None
    return unet


def build_nnunet(model_cfg, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The network an nnU-Net plans file describes (``model.arch``), as nnU-Net builds it for inference (no deep
    supervision). Registry builder of the ``nnunet`` model."""
    arch = model_cfg.arch or {}
    name = arch.get("network_class_name")
    if name not in NETWORKS:
        raise ConfigError("unsupported nnU-Net network class", expected=" | ".join(NETWORKS), found=repr(name),
                          fix="import a model trained with nnU-Net's default or residual-encoder plans")
    kwargs = copy.deepcopy(arch.get("arch_kwargs") or {})
    for key in arch.get("arch_kwargs_requires_import") or []:
        value = kwargs.get(key)
        if value is None:
            continue
        if value not in LAYERS:
            raise ConfigError(f"unsupported layer type in the plans' {key}", expected="a torch.nn layer such as "
                              "torch.nn.modules.conv.Conv3d", found=repr(value),
                              fix="import a model whose plans use standard torch.nn layers")
        kwargs[key] = getattr(torch.nn, LAYERS[value])
    kwargs.pop("deep_supervision", None)
    cls = getattr(_import_dna(), NETWORKS[name])
    return cls(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)



def build_monai(model_cfg, in_channels: int, out_channels: int) -> torch.nn.Module:
    """A network of ``monai.networks.nets`` from ``model.arch`` (``class`` and ``kwargs``). Registry builder of
    the ``monai`` model."""
    import monai.networks.nets as nets

    arch = model_cfg.arch or {}
    name = str(arch.get("class", ""))
    cls = getattr(nets, name, None)
    if not name or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ConfigError("unknown MONAI network class", expected="a class of monai.networks.nets (e.g. UNet)",
                          found=repr(name), fix="import a bundle whose network_def is a MONAI network")
    return cls(**dict(arch.get("kwargs") or {}))
