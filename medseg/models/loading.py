"""Model files in, resolved config and networks out: the one place a model reference is resolved.

A reference is a bundled model name (``hippocampus``), a medseg ``.pt`` checkpoint (one network or
a packed ensemble), or an exported ``.onnx``/``.ts`` file; each carries its resolved config.
:func:`load_model` reads the file once; :func:`model_config` answers "what is this model" (task,
labels, preprocessing) without building any network.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medseg.core.config import Config, from_dict
from medseg.core.errors import CheckpointError, InputNotFoundError, MedsegError, MissingDependencyError, UnknownModelError
from medseg.models.checkpoint import config_from_checkpoint, load_checkpoint, predict_models, predict_states
from medseg.models.registry import ModelSpec, build_model, get_spec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODELS = ASSETS / "models"
DEFAULT_MODEL = "hippocampus"


def bundled_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUNDLED_MODELS.glob("*.pt"), key=lambda p: p.stem)}


def user_models_dir() -> Path:
    """Where imported models are kept so that they are used by name: ``$MEDSEG_MODELS_DIR``, else
    ``~/.medseg/models``."""
    import os

    return Path(os.environ.get("MEDSEG_MODELS_DIR") or Path.home() / ".medseg" / "models")


def installed_models() -> dict[str, Path]:
    """The models in :func:`user_models_dir` (``NAME.pt``), by name."""
    folder = user_models_dir()
    return {p.stem: p for p in sorted(folder.glob("*.pt"), key=lambda p: p.stem)} if folder.is_dir() else {}


def known_models() -> dict[str, Path]:
    """Every model usable by name: the installed ones, then the bundled ones (a bundled name wins)."""
    return {**installed_models(), **bundled_models()}


def resolve_model(ref: str | Path | None) -> Path:
    """A model name (bundled, or installed in :func:`user_models_dir` by ``medseg import-model``) or a model file
    path -> the file's path."""
    if ref is None:
        ref = DEFAULT_MODEL
    path = Path(ref)
    if path.suffix == ".pt" or path.exists() or "/" in str(ref) or "\\" in str(ref):  # a path, also a Windows one
        if not path.is_file():
            raise InputNotFoundError("model file not found", path=path, expected="a medseg .pt checkpoint",
                                     fix="check the path, or use a bundled model name: " + ", ".join(bundled_models()))
        return path
    models = known_models()
    if str(ref) not in models:
        close = difflib.get_close_matches(str(ref), list(models), n=1)
        fix = f"did you mean '{close[0]}'?" if close else "models: " + (", ".join(models) or "none installed")
        raise UnknownModelError(f"unknown model '{ref}'", expected="a model name or a .pt file",
                                fix=fix + "; 'medseg models' lists them")
    return models[str(ref)]


def model_summaries() -> list[dict]:
    """Every model usable by name (bundled, then installed), as plain data: ``name``, ``kind``
    (bundled/installed), ``path``, ``inputs`` (sequence names in order), ``reference``, ``sequences`` (several),
    ``outputs`` (label or region names), ``regions``, ``modality``, ``source`` (nnunet, monai-bundle, medseg),
    ``size_mb``. A file that cannot be read is listed with its ``error``."""
    out = []
    for kind, models in (("bundled", bundled_models()), ("installed", installed_models())):
        for name, path in models.items():
            if kind == "installed" and name in bundled_models():
                continue
            item = {"name": name, "kind": kind, "path": str(path), "default": name == DEFAULT_MODEL,
                    "size_mb": round(path.stat().st_size / 1e6, 2)}
            try:
                payload, _ = read_model_payload(path)
                cfg = config_from_checkpoint(payload, source=str(path))
            except MedsegError as exc:
                out.append({**item, "error": str(exc)})
                continue
            item.update({"inputs": cfg.channel_names, "reference": cfg.reference_channel,
                         "sequences": bool(cfg.data.channels),
                         "outputs": [r.name for r in cfg.regions] or [v for k, v in cfg.labels.items() if k],
                         "regions": bool(cfg.regions), "modality": cfg.modality, "task": cfg.task,
                         "source": (payload.get("source") or {}).get("kind", "medseg")})
            out.append(item)
    return out


EXPORT_SUFFIXES = {".onnx": "onnxruntime", ".ts": "torchscript", ".torchscript": "torchscript"}


META_KEY = "medseg"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed", expected="the onnxruntime package",
                                     fix="pip install 'medseg[onnx]' (or pip install onnxruntime)") from None
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def is_exported(path: str | Path) -> bool:
    return Path(path).suffix.lower() in EXPORT_SUFFIXES


def read_export_metadata(path: str | Path) -> dict:
    """The medseg payload stored in an exported file: ``{"config": …, "groups": …, …}``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".onnx":
            try:
                import onnx
            except ImportError:
                ort = import_onnxruntime()
                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                raw = sess.get_modelmeta().custom_metadata_map.get(META_KEY)
            else:
                model = onnx.load(str(path), load_external_data=False)
                raw = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
        else:
            extra = {f"{META_KEY}.json": ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            raw = extra[f"{META_KEY}.json"] or None
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - foreign or damaged files
        raise CheckpointError("cannot read exported model", path=path, expected="a file written by 'medseg export'",
                              found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                              fix="export the model again with 'medseg export'") from None
    if not raw:
        raise CheckpointError("exported model carries no medseg config", path=path,
                              expected="a file written by 'medseg export'", found="no 'medseg' metadata",
                              fix="export it with 'medseg export MODEL --format onnx|torchscript'")
    payload = json.loads(raw)
    if "config" not in payload:
        raise CheckpointError("exported model metadata has no config", path=path, fix="export the model again")
    return payload



def read_model_payload(path: Path) -> tuple[dict, bool]:
    """``(payload, exported)``: a checkpoint's payload, or an exported file's metadata shaped like one
    (``config`` plus the checkpoint's ``epoch``/``best_metric``/``val_dice``), with no weights."""
    if is_exported(path):
        meta = read_export_metadata(path)
        return {"config": meta["config"], **meta.get("meta", {})}, True
    return load_checkpoint(path), False


def model_config(ref: str | Path | None) -> Config:
    """The resolved config of a model (bundled name, .pt, .onnx or .ts) without building the network."""
    path = resolve_model(ref)
    payload, _ = read_model_payload(path)
    return config_from_checkpoint(payload, source=str(path))


@dataclass
class LoadedModel:
    """A model file read once: its path, resolved config, networks (none for exported files) and metadata."""

    path: Path
    cfg: Config
    payload: dict
    exported: bool
    nets: list[torch.nn.Module] = field(default_factory=list)

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.cfg.model.name)

    @property
    def meta(self) -> dict:
        return {k: self.payload.get(k) for k in ("epoch", "best_metric", "val_dice")}

    @property
    def in_channels(self) -> int:
        return self.cfg.in_channels


def load_model(ref: "str | Path | LoadedModel | None") -> LoadedModel:
    """Read a model reference once and build its networks (every member of a packed ensemble, each
    with its own model config; their probabilities are averaged at prediction), on the CPU, in eval mode."""
    if isinstance(ref, LoadedModel):
        return ref
    path = resolve_model(ref)
    payload, exported = read_model_payload(path)
    cfg = config_from_checkpoint(payload, source=str(path))
    loaded = LoadedModel(path, cfg, payload, exported)
    if not exported:
        loaded.nets = [_member(loaded, state, model_cfg).eval()
                       for state, model_cfg in zip(predict_states(payload), predict_models(payload))]
    return loaded


def _member(loaded: LoadedModel, state: dict, model_cfg: dict) -> torch.nn.Module:
    cfg, payload = loaded.cfg, loaded.payload
    model = cfg.model if model_cfg == payload["config"]["model"] else \
        from_dict({**payload["config"], "model": model_cfg}, source=str(loaded.path)).model
    net = build_model(model, loaded.in_channels, cfg.out_channels)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError("model weights do not fit the network the file describes", path=loaded.path,
                              expected=f"weights of a {model.name} with channels {model.channels}",
                              found=(str(exc).strip().splitlines() or [""])[0][:160],
                              fix="the file is damaged or was altered; pack it again with 'medseg pack-model'") from None
    return net
