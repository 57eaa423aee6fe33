"""MONAI bundles in medseg: a bundle's network, preprocessing and inferer become a medseg model file.

A bundle (``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``, ``models/model.pt``) describes its
inference in MONAI's config language. :func:`import_bundle` reads that config with MONAI's own parser
(:class:`monai.bundle.ConfigParser`, which resolves references, macros and expressions) and translates what
it finds into medseg's config:

=============================  ======================================================
bundle                         medseg
=============================  ======================================================
``network_def``                ``model.name: monai``, the class of ``monai.networks.nets`` and its arguments
``Orientationd``               ``preprocess.orientation``
``Spacingd`` (bilinear)        ``preprocess.spacing``
``ScaleIntensityRanged``       ``preprocess.intensity.mode: range`` (MONAI's own transform at prediction)
``NormalizeIntensityd``        ``preprocess.intensity.mode: zscore``
``SlidingWindowInferer``       ``inference.roi_size``, ``overlap``, ``blend``, ``sw_batch_size``
``Activationsd`` + argmax      softmax and argmax (what medseg does for a label model)
=============================  ======================================================

Loading, channel handling and typing steps (``LoadImaged``, ``EnsureChannelFirstd``, ``EnsureTyped``...) are
medseg's own. A step medseg cannot reproduce is refused by name, so an imported model never predicts with
preprocessing that silently differs from the bundle's. The model file holds plain data only: the bundle's
expressions run once, at import (as ``monai.bundle run`` would run them), never at prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medseg.core.errors import CheckpointError, ConfigError, InputNotFoundError
from medseg.models.imported_nets import build_monai as build_network

IGNORED = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped", "EnsureType",
           "ToTensord", "ToTensor", "AddChanneld", "AsChannelFirstd"}
"""Steps medseg does itself when it reads a volume."""

SUPPORTED = ("Orientationd", "Spacingd", "ScaleIntensityRanged", "NormalizeIntensityd", *sorted(IGNORED))


def _plain(value: Any, where: str) -> Any:
    """``value`` as YAML- and weights_only-safe plain data (tuples become lists), or a refusal."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise ConfigError(f"the bundle's {where} holds a value medseg cannot store", expected="numbers, strings, lists",
                      found=f"{type(value).__name__}", fix="write the value as plain data in the bundle's config")


def _find_config(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise InputNotFoundError("no inference config in the bundle", path=bundle / "configs",
                             expected="configs/inference.json (or .yaml)", fix="give the bundle's root folder")


def _labels(meta: dict, out_channels: int) -> dict[int, str]:
    try:
        defs = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = {int(k): str(v) for k, v in defs.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        labels = {}
    if sorted(labels) != list(range(out_channels)):
        labels = {0: "background", **{c: f"class{c}" for c in range(1, out_channels)}}
    return labels


def _weights(path: Path) -> dict:
    if not path.is_file():
        raise InputNotFoundError("no weights in the bundle", path=path, expected="models/model.pt (a state dict)",
                                 fix="give the bundle folder with its models/model.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError("cannot read the bundle's weights safely", path=path,
                              expected="a state dict (torch.load weights_only)", found=first,
                              fix="save the weights as a state dict; files holding code are refused") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # CheckpointSaver's {"model": state}
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the bundle's model.pt is not a state dict", path=path, expected="{name: tensor}",
                              found=type(obj).__name__, fix="save network.state_dict()")
    return obj


def import_bundle(bundle: str | Path, output: str | Path, *, name: str | None = None,
                  modality: str | None = None) -> Path:
    """Write a medseg model file from a MONAI bundle folder (see the module docstring)."""
    from monai.bundle import ConfigParser

    from medseg.core.config import from_dict, to_dict
    from medseg.models.checkpoint import write_model_file

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputNotFoundError("MONAI bundle folder not found", path=bundle,
                                 expected="a folder with configs/ and models/", fix="check the path")
    config_file = _find_config(bundle)
    parser = ConfigParser()
    meta_file = bundle / "configs" / "metadata.json"
    if meta_file.is_file():
        parser.read_meta(str(meta_file))
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle)
    meta = parser.get("_meta_", {}) or {}

    def component(key: str):
        try:
            comp = parser.get_parsed_content(key, instantiate=False)
            return comp.resolve_module_name().rsplit(".", 1)[-1], comp.resolve_args()
        except Exception as exc:  # noqa: BLE001 - MONAI raises several types for a bad config
            raise ConfigError(f"cannot read '{key}' of the bundle", path=config_file,
                              found=f"{type(exc).__name__}: {exc}"[:200], fix="check the bundle's config") from None

    if "network_def" not in parser:
        raise ConfigError("the bundle has no network_def", path=config_file, expected="a network_def entry",
                          fix="import a bundle whose inference config defines network_def")
    net_class, net_kwargs = component("network_def")
    net_kwargs = _plain(net_kwargs, "network_def")
    if int(net_kwargs.get("spatial_dims", 3)) != 3:
        raise ConfigError("2D bundles are not supported", path=config_file, found="spatial_dims 2",
                          expected="a 3D network", fix="import a 3D segmentation bundle")
    pre: dict[str, Any] = {"orientation": None, "spacing": None, "intensity": {"mode": "none"}}
    steps = parser.get("preprocessing#transforms") if "preprocessing#transforms" in parser else []
    for i in range(len(steps or [])):
        kind, args = component(f"preprocessing#transforms#{i}")
        if kind in IGNORED:
            continue
        if kind == "Orientationd":
            pre["orientation"] = str(args.get("axcodes"))
        elif kind == "Spacingd" and str(args.get("mode", "bilinear")).lower() == "bilinear":
            pre["spacing"] = [float(s) for s in _plain(args["pixdim"], "Spacingd")]
        elif kind == "ScaleIntensityRanged":
            pre["intensity"] = {"mode": "range", "scale_range": [float(args["a_min"]), float(args["a_max"]),
                                                                 float(args.get("b_min") or 0.0),
                                                                 float(args.get("b_max") or 0.0)],
                                "scale_clip": bool(args.get("clip", False))}
        elif kind == "NormalizeIntensityd" and args.get("subtrahend") is None and args.get("divisor") is None:
            pre["intensity"] = {"mode": "zscore", "nonzero": bool(args.get("nonzero", False))}
        else:
            raise ConfigError(f"preprocessing step {kind} cannot be reproduced by medseg", path=config_file,
                              expected=" | ".join(SUPPORTED), found=f"{kind} {_short(args)}",
                              fix="import a bundle whose inference preprocessing uses those steps")
    if "inferer" not in parser:
        raise ConfigError("the bundle has no inferer", path=config_file, expected="a SlidingWindowInferer",
                          fix="import a bundle whose inference config defines inferer")
    inf_class, inf = component("inferer")
    if inf_class != "SlidingWindowInferer":
        raise ConfigError(f"inferer {inf_class} is not supported", path=config_file, expected="SlidingWindowInferer",
                          found=inf_class, fix="import a bundle that predicts with a sliding window")
    roi = [int(r) for r in _plain(inf["roi_size"], "inferer")]
    out_channels = int(net_kwargs.get("out_channels", 2))
    in_channels = int(net_kwargs.get("in_channels", 1))
    if in_channels != 1:
        raise ConfigError("bundles of several input channels are not supported yet", path=config_file,
                          found=f"in_channels {in_channels}", expected="1", fix="import a single-image bundle")
    _check_postprocessing(parser, component, config_file)
    labels = _labels(meta, out_channels)
    config = {
        "name": name or str(meta.get("name") or bundle.name),
        "labels": labels,
        "modality": modality or ("CT" if pre["intensity"]["mode"] == "range" else "MR"),
        "preprocess": pre,
        "patch": {"size": roi},
        "augment": {"enabled": False, "flip_axes": []},
        "model": {"name": "monai", "arch": {"class": net_class, "kwargs": net_kwargs}},
        "inference": {"roi_size": roi, "overlap": float(inf.get("overlap", 0.25)),
                      "blend": str(inf.get("mode", "constant")), "sw_batch_size": int(inf.get("sw_batch_size", 1)),
                      "tta": False},
    }
    cfg = from_dict(config, source=str(config_file))
    net = build_network(cfg.model, 1, out_channels)
    state = _weights(bundle / "models" / "model.pt")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError("the bundle's weights do not fit its network_def", path=bundle / "models" / "model.pt",
                              expected=f"weights of {net_class}", found=(str(exc).splitlines() or [""])[0][:160],
                              fix="use the model.pt trained with this config") from None
    source = {"kind": "monai-bundle", "folder": bundle.name, "config": config_file.name,
              "version": str(meta.get("version", ""))}
    return write_model_file(output, to_dict(cfg), labels, [net.state_dict()], source=source)


def _short(args: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items() if k != "keys")
    return f"({text[:120]})"


def _check_postprocessing(parser, component, config_file: Path) -> None:
    """Softmax (or nothing) then argmax: what medseg does. Anything else would change the labels."""
    if "postprocessing#transforms" not in parser:
        return
    for i in range(len(parser.get("postprocessing#transforms") or [])):
        kind, args = component(f"postprocessing#transforms#{i}")
        if kind == "Activationsd" and (args.get("sigmoid") or args.get("other")):
            raise ConfigError("sigmoid outputs are not supported", path=config_file, found=f"{kind} {_short(args)}",
                              expected="softmax and argmax", fix="import a bundle with softmax outputs")
        if kind == "AsDiscreted" and (args.get("threshold") is not None and not args.get("argmax")):
            raise ConfigError("thresholded outputs are not supported", path=config_file,
                              found=f"{kind} {_short(args)}", expected="argmax", fix="import a softmax bundle")
        if kind in ("KeepLargestConnectedComponentd", "RemoveSmallObjectsd", "FillHolesd", "LabelFilterd"):
            raise ConfigError(f"postprocessing step {kind} is not supported yet", path=config_file,
                              found=f"{kind} {_short(args)}", expected="Activationsd, Invertd, AsDiscreted, SaveImaged",
                              fix="import a bundle without label postprocessing")
