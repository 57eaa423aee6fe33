"""``medseg export``: a model as ONNX or TorchScript that predicts on its own.

The exported file holds the network (every member of a packed ensemble, their logits
concatenated along channels) and, as metadata, the resolved config: labels, colours,
preprocessing, window size, postprocessing. ``medseg predict --model FILE.onnx`` needs
nothing else. ONNX files keep the batch and spatial axes dynamic; the metadata is in the
model's ``metadata_props`` under the key ``medseg`` (JSON). TorchScript files keep it in the
archive's extra file ``medseg.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch

from medseg.core.errors import ConfigError, OutputError
from medseg.inference.backends import Ensemble
from medseg.models.loading import META_KEY
from medseg.io.volume import atomic_write

FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}


def _payload(loaded, fmt: str) -> dict:
    from medseg.core.config import to_dict

    return {"format": f"medseg-{fmt}", "version": 1, "config": to_dict(loaded.cfg),
            "groups": 1 if loaded.cfg.inference.average == "logits" else len(loaded.nets),
            "source": loaded.path.name,
            "source_sha256": hashlib.sha256(loaded.path.read_bytes()).hexdigest(),
            "meta": {k: v for k, v in loaded.meta.items() if isinstance(v, (int, float, str, type(None)))}}


def export_model(model: str | Path | None, output: str | Path, fmt: str = "onnx", *, opset: int = 17) -> Path:
    """Export a checkpoint (or bundled model name) to ``output`` as ONNX or TorchScript."""
    from medseg.inference.engine import window_size
    from medseg.models.loading import load_model

    fmt = (fmt or "onnx").lower()
    if fmt not in FORMATS:
        raise ConfigError("unknown export format", expected=" or ".join(FORMATS), found=repr(fmt),
                          fix="use --format onnx or --format torchscript")
    output = Path(output)
    allowed = (".onnx",) if fmt == "onnx" else (".ts", ".torchscript")
    if output.suffix.lower() not in allowed:
        raise OutputError("exported file name has the wrong suffix", path=output,
                          expected=" or ".join(allowed), found=repr(output.suffix),
                          fix=f"name it e.g. model{FORMATS[fmt]}; predict picks the backend from the suffix")
    loaded = load_model(model)
    if loaded.exported:
        raise ConfigError("an exported model cannot be exported again", path=loaded.path,
                          expected="a .pt checkpoint or a bundled model name", found=loaded.path.suffix,
                          fix="export the .pt checkpoint it came from")
    module = Ensemble([n.float().eval() for n in loaded.nets], loaded.cfg.inference.average == "logits").eval()
    roi = window_size(loaded.cfg, loaded.cfg.inference.roi_size or loaded.cfg.patch.size, loaded.spec.dims)
    example = torch.randn(2, loaded.in_channels, *roi)
    payload = json.dumps(_payload(loaded, fmt), sort_keys=True)
    if fmt == "onnx":
        return atomic_write(output, lambda tmp: _write_onnx(module, example, tmp, payload, opset))
    return atomic_write(output, lambda tmp: _write_torchscript(module, example, tmp, payload))


def _write_onnx(module, example, tmp, payload: str, opset: int) -> None:
    import onnx

    buf = io.BytesIO()
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter keeps every spatial axis dynamic
            torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes}, opset_version=opset)
        except Exception:  # noqa: BLE001 - newer torch without it: the dynamo exporter, dynamic batch
            buf = io.BytesIO()
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)
            prog.save(buf)
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, payload
    model.producer_name = "medseg"
    onnx.checker.check_model(model)
    Path(tmp).write_bytes(model.SerializeToString())


def _write_torchscript(module, example, tmp, payload: str) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(tmp), _extra_files={f"{META_KEY}.json": payload})


def cache_dir() -> Path:
    """Where on-the-fly exports are kept: ``$MEDSEG_CACHE_DIR``, else ``~/.cache/medseg``."""
    import os

    root = os.environ.get("MEDSEG_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medseg"


def cached_export(model_path: str | Path, fmt: str) -> Path:
    """Export a ``.pt`` checkpoint once (keyed by its SHA-256) for ``--backend onnxruntime|torchscript``."""
    import tempfile

    model_path = Path(model_path)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:20]
    name = f"{model_path.stem}-{digest}-torch{torch.__version__.split('+')[0]}{FORMATS[fmt]}"
    for folder in (cache_dir() / "exports", Path(tempfile.gettempdir()) / "medseg-exports"):
        target = folder / name
        if target.is_file():
            return target
        try:
            return export_model(model_path, target, fmt)
        except OutputError:
            continue  # cache folder not writable: try the next one
    raise OutputError("no writable folder for the exported model", path=cache_dir(),
                      fix="set MEDSEG_CACHE_DIR to a writable folder, or export with 'medseg export' and pass the file")
