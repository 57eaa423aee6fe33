"""Predict label volumes on the exact grid of the input."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.config import Config, check_overlap, from_dict
from medseg.errors import CheckpointError, ConfigError, InputNotFoundError, MedsegError, OutputError, UnknownModelError
from medseg.inference.engine import (
    labels_on_source_grid,
    resolve_device,
    sliding_window_probs,
    to_source_grid,
    window_size,
)
from medseg.io.volume import Volume, check_writable_folder, load_volume, save_volume
from medseg.models.registry import build_model, get_spec
from medseg.postprocess import apply_postprocessing
from medseg.training.checkpoint import config_from_checkpoint, load_checkpoint, predict_models, predict_states

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODELS = ASSETS / "models"
DEFAULT_MODEL = "hippocampus"


def bundled_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUNDLED_MODELS.glob("*.pt"), key=lambda p: p.stem)}


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
                 overlap: float | None = None, sw_batch_size: int | None = None, amp: bool = True,
                 tta: bool | None = None, backend: str = "auto", amp_dtype: str = "fp16", compile: bool = False,
                 threads: int | None = None, plan_memory: bool = True) -> None:
        from medseg.inference.backends import EXPORT_SUFFIXES, check_backend, is_exported, read_export_metadata
        from medseg.inference.memory import bounded_memory_transforms
        from medseg.transforms.pipeline import inference_transforms

        self.model_path = resolve_model(model)
        exported = is_exported(self.model_path)
        suffix_backend = EXPORT_SUFFIXES.get(self.model_path.suffix.lower())
        self.backend = check_backend(backend) if backend not in (None, "", "auto") else (suffix_backend or "torch")
        if exported:
            if self.backend != suffix_backend:
                raise ConfigError(f"{self.model_path.suffix} models run with the {suffix_backend} backend",
                                  path=self.model_path, expected=f"--backend {suffix_backend} (or auto)",
                                  found=f"--backend {self.backend}",
                                  fix=f"use --backend {suffix_backend}, or the .pt checkpoint for --backend torch")
            payload = read_export_metadata(self.model_path)
            ck = {"config": payload["config"], **payload.get("meta", {})}
        else:
            ck = load_checkpoint(self.model_path)
        self.cfg: Config = config_from_checkpoint(ck, source=str(self.model_path))
        if self.cfg.task != "volume":
            from medseg.errors import UnsupportedInputError

            raise UnsupportedInputError("this model segments 2D images, not volumes", path=self.model_path,
                                        expected="a volume model (task: volume)", found=f"task: {self.cfg.task}",
                                        fix="use 'medseg predict IMAGE.png --model ...' for 2D images, "
                                            "or a 3D model for volumes")
        if overlap is not None:
            check_overlap(overlap, self.model_path)
            self.cfg.inference.overlap = overlap
        if sw_batch_size is not None:
            self.cfg.inference.sw_batch_size = sw_batch_size
        self._sw_batch_size = sw_batch_size
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(int(threads))
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.plan_memory = plan_memory
        self.last_plan = None
        self.set_tta(self.cfg.inference.tta if tta is None else tta)  # None follows the model's inference.tta
        self.spec = get_spec(self.cfg.model.name)
        # a packed ensemble carries one state dict per member (the folds of a cross-validation, or networks
        # of different widths with their own model configs); their probabilities are averaged
        self.nets = []
        if not exported:
            for state, model_cfg in zip(predict_states(ck), predict_models(ck)):
                self.nets.append(self._member(state, model_cfg, ck).to(self.device).eval())
        self.net = self.nets[0] if self.nets else None
        self.runner = self._make_runner(compile, threads)
        self.transforms = bounded_memory_transforms(inference_transforms(self.cfg))
        self.meta = {k: ck.get(k) for k in ("epoch", "best_metric", "val_dice")}

    def _member(self, state: dict, model_cfg: dict, ck: dict) -> torch.nn.Module:
        model = self.cfg.model if model_cfg == ck["config"]["model"] else \
            from_dict({**ck["config"], "model": model_cfg}, source=str(self.model_path)).model
        net = build_model(model, 1, self.cfg.num_classes)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError("model weights do not fit the network the file describes", path=self.model_path,
                                  expected=f"weights of a {model.name} with channels {model.channels}",
                                  found=(str(exc).strip().splitlines() or [""])[0][:160],
                                  fix="the file is damaged or was altered; pack it again with 'medseg pack-model'") \
                from None
        return net

    def _make_runner(self, compile: bool, threads: int | None):
        from medseg.inference import backends

        if self.backend == "torch":
            return backends.TorchRunner(self.nets, self.device, amp=self.amp, amp_dtype=self.amp_dtype, compile=compile,
                                        channels_last=self.spec.dims == 3 and self.device.type == "cuda")
        fmt = "onnx" if self.backend == "onnxruntime" else "torchscript"
        path = self.model_path
        if not backends.is_exported(path):
            from medseg.inference.export import cached_export

            path = cached_export(path, fmt)
        if fmt == "onnx":
            return backends.OnnxRunner(path, device=self.device, threads=threads)
        return backends.TorchScriptRunner(path, device=self.device, amp=self.amp, amp_dtype=self.amp_dtype)

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.cfg.labels)

    def plan(self, vol: Volume):
        """Estimated peak memory and the run settings for ``vol`` (see :mod:`medseg.inference.memory`)."""
        from medseg.inference.memory import plan_memory

        params = sum(p.numel() * 4 for n in self.nets for p in n.parameters())
        try:
            plan = plan_memory(vol.shape, vol.affine, self.cfg, num_classes=self.cfg.num_classes,
                               device=self.runner.device, source_itemsize=vol.array.dtype.itemsize,
                               groups=self.runner.groups, tta_passes=len(self.tta_axes),
                               sw_batch_size=self._sw_batch_size, amp=self.amp, param_bytes=params,
                               check=self.plan_memory)
        except MedsegError as exc:  # the message names the volume that does not fit
            if exc.path is None and vol.source:
                exc.path = str(vol.source)
                exc.args = (exc.format(),)
            raise
        self.last_plan = plan
        return plan

    def processed_probabilities(self, vol: Volume, plan=None):
        """``(probs, image)``: probabilities ``(C, …)`` on the processed grid and the processed image."""
        if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
            from medseg.errors import UnsupportedInputError

            bad = int((~np.isfinite(vol.array)).sum())
            raise UnsupportedInputError("image contains NaN or Inf voxels", path=vol.source,
                                        expected="finite intensities", found=f"{bad} non-finite voxels",
                                        fix="repair or mask the image before segmenting it")
        plan = plan or self.plan(vol)
        item = self.transforms({"image": vol})
        image = item["image"]
        del item
        probs = self._probs(image, plan)
        for axis in self.tta_axes:  # each mirrored pass is flipped back and averaged
            flipped = torch.flip(torch.as_tensor(image), dims=[1 + axis])
            probs += torch.flip(self._probs(flipped, plan), dims=[1 + axis])
            del flipped
        if self.tta_axes:
            probs /= 1 + len(self.tta_axes)
        return probs, image

    def probabilities(self, vol: Volume) -> torch.Tensor:
        """Class probabilities ``(C, X, Y, Z)`` (float32) on the source grid of ``vol``."""
        probs, image = self.processed_probabilities(vol)
        return to_source_grid(probs.float(), image.affine, vol.affine, vol.shape)

    def _probs(self, image, plan) -> torch.Tensor:
        roi = window_size(self.cfg, image.shape[1:], self.spec.dims)
        run_dev = self.runner.device
        return sliding_window_probs(
            self.runner, image, roi, num_classes=self.cfg.num_classes, overlap=self.cfg.inference.overlap,
            blend=self.cfg.inference.blend, sw_batch_size=plan.sw_batch_size, device=run_dev,
            out_dtype=plan.probs_dtype, groups=self.runner.groups,
            accumulate_on=run_dev if plan.accumulate_on == "device" else torch.device("cpu"),
            image_on_device=plan.image_on_device)

    def set_tta(self, on: bool) -> None:
        """Mirror test-time augmentation on or off; only along the axes the model was trained to be
        mirror-invariant on (``augment.flip_axes``)."""
        self.cfg.inference.tta = bool(on)
        self.tta_axes = sorted(set(self.cfg.augment.flip_axes)) if (on and self.cfg.augment.enabled) else []

    def predict_volume(self, vol: Volume, probabilities_to: str | Path | None = None) -> Volume:
        """Integer label volume with exactly ``vol``'s shape and affine. ``probabilities_to``: also write the
        class probabilities it is the argmax of (processed grid, see :mod:`medseg.inference.probabilities`)."""
        probs, image = self.processed_probabilities(vol)
        if probabilities_to is not None:
            from medseg.inference.probabilities import save_probabilities

            save_probabilities(probabilities_to, probs, image.affine)
        dtype = np.uint8 if self.cfg.num_classes <= 256 else np.uint16
        labels = labels_on_source_grid(probs, image.affine, vol.affine, vol.shape, dtype=dtype)
        del probs, image
        labels = apply_postprocessing(labels, self.cfg.inference.postprocess)
        return vol.with_array(labels, kind="labels", label_names=self.labels)

    def predict_file(self, path: str | Path, out_path: str | Path) -> Prediction:
        t0 = time.perf_counter()
        vol = load_volume(path)
        labels = self.predict_volume(vol)
        save_volume(labels, out_path, reference=vol)
        return Prediction(labels, time.perf_counter() - t0)


def default_format(item) -> str:
    return "nrrd" if item.output_suffix == ".nrrd" else "nifti"


def plan_outputs(items: list, outdir: Path, formats: list[str] | None = None, *, flat: bool = True) -> list[list[Path]]:
    """Output paths per input item; refuses writing onto an input or two inputs onto one output."""
    from medseg.io.writers import FORMATS

    plans = []
    seen: dict[Path, object] = {}
    for it in items:
        base = outdir / (it.name if flat else it.output_relpath().with_name(it.name))
        outs = [base.parent / f"{base.name}{FORMATS[f]}" for f in (formats or [default_format(it)])]
        for out in outs:
            if it.kind == "volume" and out.resolve() == Path(it.path).resolve():
                raise OutputError("output path equals the input path", path=it.path,
                                  fix="choose an output folder other than the input folder")
            if out in seen:
                raise OutputError("two inputs would write the same output", path=out,
                                  found=f"{seen[out]} and {it.path}", fix="rename one input or predict them separately")
            seen[out] = it.path
        plans.append(outs)
    return plans


@dataclass
class PredictResult:
    input: Path
    outputs: list[Path]
    seconds: float


def load_item(item, dicom_options: dict | None = None) -> Volume:
    return item.load(**(dicom_options or {})) if item.kind == "dicom" else item.load()


class prefetch:
    """Iterate ``(item, load(item))`` with the next item loaded on a worker thread meanwhile.

    A loading error is raised when its item is reached, as a plain loop would raise it.
    """

    def __init__(self, items: list, load) -> None:
        self.items, self.load = list(items), load

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch")
        return self._iterate()

    def _iterate(self):
        future = self.pool.submit(self.load, self.items[0]) if self.items else None
        for i, it in enumerate(self.items):
            value = future.result()
            future = self.pool.submit(self.load, self.items[i + 1]) if i + 1 < len(self.items) else None
            yield it, value

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)


def segment_item(predictor: "Predictor", item, base: Path, formats: list[str] | None,
                 dicom_options: dict | None = None, anonymize: bool = False,
                 volume: Volume | None = None) -> tuple[Volume, list[Path]]:
    """Load one input item (unless ``volume`` is given), segment it and write every requested format."""
    from medseg.io.writers import write_labels
    from medseg.labels import infos_from_config

    vol = volume if volume is not None else load_item(item, dicom_options)
    labels = predictor.predict_volume(vol)
    files = list(item.series.files) if item.kind == "dicom" and item.series is not None else None
    outs = write_labels(labels, vol, base, formats or [default_format(item)], infos=infos_from_config(predictor.cfg),
                        source_files=files, model_name=predictor.cfg.name, anonymize=anonymize)
    return labels, outs


def predict(inputs: list[str | Path], outdir: str | Path, *, model: str | Path | None = None,
            device: str = "auto", progress: bool = True, overlap: float | None = None,
            rules: str | Path | None = None, dicom_options: dict | None = None,
            formats: list[str] | None = None, tta: bool | None = None, stats: str | None = None,
            anonymize: bool = False, runtime: dict | None = None) -> list[PredictResult]:
    """Segment every input and write ``OUTDIR/<name>.<format>`` label files.

    Inputs are NIfTI/NRRD files, folders of them, DICOM series or study folders (series
    chosen by ``rules``, a YAML file; by default every image series). ``formats``: any of
    ``nifti``, ``nrrd``, ``seg.nrrd``, ``dicom-seg`` (default: NIfTI, or NRRD for NRRD input).
    ``stats`` (``csv`` or ``json``) also writes ``<name>.lesions.<stats>``: one row per connected
    component of each label with its volume (mL), longest diameter (mm) and centroid (RAS and LPS).
    ``anonymize`` de-identifies DICOM SEG outputs (see :mod:`medseg.privacy`). ``runtime`` holds
    :class:`Predictor` options: ``backend``, ``amp``, ``amp_dtype``, ``compile``, ``threads``.
    The next input is read on a worker thread while the current one is segmented.
    """
    from medseg.io.rules import load_rules
    from medseg.io.sources import discover
    from medseg.io.writers import check_formats, write_color_tables
    from medseg.labels import infos_from_config
    from medseg.progress import progress_bar

    outdir = Path(outdir)
    check_writable_folder(outdir)
    formats = check_formats(formats) if formats else None
    if stats not in (None, "csv", "json"):
        from medseg.errors import ConfigError

        raise ConfigError("unknown --stats format", expected="csv or json", found=repr(stats), fix="use --stats csv")
    items, skipped = discover(inputs, load_rules(rules), recursive=False)
    if not items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise InputNotFoundError("no series passed the selection rules", path=inputs[0], found=reasons,
                                 fix="check the rules (medseg inspect PATH shows every decision)")
    plans = plan_outputs(items, outdir, formats)
    if formats and "dicom-seg" in formats:
        not_dicom = [it for it in items if it.kind != "dicom"]
        if not_dicom:
            from medseg.errors import UnsupportedInputError

            raise UnsupportedInputError("DICOM SEG output needs a DICOM input series", path=not_dicom[0].path,
                                        expected="DICOM series inputs only", found="a NIfTI/NRRD volume",
                                        fix="use --format nifti, nrrd or seg.nrrd for NIfTI/NRRD inputs")
    predictor = Predictor(model, device=device, overlap=overlap, tta=tta, **(runtime or {}))
    results = []
    with progress_bar("predict", total=len(items), enabled=progress) as advance, \
            prefetch(items, lambda it: load_item(it, dicom_options)) as loaded:
        for (it, vol), outs in zip(loaded, plans):
            t0 = time.perf_counter()
            labels, written = segment_item(predictor, it, outdir / it.name, formats, dicom_options, anonymize,
                                           volume=vol)
            if stats:
                from medseg.lesions import lesion_table, write_lesion_report

                table = lesion_table(labels, predictor.labels)
                written.append(write_lesion_report(table, outdir / f"{it.name}.lesions.{stats}"))
            results.append(PredictResult(Path(it.path), written, time.perf_counter() - t0))
            advance(it.name)
    # colour tables only once labels exist: a failed run leaves no output behind
    write_color_tables(outdir, formats or sorted({default_format(it) for it in items}), infos_from_config(predictor.cfg))
    return results
