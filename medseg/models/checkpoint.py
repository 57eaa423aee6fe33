"""Checkpoints: weights plus the resolved config, written atomically and loaded safely.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so loading never runs pickled code.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg.core.config import Config, from_dict, to_dict
from medseg.core.errors import CheckpointError, ConfigError, InputNotFoundError
from medseg.io.volume import atomic_write

FORMAT = "medseg-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "state_dict")


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BatchNorm counters)
    return h.hexdigest()


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, cfg: Config, epoch: int,
                    best_metric: float | None = None, half: bool = False, **extra: Any) -> Path:
    state = host_state(model.state_dict())
    if half:
        state = _half(state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(cfg),
        "labels": dict(cfg.labels),
        "epoch": int(epoch),
        "best_metric": None if best_metric is None else float(best_metric),
        "state_dict": state,
        "sha256": state_digest(state),
        **extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint; refuses pickled code, foreign files and tampered weights."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("model file not found", path=path, expected="a medseg .pt checkpoint",
                                 fix="check the path or use a bundled model name (see 'medseg models')")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below says it in one line
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError("cannot load model file safely", path=path,
                              expected="a medseg checkpoint (tensors and plain data only)", found=first,
                              fix="use a checkpoint written by 'medseg train'; files holding code are refused") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or any(k not in payload for k in REQUIRED):
        found = sorted(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError("not a medseg checkpoint", path=path,
                              expected=f"a dict with {', '.join(REQUIRED)}", found=str(found),
                              fix="use a checkpoint written by 'medseg train'")
    _check_schema(payload, path)
    if int(payload["version"]) > VERSION:
        raise CheckpointError("checkpoint is from a newer medseg", path=path, expected=f"version <= {VERSION}",
                              found=str(payload["version"]), fix="upgrade medseg")
    digest = payload.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckpointError("model file carries no weights checksum", path=path,
                              expected="a 'sha256' entry written by medseg", found=type(digest).__name__,
                              fix="use a checkpoint written by 'medseg train' or 'medseg pack-model'")
    if digest != state_digest(_digest_view(payload["state_dict"], payload.get("quant_scales"))):
        raise CheckpointError("model weights do not match their checksum", path=path,
                              expected=digest[:16] + "...", found="different weights",
                              fix="the file is damaged or was altered; restore it from the original")
    members = payload.get("ensemble", [])
    sums = payload.get("ensemble_sha256", [])
    scales = payload.get("ensemble_quant_scales") or [None] * len(members)
    if members and (not isinstance(members, list) or len(sums) != len(members) or len(scales) != len(members)
                    or any(d != state_digest(_digest_view(m, q)) for d, m, q in zip(sums, members, scales))):
        raise CheckpointError("ensemble weights do not match their checksums", path=path,
                              expected=f"{len(members)} checksummed fold models", found="different weights",
                              fix="the file is damaged or was altered; restore it from the original")
    return payload


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _check_schema(payload: dict, path: Path) -> None:
    """The types of every entry medseg relies on, so a foreign or hand-made file fails here, clearly."""
    problems = []
    if not isinstance(payload.get("version"), int):
        problems.append("version is not an integer")
    config = payload.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config.get("labels"), dict):
        problems.append("config is not a dict with 'model' and 'labels'")
    if not _is_state_dict(payload.get("state_dict")):
        problems.append("state_dict is not a dict of named tensors")
    members = payload.get("ensemble")
    if members is not None and (not isinstance(members, list) or not all(_is_state_dict(m) for m in members)):
        problems.append("ensemble is not a list of state dicts")
    if "ensemble_sha256" in payload and not (isinstance(payload["ensemble_sha256"], list)
                                             and all(isinstance(d, str) for d in payload["ensemble_sha256"])):
        problems.append("ensemble_sha256 is not a list of strings")
    models = payload.get("ensemble_models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, dict) for m in models)
                                   and isinstance(members, list) and len(models) == len(members)):
        problems.append("ensemble_models is not one model config per ensemble member")
    states = [payload.get("state_dict"), *(members if isinstance(members, list) else [])]
    member_scales = payload.get("ensemble_quant_scales") or []
    if not isinstance(member_scales, list):
        problems.append("ensemble_quant_scales is not a list")
        member_scales = []
    for state, scales in zip(states, [payload.get("quant_scales"), *member_scales, *[None] * len(states)]):
        if not _is_state_dict(state):
            continue
        quantised = {k for k, v in state.items() if v.dtype == torch.int8}
        if quantised and not (_is_state_dict(scales) and quantised <= set(scales)
                              and all(scales[k].numel() == state[k].shape[0] for k in quantised)):
            problems.append("int8 weights without one scale per output channel")
            break
    if "labels" in payload and not isinstance(payload["labels"], dict):
        problems.append("labels is not a dict")
    if problems:
        raise CheckpointError("model file does not have the medseg checkpoint layout", path=path,
                              expected="format, version, config, state_dict and sha256 as medseg writes them",
                              found="; ".join(problems), fix="use a checkpoint written by 'medseg train'")


def config_from_checkpoint(payload: dict, source: str = "checkpoint") -> Config:
    return from_dict(payload["config"], source=source)


def _shared_map(state: dict, fn) -> dict:
    """``{k: fn(k, v)}``, calling ``fn`` once per distinct tensor: keys that alias one tensor (MONAI's DynUNet
    registers its blocks twice, once under ``skip_layers``) keep sharing it, so ``torch.save`` stores it once."""
    done, out = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in done:
            done[key] = fn(k, v)
        out[k] = done[key]
    return out


def host_state(state: dict) -> dict:
    """A state dict copied to the host with equal tensors shared, so ``torch.save`` stores each once.
    Copying a GPU model's weights makes a separate copy of every alias (DynUNet's blocks), which doubled
    GPU-trained checkpoints and the files packed from them; matching by content keeps them shared. Two
    parameters that merely hold equal values share one stored tensor too, which loads the same."""
    done, out = {}, {}
    for k, v in state.items():
        host = v.detach().cpu()
        digest = hashlib.sha1(host.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out[k] = done.setdefault((host.dtype, tuple(host.shape), digest), host)
    return out


def _half(state: dict) -> dict:
    return _shared_map(state, lambda k, v: v.half() if v.is_floating_point() else v)


def _holdout_names(config: dict) -> list[str]:
    """The cases ``data.test_fraction`` set aside, when the training data can still be found."""
    from medseg.preprocessing.datasets import holdout_cases
    from medseg.core.errors import MedsegError

    try:
        return [c.name for c in holdout_cases(from_dict(config).data)]
    except MedsegError:
        return []


def _digest_view(state: dict, scales: dict | None) -> dict:
    """What a checksum covers: the stored tensors and, for int8 weights, their scales."""
    return state if not scales else {**state, **{f"{k}#scale": v for k, v in scales.items()}}


def quantize_int8(state: dict) -> tuple[dict, dict]:
    """Symmetric int8 per output channel for convolution and linear weights (tensors of two or more
    dimensions); everything else stays float16. Returns the stored state and the float32 scales."""
    def store(k, v):
        if v.is_floating_point() and v.dim() >= 2 and v.numel() >= 64:
            w = v.detach().float()
            scale = w.abs().reshape(w.shape[0], -1).amax(dim=1) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8), scale
        return (v.half() if v.is_floating_point() else v), None

    pairs = _shared_map(state, store)
    return {k: q for k, (q, _) in pairs.items()}, {k: sc for k, (_, sc) in pairs.items() if sc is not None}


def float_state(state: dict, scales: dict | None = None) -> dict:
    """Float32 weights from a stored state dict (float16, float32, or int8 with per-channel scales)."""
    scales = scales or {}

    def restore(k, v):
        if v.dtype == torch.int8:
            return v.float() * scales[k].float().view(-1, *[1] * (v.dim() - 1))
        return v.float() if v.is_floating_point() else v

    return _shared_map(state, restore)


def predict_states(payload: dict) -> list[dict]:
    """The weights to predict with: the EMA weights a ``last.pt`` carries when training kept an average
    (what validation scored and ``best.pt`` holds), else :func:`member_states`."""
    if "ema_state_dict" in payload:
        return [float_state(payload["ema_state_dict"])]
    return member_states(payload)


def predict_models(payload: dict) -> list[dict]:
    """The model config (``config['model']`` as a dict) of each state dict :func:`predict_states` returns."""
    if "ema_state_dict" in payload:
        return [payload["config"]["model"]]
    return member_models(payload)


def member_models(payload: dict) -> list[dict]:
    """The model config of each member of :func:`member_states`: a packed ensemble of different networks
    (``ensemble_models``) gives each member its own; otherwise every member is ``config['model']``."""
    first = payload["config"]["model"]
    return [first, *(payload.get("ensemble_models") or [first] * len(payload.get("ensemble", [])))]


# what every member of an ensemble must share: they see the same preprocessed windows, predict the same
# labels, and test-time augmentation mirrors them all along the same axes
ENSEMBLE_SHARED = (("labels",), ("task",), ("modality",), ("preprocess",), ("patch", "size"),
                   ("inference", "roi_size"), ("augment", "enabled"), ("augment", "flip_axes"))


def _ensemble_mismatch(a: dict, b: dict) -> tuple[str, Any, Any] | None:
    """The first setting of :data:`ENSEMBLE_SHARED` (or the model's dimensionality) two configs differ in."""
    from medseg.models.registry import get_spec

    def get(cfg: dict, keys: tuple) -> Any:
        for k in keys:
            cfg = cfg.get(k) if isinstance(cfg, dict) else None
        return cfg

    for keys in ENSEMBLE_SHARED:
        if get(a, keys) != get(b, keys):
            return ".".join(keys), get(a, keys), get(b, keys)
    dims = [get_spec(c["model"]["name"]).dims for c in (a, b)]
    if dims[0] != dims[1]:
        return "model dimensions", f"{dims[0]}D", f"{dims[1]}D"
    return None


def member_states(payload: dict) -> list[dict]:
    """Float32 state dicts of a checkpoint: one, or one per member of a packed ensemble."""
    members = [payload["state_dict"], *payload.get("ensemble", [])]
    scales = [payload.get("quant_scales"), *(payload.get("ensemble_quant_scales") or [None] * (len(members) - 1))]
    return [float_state(m, q) for m, q in zip(members, scales)]


def pack(checkpoint: str | Path | list, output: str | Path, *, postprocess: dict | None = None,
         int8: bool = False, inference: list[str] | None = None) -> Path:
    """Compact predict-only copy of a checkpoint: float16 weights, config, labels, metrics.

    Given several checkpoints (the folds of ``medseg train --folds``, or networks of different
    widths or depths trained on the same preprocessing and labels), writes one ensemble file whose
    predictions average the members' probabilities; members whose network differs from the first
    carry their own model config (``ensemble_models``).
    ``postprocess`` replaces ``inference.postprocess`` in the packed config. ``int8`` stores
    convolution weights as int8 with a float scale per output channel (half the size again).
    ``inference``: ``inference.KEY=VALUE`` overrides of the packed config's prediction settings
    (window overlap, blending, window batch, postprocessing); the weights are not affected.
    """
    paths = [Path(p) for p in checkpoint] if isinstance(checkpoint, (list, tuple)) else [Path(checkpoint)]
    if not paths:
        raise InputNotFoundError("nothing to pack", expected="at least one checkpoint",
                                 fix="pass best.pt files written by 'medseg train'")
    cks = [load_checkpoint(p) for p in paths]
    first = cks[0]
    for p, ck in zip(paths[1:], cks[1:]):
        mismatch = _ensemble_mismatch(first["config"], ck["config"])
        if mismatch:
            key, want, got = mismatch
            raise CheckpointError(f"cannot ensemble models that differ in {key}", path=p,
                                  expected=f"{key}: {want} (as in {paths[0].name})", found=f"{key}: {got}",
                                  fix="ensemble models trained with the same labels, preprocessing, patch size "
                                      "and mirror axes (the network itself may differ)")
    config = copy.deepcopy(first["config"])  # the overrides below change nested sections in place
    if postprocess is not None:
        config["inference"] = {**config.get("inference", {}), "postprocess": postprocess}
    if inference:
        from medseg.core.config import apply_overrides

        bad = [o for o in inference if not o.startswith("inference.")]
        if bad:
            raise ConfigError("pack-model --set changes prediction settings only", path=paths[0],
                              expected="inference.KEY=VALUE", found=", ".join(bad),
                              fix="e.g. --set inference.overlap=0.25; retrain to change anything else")
        config = apply_overrides(config, inference)
        from_dict(config, source=f"{paths[0]} with --set")  # validates the new values
    store = quantize_int8 if int8 else (lambda st: (_half(st), None))
    stored = [store(st) for ck in cks for st in predict_states(ck)]  # packed ensembles contribute all members
    models = [m for ck in cks for m in predict_models(ck)]
    state, scales = stored[0]
    keep = {k: first[k] for k in ("epoch", "best_metric", "best_epoch", "val_dice", "split") if k in first}
    if len(cks) > 1:  # an ensemble has seen every case any member trained or chose its epoch on
        seen = {n for ck in cks for part in ("train", "validation") for n in (ck.get("split") or {}).get(part, [])}
        keep["split"] = {"train": sorted(seen), "validation": [],
                         "test": (first.get("split") or {}).get("test") or _holdout_names(config)}
    payload = {"format": FORMAT, "version": VERSION, "config": config, "labels": first.get("labels", {}),
               "state_dict": state, "sha256": state_digest(_digest_view(state, scales)), **keep}
    if scales:
        payload["quant_scales"] = scales
    if len(stored) > 1:
        payload["ensemble"] = [m for m, _ in stored[1:]]
        payload["ensemble_sha256"] = [state_digest(_digest_view(m, q)) for m, q in stored[1:]]
        if int8:
            payload["ensemble_quant_scales"] = [q for _, q in stored[1:]]
        if any(m != models[0] for m in models[1:]):
            payload["ensemble_models"] = copy.deepcopy(models[1:])
    if len(cks) > 1:
        payload["folds"] = [{"best_metric": ck.get("best_metric"), "val_dice": ck.get("val_dice")} for ck in cks]
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(output, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def write_model_file(output: str | Path, config: dict, labels: dict, states: list[dict], **extra: Any) -> Path:
    """A predict-only model file from a resolved config (plain data) and one state dict per ensemble member,
    stored as float16 with checksums (what the importers of other tools' models write)."""
    stored = [_half({k: v.detach().cpu() for k, v in st.items()}) for st in states]
    payload = {"format": FORMAT, "version": VERSION, "config": config, "labels": dict(labels),
               "state_dict": stored[0], "sha256": state_digest(stored[0]), **extra}
    if len(stored) > 1:
        payload["ensemble"] = stored[1:]
        payload["ensemble_sha256"] = [state_digest(st) for st in stored[1:]]
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(output, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def pack_sources(paths: list[str | Path]) -> tuple[list[Path], dict | None]:
    """Expand 'medseg pack-model' sources: a ``train --folds`` folder becomes its folds' best.pt
    files plus the postprocessing chosen on cross-validation; files are taken as they are."""
    import json

    sources: list[Path] = []
    postprocess = None
    for p in map(Path, paths):
        if p.is_dir():
            folds = sorted(p.glob("fold_*/best.pt"), key=lambda q: int(q.parent.name.split("_")[1]))
            if not folds:
                raise InputNotFoundError("no fold checkpoints in folder", path=p,
                                         expected="fold_*/best.pt from 'medseg train --folds'",
                                         fix="pass checkpoint files, or the output folder of a cross-validation run")
            sources += folds
            if (p / "postprocess.json").is_file():
                postprocess = json.loads((p / "postprocess.json").read_text())
        else:
            sources.append(p)
    return sources, postprocess


def save_config(cfg: Config, path: str | Path) -> None:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
