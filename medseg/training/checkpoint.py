"""Checkpoints: weights plus the resolved config, written atomically and loaded safely.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from medseg.config import Config, from_dict, to_dict
from medseg.errors import CheckpointError, InputNotFoundError
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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, cfg: Config, epoch: int,
                    best_metric: float | None = None, half: bool = False, **extra: Any) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
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
    if int(payload["version"]) > VERSION:
        raise CheckpointError("checkpoint is from a newer medseg", path=path, expected=f"version <= {VERSION}",
                              found=str(payload["version"]), fix="upgrade medseg")
    digest = payload.get("sha256")
    if digest is not None and digest != state_digest(payload["state_dict"]):
        raise CheckpointError("model weights do not match their checksum", path=path,
                              expected=digest[:16] + "...", found="different weights",
                              fix="the file is damaged or was altered; restore it from the original")
    return payload


def config_from_checkpoint(payload: dict, source: str = "checkpoint") -> Config:
    return from_dict(payload["config"], source=source)


def pack(checkpoint: str | Path, output: str | Path) -> Path:
    """Compact predict-only copy of a checkpoint: float16 weights, config, labels, metrics."""
    ck = load_checkpoint(checkpoint)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["state_dict"].items()}
    keep = {k: ck[k] for k in ("epoch", "best_metric", "best_epoch", "val_dice", "split") if k in ck}
    payload = {"format": FORMAT, "version": VERSION, "config": ck["config"], "labels": ck.get("labels", {}),
               "state_dict": state, "sha256": state_digest(state), **keep}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(output, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
