"""nnU-Net v2 models in medseg: read a results folder safely and build its network.

A results folder (``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``) holds ``dataset.json``,
``plans.json`` and one folder per fold with ``checkpoint_final.pth``. :func:`import_nnunet` turns it into a
medseg model file: the folds become ensemble members (their logits averaged, as nnU-Net does), the plans'
preprocessing becomes ``preprocess.nnunet`` (:mod:`medseg.preprocessing.nnunet`), the mirror axes the trainer
allowed become TTA over every combination of them, and the windows are placed as nnU-Net places them. The
network is built by ``dynamic-network-architectures``, the package nnU-Net builds it with.

Loading is safe: checkpoints are read with ``torch.load(weights_only=True)``, so no pickled code runs, and
the network class and the layer types the plans name are taken from a fixed list, never imported by name.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch

from medseg.core.errors import CheckpointError, ConfigError, InputNotFoundError
from medseg.models.imported_nets import build_nnunet as build_network

# ---------------------------------------------------------------------------
# reading a results folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputNotFoundError(f"{path.name} not found in the nnU-Net results folder", path=path,
                                 expected="dataset.json, plans.json and fold_*/ as nnU-Net writes them",
                                 fix="give the folder TRAINER__PLANS__CONFIGURATION under nnUNet_results/DatasetXXX_Name")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not valid JSON", path=path, found=str(exc)[:160],
                              fix="restore the file nnU-Net wrote") from None


def find_results_dir(path: str | Path, configuration: str | None) -> Path:
    """The results folder itself, or the one folder of ``configuration`` inside a dataset folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError("nnU-Net results folder not found", path=path,
                                 expected="nnUNet_results/DatasetXXX_Name[/TRAINER__PLANS__CONFIGURATION]",
                                 fix="check the path")
    if (path / "plans.json").is_file():
        return path
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "plans.json").is_file()
                   and (configuration is None or p.name.endswith(f"__{configuration}")))
    if len(found) != 1:
        raise InputNotFoundError("cannot tell which nnU-Net model to import", path=path,
                                 expected="one TRAINER__PLANS__CONFIGURATION folder with plans.json",
                                 found=", ".join(p.name for p in found) or "none",
                                 fix="give that folder itself, or --configuration to choose")
    return found[0]


def load_nnunet_checkpoint(path: Path) -> dict:
    """A fold checkpoint's plain contents (weights, trainer name, mirror axes), read without running pickled code."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unsafe or broken files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError("cannot read nnU-Net checkpoint safely", path=path,
                              expected="tensors and plain data (torch.load weights_only)", found=first,
                              fix="use the checkpoint_final.pth nnU-Net wrote; files holding code are refused") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("network_weights"), dict):
        raise CheckpointError("not an nnU-Net checkpoint", path=path, expected="a dict with network_weights",
                              found=str(sorted(ck)[:6]) if isinstance(ck, dict) else type(ck).__name__,
                              fix="use fold_N/checkpoint_final.pth of an nnU-Net v2 results folder")
    return ck


def _numpy_scalar_globals() -> list:
    """What a checkpoint nnU-Net wrote needs beyond torch's default safe list: numpy scalars and their dtypes (its
    training log and ``_best_ema`` hold numpy floats). Data types only; nothing that runs code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [core.multiarray.scalar, np.dtype, *dtypes]


def _channel_names(dataset: dict) -> list[str]:
    raw = dataset.get("channel_names") or dataset.get("modality") or {"0": "image"}
    names, seen = [], set()
    for key in sorted(raw, key=lambda k: int(k)):
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(raw[key])).strip("_") or f"channel{key}"
        if not name[0].isalnum():
            name = f"c{name}"
        while name in seen:
            name = f"{name}_{key}"
        seen.add(name)
        names.append(name)
    return names


def _labels_and_regions(dataset: dict, path: Path) -> tuple[dict[int, str], list[dict]]:
    """medseg labels and regions from dataset.json's ``labels`` (and ``regions_class_order``)."""
    labels = dataset.get("labels") or {}
    plain = {k: v for k, v in labels.items() if not isinstance(v, (list, tuple))}
    regions = {k: list(v) for k, v in labels.items() if isinstance(v, (list, tuple)) and k != "ignore"}
    if "ignore" in labels:
        plain.pop("ignore", None)
    if not regions:
        out = {int(v): str(k) for k, v in plain.items()}
        if 0 not in out:
            raise CheckpointError("dataset.json has no background label", path=path, expected='"background": 0',
                                  found=str(labels)[:160], fix="restore the dataset.json nnU-Net trained with")
        return dict(sorted(out.items())), []
    order = dataset.get("regions_class_order")
    names = [k for k in labels if k in regions]
    if not order or len(order) != len(names):
        raise CheckpointError("dataset.json regions need regions_class_order", path=path,
                              expected=f"{len(names)} label values", found=str(order),
                              fix="restore the dataset.json nnU-Net trained with")
    out = {0: "background"}
    region_cfg = []
    for name, value in zip(names, order):
        out[int(value)] = name
        members = [int(v) for v in regions[name]]
        region_cfg.append({"name": re.sub(r"[^A-Za-z0-9_]", "_", name), "labels": members, "value": int(value)})
    return dict(sorted(out.items())), region_cfg


def import_nnunet(results: str | Path, output: str | Path, *, configuration: str | None = None,
                  folds: list[int] | None = None, checkpoint: str = "checkpoint_final.pth",
                  orientation: str | None = None, name: str | None = None, modality: str | None = None) -> Path:
    """Write a medseg model file from an nnU-Net v2 results folder (see the module docstring).

    ``folds``: which ``fold_N`` to ensemble (default: every fold present, ``fold_all`` included).
    ``orientation``: reorient inputs first (e.g. ``RAS`` for a model trained on canonically oriented images);
    default none, as nnU-Net, which takes the voxel order as stored."""
    from medseg.core.config import from_dict, to_dict
    from medseg.models.checkpoint import write_model_file

    folder = find_results_dir(results, configuration)
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    conf_name = configuration or folder.name.rsplit("__", 1)[-1]
    configs = plans.get("configurations") or {}
    if conf_name not in configs:
        raise ConfigError(f"the plans have no configuration {conf_name}", path=folder / "plans.json",
                          expected=" | ".join(configs), found=conf_name, fix="choose one with --configuration")
    conf = _resolve_configuration(configs, conf_name)
    if conf.get("previous_stage") or "cascade" in conf_name:
        raise ConfigError("cascade configurations are not supported", path=folder, found=conf_name,
                          expected="3d_fullres or 3d_lowres", fix="import the 3d_fullres model")
    if len(conf["patch_size"]) != 3:
        raise ConfigError("2D nnU-Net configurations are not supported yet", path=folder, found=conf_name,
                          expected="a 3D configuration (3d_fullres, 3d_lowres)", fix="import the 3d_fullres model")
    fold_dirs = _fold_dirs(folder, folds, checkpoint)
    cks = [load_nnunet_checkpoint(d / checkpoint) for d in fold_dirs]
    labels, regions = _labels_and_regions(dataset, folder / "dataset.json")
    channels = _channel_names(dataset)
    norms = list(conf["normalization_schemes"])
    if len(norms) != len(channels):
        raise CheckpointError("plans and dataset.json disagree on the number of input channels", path=folder,
                              expected=f"{len(channels)} normalisation schemes", found=str(norms),
                              fix="restore the files nnU-Net wrote")
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    mirror = cks[0].get("inference_allowed_mirroring_axes")
    mirror = [int(a) for a in mirror] if mirror else []
    arch = conf.get("architecture")
    if not arch:
        raise ConfigError("plans from nnU-Net before v2.4 are not supported", path=folder / "plans.json",
                          expected="configurations.*.architecture", found="UNet_class_name (old format)",
                          fix="import a model trained with nnU-Net 2.4 or newer")
    trainer = cks[0].get("trainer_name") or folder.name.split("__")[0]
    config = {
        "name": name or f"{dataset.get('name') or Path(folder).parent.name}_{conf_name}",
        "labels": labels,
        "modality": modality or ("CT" if "CTNormalization" in norms else "MR"),
        "data": {"channels": [{"name": c} for c in channels] if len(channels) > 1 else [],
                 "val_fraction": 0.0},
        "preprocess": {
            "orientation": orientation,
            "spacing": None,
            "intensity": {"mode": "none"},
            "nnunet": {
                "configuration": conf_name,
                "transpose": [int(a) for a in plans["transpose_forward"]],
                "spacing": [float(s) for s in conf["spacing"]],
                "normalization": norms,
                "mask_for_norm": [bool(b) for b in conf["use_mask_for_norm"]],
                "intensity_properties": [{k: float(v) for k, v in (props.get(str(c)) or {}).items()
                                          if k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
                                         for c in range(len(channels))],
                "data_resampling": _resampling(conf, "data", folder),
                "probabilities_resampling": _resampling(conf, "probabilities", folder),
            },
        },
        "patch": {"size": [int(s) for s in conf["patch_size"]]},
        "augment": {"enabled": bool(mirror), "flip_axes": mirror},
        "model": {"name": "nnunet", "arch": {
            "network_class_name": arch["network_class_name"], "arch_kwargs": copy.deepcopy(arch.get("arch_kwargs", {})),
            # nnU-Net's plans call the list "_kw_requires_import"
            "arch_kwargs_requires_import": list(arch.get("_kw_requires_import") or
                                                arch.get("arch_kwargs_requires_import") or [])}},
        "inference": {"overlap": 0.5, "blend": "gaussian", "tta": bool(mirror), "mirror": "combinations",
                      "average": "logits", "window_steps": "nnunet", "sw_batch_size": 1},
        "regions": regions,
    }
    cfg = from_dict(config, source=str(folder))
    net = build_network(cfg.model, cfg.in_channels, cfg.out_channels)
    states = []
    for d, ck in zip(fold_dirs, cks):
        state = {k.removeprefix("_orig_mod."): v for k, v in ck["network_weights"].items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError("fold weights do not fit the network the plans describe", path=d / checkpoint,
                                  expected=f"weights of {arch['network_class_name']}",
                                  found=(str(exc).strip().splitlines() or [""])[0][:160],
                                  fix="import the results folder the checkpoint was trained in") from None
        states.append(state)
    source = {"kind": "nnunet", "folder": folder.name, "trainer": trainer, "configuration": conf_name,
              "folds": [d.name for d in fold_dirs], "checkpoint": checkpoint}
    return write_model_file(output, to_dict(cfg), labels, states, source=source)


def _resolve_configuration(configs: dict, name: str) -> dict:
    """A configuration with the ``inherits_from`` chain of nnU-Net's plans merged in."""
    conf = dict(configs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configs:
            break
        seen.add(parent)
        conf = {**configs[parent], **conf}
    return conf


def _resampling(conf: dict, what: str, folder: Path) -> dict[str, Any]:
    fn = conf.get(f"resampling_fn_{what}")
    if fn != "resample_data_or_seg_to_shape":
        raise ConfigError(f"unsupported nnU-Net resampling function for {what}", path=folder / "plans.json",
                          expected="resample_data_or_seg_to_shape", found=repr(fn),
                          fix="import a model trained with nnU-Net's default resampling")
    kw = conf.get(f"resampling_fn_{what}_kwargs") or {}
    return {"order": int(kw.get("order", 3 if what == "data" else 1)), "order_z": int(kw.get("order_z", 0)),
            "force_separate_z": kw.get("force_separate_z")}


def _fold_dirs(folder: Path, folds: list[int] | None, checkpoint: str) -> list[Path]:
    if folds:
        dirs = [folder / f"fold_{f}" for f in folds]
        missing = [d for d in dirs if not (d / checkpoint).is_file()]
        if missing:
            raise InputNotFoundError(f"no {checkpoint} in {missing[0].name}", path=missing[0],
                                     expected=f"fold_N/{checkpoint}", fix="choose folds that finished training")
        return dirs
    # nnU-Net's predictor takes folds 0-4 by default; a model trained on all cases only has fold_all
    dirs = sorted((d for d in folder.glob("fold_*") if d.name[5:].isdigit() and (d / checkpoint).is_file()),
                  key=lambda d: int(d.name[5:])) or [d for d in [folder / "fold_all"] if (d / checkpoint).is_file()]
    if not dirs:
        raise InputNotFoundError(f"no fold has {checkpoint}", path=folder, expected=f"fold_N/{checkpoint}",
                                 fix="finish training a fold, or name another checkpoint (e.g. checkpoint_best.pth)")
    return dirs
