"""Predict index masks for PNG/JPEG images with a 2D image model, plus colour overlays.

For ``photo.jpg`` it writes ``OUTDIR/photo.png`` (an 8-bit palette PNG whose pixel values are
the class indices, at exactly the image's size) and ``OUTDIR/overlays/photo.png`` (the image
with the classes blended in their colours and a legend). Images are read with their EXIF
orientation applied, as annotation tools and viewers show them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.core.config import Config
from medseg.seg2d.images import IMAGE_SUFFIXES, read_image, to_tensor
from medseg.core.errors import InputNotFoundError, OutputError, UnsupportedInputError
from medseg.core.runtime import resolve_device
from medseg.models.loading import LoadedModel, load_model


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def image_inputs(inputs: list[str | Path]) -> list[Path]:
    """Image files, and the image files directly inside folders, in order."""
    files: list[Path] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            found = sorted(p for p in inp.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
            if not found:
                raise InputNotFoundError("no images in folder", path=inp, expected="PNG or JPEG files",
                                         fix="check the path")
            files += found
        elif inp.is_file():
            if not is_image_file(inp):
                raise UnsupportedInputError("not an image file", path=inp, expected=" ".join(IMAGE_SUFFIXES),
                                            fix="a 2D image model segments PNG/JPEG images")
            files.append(inp)
        else:
            raise InputNotFoundError("input not found", path=inp, fix="check the path")
    return files


class ImagePredictor:
    """Load a 2D image checkpoint once, then segment images of any size."""

    def __init__(self, model: "str | Path | LoadedModel", device: str = "auto", *, amp: bool = True) -> None:
        loaded = load_model(model)  # a LoadedModel is taken as it is: the file is read once
        self.model_path = loaded.path
        self.cfg: Config = loaded.cfg
        if self.cfg.task != "image2d":
            raise UnsupportedInputError("not a 2D image model", path=self.model_path,
                                        expected="a checkpoint trained with task: image2d",
                                        found=f"task: {self.cfg.task}", fix="segment volumes with it instead")
        self.device = resolve_device(device)
        self.amp = amp
        self.model = loaded.nets[0].to(self.device).eval()

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.cfg.labels)

    def probabilities(self, rgb: np.ndarray) -> torch.Tensor:
        from medseg.seg2d.train import logits_2d

        return logits_2d(self.model, to_tensor(rgb)[None], self.device, self.amp)[0].softmax(0)

    def predict_array(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 class indices, same size."""
        return self.probabilities(rgb).argmax(0).numpy().astype(np.uint8)


@dataclass
class ImageResult:
    input: Path
    outputs: list[Path]
    seconds: float


def predict_images(inputs: list[str | Path], outdir: str | Path, *, model: "str | Path | LoadedModel", device: str = "auto",
                   overlays: bool = True, alpha: float = 0.5, progress: bool = True) -> list[ImageResult]:
    """Segment every image; ``OUTDIR/<stem>.png`` index masks and ``OUTDIR/overlays/<stem>.png``."""
    from medseg.seg2d.overlay import class_colors, save_index_png, save_overlay
    from medseg.core.progress import progress_bar

    outdir = Path(outdir)
    files = image_inputs(inputs)
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise OutputError("two inputs would write the same output", path=outdir / f"{f.stem}.png",
                              found=f"{seen[f.stem]} and {f}", fix="rename one input or predict them separately")
        seen[f.stem] = f
        out = (outdir / f"{f.stem}.png").resolve()
        if out == f.resolve() or outdir.resolve() == f.parent.resolve():
            raise OutputError("output folder is an input folder", path=outdir,
                              fix="choose an output folder other than the input folder")
    predictor = ImagePredictor(model, device=device)
    colors = class_colors(predictor.labels, predictor.cfg.colors)
    results = []
    with progress_bar("predict", total=len(files), enabled=progress) as advance:
        for f in files:
            t0 = time.perf_counter()
            rgb = read_image(f)
            mask = predictor.predict_array(rgb)
            written = [save_index_png(mask, outdir / f"{f.stem}.png", colors)]
            if overlays:
                written.append(save_overlay(rgb, mask, outdir / "overlays" / f"{f.stem}.png", predictor.labels,
                                            predictor.cfg.colors, alpha=alpha))
            results.append(ImageResult(f, written, time.perf_counter() - t0))
            advance(f.name)
    return results
