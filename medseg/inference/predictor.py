"""Predict label volumes on the exact grid of the input."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.config import Config
from medseg.errors import InputNotFoundError, OutputError, UnknownModelError
from medseg.inference.engine import resolve_device, sliding_window_logits, to_source_grid
from medseg.io.volume import Volume, case_name, load_volume, save_volume, volume_suffix
from medseg.models.registry import build_model, get_spec
from medseg.training.checkpoint import config_from_checkpoint, load_checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODELS = ASSETS / "models"
DEFAULT_MODEL = "hippocampus"


def bundled_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUNDLED_MODELS.glob("*.pt"))}


def resolve_model(ref: str | Path | None) -> Path:
    """A bundled model name (``hippocampus``) or a checkpoint path -> checkpoint path."""
    if ref is None:
        ref = DEFAULT_MODEL
    path = Path(ref)
    if path.suffix == ".pt" or path.exists() or "/" in str(ref):
        if not path.is_file():
            raise InputNotFoundError("model file not found", path=path, expected="a medseg .pt checkpoint",
                                     fix="check the path, or use a bundled model name: " + ", ".join(bundled_models()))
        return path
    models = bundled_models()
    if str(ref) not in models:
        import difflib

        close = difflib.get_close_matches(str(ref), list(models), n=1)
        fix = f"did you mean '{close[0]}'?" if close else "bundled models: " + (", ".join(models) or "none installed")
        raise UnknownModelError(f"unknown model '{ref}'", expected="a bundled model name or a .pt file",
                                fix=fix + "; 'medseg models' lists them")
    return models[str(ref)]


@dataclass
class Prediction:
    labels: Volume
    seconds: float


class Predictor:
    """Load a checkpoint once, then segment volumes.

    >>> p = Predictor("hippocampus", device="cpu")
    >>> out = p.predict_volume(load_volume("case.nii.gz"))  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", *,
                 overlap: float | None = None, sw_batch_size: int | None = None, amp: bool = True) -> None:
        from medseg.transforms.pipeline import inference_transforms

        self.model_path = resolve_model(model)
        ck = load_checkpoint(self.model_path)
        self.cfg: Config = config_from_checkpoint(ck, source=str(self.model_path))
        if overlap is not None:
            self.cfg.inference.overlap = overlap
        if sw_batch_size is not None:
            self.cfg.inference.sw_batch_size = sw_batch_size
        self.device = resolve_device(device)
        self.amp = amp
        self.spec = get_spec(self.cfg.model.name)
        net = build_model(self.cfg.model, 1, self.cfg.num_classes)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
        self.net = net.to(self.device).eval()
        self.transforms = inference_transforms(self.cfg)
        self.meta = {k: ck.get(k) for k in ("epoch", "best_metric", "val_dice")}

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.cfg.labels)

    def probabilities(self, vol: Volume) -> torch.Tensor:
        """Class probabilities ``(C, X, Y, Z)`` on the source grid of ``vol``."""
        if not np.all(np.isfinite(vol.array)):
            from medseg.errors import UnsupportedInputError

            bad = int((~np.isfinite(vol.array)).sum())
            raise UnsupportedInputError("image contains NaN or Inf voxels", path=vol.source,
                                        expected="finite intensities", found=f"{bad} non-finite voxels",
                                        fix="repair or mask the image before segmenting it")
        item = self.transforms({"image": vol})
        image = item["image"]
        logits = sliding_window_logits(self.net, image, self.cfg, self.device, dims=self.spec.dims, amp=self.amp)
        probs = torch.softmax(logits[0], dim=0)
        return to_source_grid(probs, image.affine, vol.affine, vol.shape)

    def predict_volume(self, vol: Volume) -> Volume:
        """Integer label volume with exactly ``vol``'s shape and affine."""
        probs = self.probabilities(vol)
        dtype = np.uint8 if self.cfg.num_classes <= 256 else np.uint16
        labels = probs.argmax(0).numpy().astype(dtype)
        return vol.with_array(labels, kind="labels", label_names=self.labels)

    def predict_file(self, path: str | Path, out_path: str | Path) -> Prediction:
        t0 = time.perf_counter()
        vol = load_volume(path)
        labels = self.predict_volume(vol)
        save_volume(labels, out_path, reference=vol)
        return Prediction(labels, time.perf_counter() - t0)


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into volume files (sorted, hidden files skipped)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and volume_suffix(f))
            if not found:
                raise InputNotFoundError("no NIfTI or NRRD files in folder", path=p,
                                         expected="files ending in .nii.gz, .nii or .nrrd",
                                         fix="point at the files, or at a folder holding them")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputNotFoundError("input not found", path=p, expected="a NIfTI/NRRD file or a folder of them",
                                     fix="check the path")
    return files


def output_path(src: Path, outdir: Path) -> Path:
    """``OUTDIR/<case>.<same suffix>``; NRRD/MetaImage inputs keep their format."""
    suffix = volume_suffix(src) or ".nii.gz"
    if suffix in (".nhdr", ".mhd", ".seg.nrrd"):
        suffix = ".nrrd"
    return outdir / f"{case_name(src)}{suffix}"


def check_outputs(files: list[Path], outdir: Path) -> list[Path]:
    outs = [output_path(f, outdir) for f in files]
    seen: dict[Path, Path] = {}
    for src, out in zip(files, outs):
        if out.resolve() == src.resolve():
            raise OutputError("output path equals the input path", path=src,
                              fix="choose an output folder other than the input folder")
        if out in seen:
            raise OutputError("two inputs would write the same output", path=out,
                              found=f"{seen[out]} and {src}", fix="rename one input or predict them separately")
        seen[out] = src
    return outs


def predict(inputs: list[str | Path], outdir: str | Path, *, model: str | Path | None = None,
            device: str = "auto", progress: bool = True, overlap: float | None = None) -> list[tuple[Path, Path, float]]:
    """Segment every input and write ``OUTDIR/<case>`` label volumes; returns (input, output, seconds)."""
    from medseg.progress import progress_bar

    outdir = Path(outdir)
    files = collect_inputs(inputs)
    outs = check_outputs(files, outdir)
    predictor = Predictor(model, device=device, overlap=overlap)
    results = []
    with progress_bar("predict", total=len(files), enabled=progress) as advance:
        for src, dst in zip(files, outs):
            res = predictor.predict_file(src, dst)
            results.append((src, dst, res.seconds))
            advance(src.name)
    return results
