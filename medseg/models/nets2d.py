"""2D networks for photographs and other RGB images: FCN, SegNet, DeepLabV3+, U-Net with an encoder.

MONAI supplies what it has: the ResNet encoders (``ResNetFeatures``), EfficientNet/ResNet
U-Nets (``FlexibleUNet``) and the atrous pyramid (``SimpleASPP``). Written here, in plain
torch: FCN's skip heads, SegNet's index-unpooling decoder, the DeepLabV3+ decoder and a
MobileNetV3 encoder whose parameter names follow the torchvision layout (``features.N...``),
so a MobileNetV3 state_dict saved from torchvision loads into it.

Every network takes ``(B, 3, H, W)`` and returns logits ``(B, C, H, W)`` for any H, W (the
predictor pads to a multiple of 32, which every one of them accepts); each has an
``encoder`` attribute so that user-supplied backbone weights can be loaded
(:func:`load_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medseg.core.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------
# helpers


def _conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=(k // 2) * dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _channels_of(encoder: nn.Module, in_channels: int) -> list[int]:
    """Channels of each feature map an encoder returns (one dry run at 64x64, statistics untouched)."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        feats = encoder(torch.zeros(1, in_channels, 64, 64))
    encoder.train(was_training)
    return [int(f.shape[1]) for f in feats]


# ---------------------------------------------------------------------------
# FCN (Long, Shelhamer, Darrell 2015) on a MONAI ResNet encoder

RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


class FCN(nn.Module):
    """Fully convolutional network: ResNet features at strides 8/16/32, one score map per stride.

    ``skips`` is 32 (FCN-32s: upsample the stride-32 scores), 16 (FCN-16s: add the stride-16
    scores) or 8 (FCN-8s: add stride 16 and 8). Skip score layers start at zero, as in the
    paper, so training starts as FCN-32s and learns how much detail to take from each stride.
    """

    def __init__(self, in_channels: int, num_classes: int, backbone: str = "resnet18", skips: int = 8,
                 dropout: float = 0.1) -> None:
        super().__init__()
        from monai.networks.nets import ResNetFeatures

        self.encoder = ResNetFeatures(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        ch = _channels_of(self.encoder, in_channels)  # strides 2, 4, 8, 16, 32
        self.skips = skips
        inter = max(ch[4] // 4, num_classes)
        self.head = nn.Sequential(_conv_bn_relu(ch[4], inter), nn.Dropout2d(dropout), nn.Conv2d(inter, num_classes, 1))
        self.score16 = nn.Conv2d(ch[3], num_classes, 1) if skips <= 16 else None
        self.score8 = nn.Conv2d(ch[2], num_classes, 1) if skips <= 8 else None
        for layer in (self.score16, self.score8):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.encoder(x)
        out = self.head(feats[4])
        if self.score16 is not None:
            out = F.interpolate(out, size=feats[3].shape[-2:], mode="bilinear", align_corners=False) + self.score16(feats[3])
        if self.score8 is not None:
            out = F.interpolate(out, size=feats[2].shape[-2:], mode="bilinear", align_corners=False) + self.score8(feats[2])
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------
# SegNet (Badrinarayanan, Kendall, Cipolla 2017)


class SegNetEncoder(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU, each followed by 2x2 max pooling that keeps its indices."""

    def __init__(self, in_channels: int, channels: list[int]) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for c in channels:
            stages.append(nn.Sequential(_conv_bn_relu(cin, c), _conv_bn_relu(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: torch.Tensor):
        indices, sizes = [], []
        for stage in self.stages:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = self.pool(x)
            indices.append(idx)
        return x, indices, sizes


class SegNet(nn.Module):
    """Encoder-decoder whose decoder upsamples with the encoder's max-pooling indices (no learned
    upsampling, no skip features stored): small and fast, boundaries follow the pooled maxima."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int]) -> None:
        super().__init__()
        self.encoder = SegNetEncoder(in_channels, channels)
        self.unpool = nn.MaxUnpool2d(2, 2)
        rev = list(channels[::-1])
        outs = rev[1:] + [rev[-1]]
        self.decoder = nn.ModuleList(nn.Sequential(_conv_bn_relu(c, c), _conv_bn_relu(c, o)) for c, o in zip(rev, outs))
        self.classifier = nn.Conv2d(outs[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, indices, sizes = self.encoder(x)
        for stage, idx, size in zip(self.decoder, indices[::-1], sizes[::-1]):
            x = stage(self.unpool(x, idx, output_size=size))
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MobileNetV3 (Howard et al. 2019), feature extractor with optional dilation

#: (kernel, expanded, out, squeeze-excite, hard-swish, stride) per inverted-residual block
MOBILENETV3 = {
    "large": (16, [(3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
                   (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
                   (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
                   (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
                   (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1)]),
    "small": (16, [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                   (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                   (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                   (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]),
}


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _cna(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1,
         act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation=dilation, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s), inplace=True)), inplace=True)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int, dilation: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_cna(cin, exp, 1, act=act))
        layers.append(_cna(exp, exp, k, stride=stride, groups=exp, dilation=dilation, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4)))
        layers.append(_cna(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Encoder(nn.Module):
    """MobileNetV3 feature extractor (``large`` or ``small``, width multiplier ``width``).

    ``output_stride`` 32, 16 or 8: beyond it, strides become dilations (atrous convolution),
    so the deepest features stay at 1/16 or 1/8 of the input. ``forward`` returns the
    features at stride 4 (low level) and the deepest features.
    """

    def __init__(self, in_channels: int = 3, variant: str = "large", width: float = 1.0, output_stride: int = 16) -> None:
        super().__init__()
        first, setting = MOBILENETV3[variant]
        cin = _divisible(first * width)
        layers: list[nn.Module] = [_cna(in_channels, cin, 3, stride=2, act=nn.Hardswish)]
        stride, dilation, self.low_index = 2, 1, 0
        for k, exp, cout, se, hs, s in setting:
            if s == 2 and stride * 2 > output_stride:
                dilation, s = dilation * 2, 1
            elif s == 2:
                stride *= 2
            exp_c, cout_c = _divisible(exp * width), _divisible(cout * width)
            layers.append(InvertedResidual(cin, k, exp_c, cout_c, se, hs, s, dilation))
            if stride == 4:
                self.low_index = len(layers) - 1
            cin = cout_c
        layers.append(_cna(cin, 6 * cin, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.low_channels = _divisible(setting[self.low_index - 1][2] * width)
        self.out_channels = 6 * cin

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        low = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.low_index:
                low = x
        return [low, x]


# ---------------------------------------------------------------------------
# DeepLabV3+ (Chen et al. 2018)


class ASPP(nn.Module):
    """MONAI's ``SimpleASPP`` (1x1 and three atrous 3x3 branches) plus DeepLab's image-pooling branch."""

    def __init__(self, in_channels: int, branch: int, out_channels: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        from monai.networks.blocks import SimpleASPP

        self.aspp = SimpleASPP(2, in_channels, branch, kernel_sizes=(1, 3, 3, 3), dilations=(1, *rates),
                               norm_type="BATCH", acti_type="RELU")
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(5 * branch, out_channels, 1), nn.Dropout2d(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([self.aspp(x), pooled], 1))


class DeepLabV3Plus(nn.Module):
    """MobileNetV3 encoder with atrous convolution, ASPP, and the V3+ decoder that refines the
    upsampled ASPP output with stride-4 encoder features."""

    def __init__(self, in_channels: int, num_classes: int, variant: str = "large", output_stride: int = 16,
                 aspp_channels: int = 64, decoder_channels: int = 96) -> None:
        super().__init__()
        self.encoder = MobileNetV3Encoder(in_channels, variant, output_stride=output_stride)
        base = {8: 12, 16: 6, 32: 3}[output_stride]  # the paper's rates 6/12/18 at output stride 16
        rates = (base, 2 * base, 3 * base)
        self.aspp = ASPP(self.encoder.out_channels, aspp_channels, decoder_channels, rates)
        self.low = _conv_bn_relu(self.encoder.low_channels, 32, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(decoder_channels + 32, decoder_channels),
                                     _conv_bn_relu(decoder_channels, decoder_channels))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low, deep = self.encoder(x)
        y = self.aspp(deep)
        low = self.low(low)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(torch.cat([y, low], 1)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------
# registry builders: (model_cfg, in_channels, out_channels) -> nn.Module


def _bad(option: str, value, allowed) -> ConfigError:
    return ConfigError(f"unsupported {option}", expected=" | ".join(map(str, allowed)), found=repr(value),
                       fix=f"set {option} to one of those")


def build_fcn(cfg, in_channels: int, out_channels: int) -> nn.Module:
    backbone = cfg.backbone or "resnet18"
    if backbone not in RESNETS:
        raise _bad("model.backbone", backbone, RESNETS)
    skips = cfg.output_stride or 8
    if skips not in (8, 16, 32):
        raise _bad("model.output_stride", skips, (8, 16, 32))
    return FCN(in_channels, out_channels, backbone, skips, dropout=cfg.dropout or 0.1)


def build_segnet(cfg, in_channels: int, out_channels: int) -> nn.Module:
    if not cfg.channels or min(cfg.channels) < 1:
        raise _bad("model.channels", cfg.channels, ["positive widths, e.g. [16, 32, 64, 128]"])
    return SegNet(in_channels, out_channels, list(cfg.channels))


def build_deeplab(cfg, in_channels: int, out_channels: int) -> nn.Module:
    backbone = cfg.backbone or "mobilenetv3_large"
    allowed = tuple(f"mobilenetv3_{v}" for v in MOBILENETV3)
    if backbone not in allowed:
        raise _bad("model.backbone", backbone, allowed)
    os_ = cfg.output_stride or 16
    if os_ not in (8, 16, 32):
        raise _bad("model.output_stride", os_, (8, 16, 32))
    return DeepLabV3Plus(in_channels, out_channels, backbone.split("_")[1], os_)


FLEX_BACKBONES = RESNETS + tuple(f"efficientnet-b{i}" for i in range(9))


def build_flexunet(cfg, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    backbone = cfg.backbone or "efficientnet-b0"
    if backbone not in FLEX_BACKBONES:
        raise _bad("model.backbone", backbone, FLEX_BACKBONES)

    class FlexUNet2D(FlexibleUNet):
        """MONAI's FlexibleUNet, padded (edge values) to a multiple of 32 and cropped back, for any size."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            ph, pw = (-h) % 32, (-w) % 32
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            return super().forward(x)[..., :h, :w]

    return FlexUNet2D(in_channels, out_channels, backbone, pretrained=False, spatial_dims=2,
                      decoder_channels=(128, 64, 32, 16, 16), dropout=cfg.dropout)


# ---------------------------------------------------------------------------
# user-supplied weights

HEAD_PREFIXES = ("fc.", "classifier.", "head.")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        from medseg.core.errors import InputNotFoundError

        raise InputNotFoundError("weights file not found", path=path, expected="a state_dict saved with torch.save",
                                 fix="check model.weights in the config")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... for foreign or damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError("cannot load weights file safely", path=path,
                              expected="a state_dict of tensors (torch.save(model.state_dict(), ...))", found=first,
                              fix="save plain tensors; files holding code are refused") from None
    if isinstance(obj, dict) and obj.get("format") == "medseg-checkpoint":
        obj = obj.get("state_dict")
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state_dict", path=path, expected="a mapping of parameter names to tensors",
                              found=type(obj).__name__, fix="save model.state_dict() or the encoder's state_dict()")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _mismatch(state: dict, target: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in state
              if k in target and state[k].shape != target[k].shape]
    return missing, unexpected, shapes


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load a user-supplied state_dict into the whole model or into its encoder (backbone).

    The file is read with ``weights_only=True``. Keys are matched exactly (a ``module.``
    prefix is dropped; for an encoder, also a leading ``encoder.``/``backbone.`` and the
    classification head ``fc.*``/``classifier.*`` of an ImageNet model). Any missing or
    unexpected key or any shape difference is a :class:`CheckpointError`. Returns
    ``"model"`` or ``"encoder"``.
    """
    path = Path(path)
    state = _read_state(path)
    full = model.state_dict()
    if set(state) == set(full):
        missing, unexpected, shapes = _mismatch(state, full)
        target, what = model, "model"
    else:
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            missing, unexpected, shapes = _mismatch(state, full)
            target, what = None, "model"
        else:
            enc = encoder.state_dict()
            for prefix in ("encoder.", "backbone."):
                if state and all(k.startswith(prefix) for k in state):
                    state = {k[len(prefix):]: v for k, v in state.items()}
            state = {k: v for k, v in state.items() if k in enc or not k.startswith(HEAD_PREFIXES)}
            missing, unexpected, shapes = _mismatch(state, enc)
            target, what = encoder, "encoder"
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {'; '.join(shapes[:2])})")
        raise CheckpointError(f"weights do not fit the {what} of {type(model).__name__}", path=path,
                              expected=f"the {len(full if what == 'model' else enc)} parameter names and shapes "
                                       f"of the {what}", found="; ".join(parts),
                              fix="use weights saved from the same architecture and model.backbone "
                                  "(whole model, or its encoder)")
    own = target.state_dict()
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return what
