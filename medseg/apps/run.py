"""The run loop: load -> predict -> write -> record, one input item at a time.

``medseg predict``, ``medseg batch`` (local and on Ray workers) and ``medseg pacs predict``
all segment their inputs through :func:`run_items` (or :func:`run_one`, its body): the model
is loaded once, the next item is read on a worker thread while the current one is inferred
(:class:`prefetch`), every requested output format is written atomically, and each item ends
as an :class:`ItemResult` with its timings. With ``isolate=True`` a failing item becomes a
failed result and the loop goes on (batch, Ray); without it the error is raised (predict).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medseg.core.errors import ConfigError, InputNotFoundError, MedsegError, OutputError, UnsupportedInputError
from medseg.inference.predictor import Predictor
from medseg.io.volume import Volume, check_writable_folder


def default_format(item) -> str:
    return "nrrd" if item.output_suffix == ".nrrd" else "nifti"


def plan_outputs(items: list, outdir: Path, formats: list[str] | None = None) -> list[list[Path]]:
    """Output paths per input item (``OUTDIR/<name>.<format>``); refuses writing onto an input or two inputs
    onto one output."""
    from medseg.io.writers import FORMATS

    plans = []
    seen: dict[Path, object] = {}
    for it in items:
        base = outdir / it.name
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


class prefetch:
    """Iterate ``(item, load(item))`` with the next item loaded on a worker thread meanwhile.

    A loading error is raised when its item is reached, as a plain loop would raise it.
    """

    def __init__(self, items: Iterable, load: Callable) -> None:
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


@dataclass
class ItemResult:
    """What became of one input item."""

    item: object
    status: str  # "done" or "failed"
    outputs: list[Path] = field(default_factory=list)
    labels: Volume | None = None
    error: BaseException | None = None
    input_hash: str | None = None
    load_s: float = 0.0
    predict_s: float | None = None
    write_s: float | None = None
    notes: dict = field(default_factory=dict)
    """What reading the input set aside: ``duplicates`` (copies of an instance: [used file, copy, what]) and
    ``unreadable`` (files left out: [file, reason]); file names only."""

    @property
    def seconds(self) -> float:
        return self.load_s + (self.predict_s or 0.0) + (self.write_s or 0.0)

    def record(self, outdir: Path) -> dict:
        """The fields a batch manifest records, outputs relative to ``outdir`` (plain values: they cross process
        boundaries from Ray workers)."""
        fields = {"status": self.status, "load_s": round(self.load_s, 3), "input_hash": self.input_hash}
        if self.status == "done":
            fields.update(outputs=[str(p.relative_to(outdir)) for p in self.outputs],
                          predict_s=round(self.predict_s, 3), write_s=round(self.write_s, 3))
        else:
            fields["reason"] = self.reason() or "failed"
        fields.update({k: v for k, v in self.notes.items() if v})
        return fields

    def reason(self) -> str | None:
        return None if self.error is None else failure_reason(self.error)


def failure_reason(error: BaseException | str) -> str:
    """A failure in one line: a :class:`MedsegError`'s own message (or a reason already written); anything
    else is marked internal."""
    if isinstance(error, BaseException) and not isinstance(error, MedsegError):
        error = f"internal error: {type(error).__name__}: {error}"
    return " ".join(str(error).split())


@dataclass
class Loaded:
    """An item read from disk (or the error reading it), with the time it took."""

    volume: Volume | None
    input_hash: str | None
    seconds: float
    error: BaseException | None = None


def load_item(item, dicom_options: dict | None = None, *, hash_input: bool = False, isolate: bool = False) -> Loaded:
    t0 = time.perf_counter()
    try:
        vol = item.load(**(dicom_options or {}))
        digest = item.input_hash() if hash_input else None
    except Exception as exc:  # noqa: BLE001 - a broken file must not stop an archive (isolate)
        if not isolate:
            raise
        return Loaded(None, None, time.perf_counter() - t0, exc)
    return Loaded(vol, digest, time.perf_counter() - t0)


def run_one(predictor: Predictor, item, base: Path, formats: list[str] | None, *, loaded: Loaded | None = None,
            dicom_options: dict | None = None, anonymize: bool = False, stats: str | None = None,
            preview: bool = False, statistics: bool = False, isolate: bool = False,
            hash_input: bool = False) -> ItemResult:
    """Load ``item`` (unless ``loaded`` is given), segment it, write ``base.<format>`` for every format (and
    ``base.lesions.<stats>``, ``base.preview.png``, ``base.statistics.csv|json``); a failure is raised, or with
    ``isolate`` returned as a failed result."""
    from medseg.core.labels import infos_from_config
    from medseg.io.writers import write_labels

    loaded = loaded or load_item(item, dicom_options, hash_input=hash_input, isolate=isolate)
    res = ItemResult(item, "failed", input_hash=loaded.input_hash, load_s=loaded.seconds, error=loaded.error)
    if loaded.error is not None:
        return res
    res.notes = {k: loaded.volume.meta[k] for k in ("duplicates", "unreadable") if loaded.volume.meta.get(k)}
    try:
        t1 = time.perf_counter()
        labels = predictor.predict_volume(loaded.volume)
        t2 = time.perf_counter()
        files = list(item.series.files) if item.kind == "dicom" and item.series is not None else None
        written = write_labels(labels, loaded.volume, base, formats or [default_format(item)],
                               infos=infos_from_config(predictor.cfg), source_files=files,
                               model_name=predictor.cfg.name, anonymize=anonymize)
        if stats:
            written += write_stats(labels, predictor.cfg, base, stats)
        if preview:
            written.append(write_preview(loaded.volume, labels, predictor.cfg, base))
        if statistics:
            from medseg.evaluation.statistics import label_statistics, write_statistics

            rows = label_statistics(loaded.volume, labels, dict(predictor.cfg.labels), predictor.cfg.channel_names)
            written += write_statistics(rows, base)
        res.status, res.outputs, res.labels = "done", written, labels
        res.predict_s, res.write_s = t2 - t1, time.perf_counter() - t2
    except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on (isolate)
        if not isolate:
            raise
        res.error = exc
    return res


def write_stats(labels: Volume, cfg, base: Path, stats: str) -> list[Path]:
    """``base.lesions.<stats>``: one row per lesion (per label, or per region of a region model: volume, 3D
    diameter, RECIST axes, centroid); a region model also gets the case summary (``base.summary.json``, and
    inside the JSON report)."""
    import json

    from medseg.evaluation.lesions import lesion_table, tumour_summary, write_lesion_report
    from medseg.io.volume import atomic_write

    names = dict(cfg.labels)
    table = lesion_table(labels, names, regions=cfg.regions or None)
    summary = tumour_summary(labels, names, cfg.regions) if cfg.regions else None
    out = [write_lesion_report(table, base.parent / f"{base.name}.lesions.{stats}", summary)]
    if summary is not None and stats == "csv":
        out.append(atomic_write(base.parent / f"{base.name}.summary.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")))
    return out


def write_preview(image: Volume, labels: Volume, cfg, base: Path) -> Path:
    """``base.preview.png``: axial, coronal and sagittal slices through the labels over the image (the reference
    sequence of a case of several)."""
    from medseg.io.visualize import overlay_png

    if image.array.ndim == 4:
        names = cfg.channel_names
        ref = names.index(cfg.reference_channel) if cfg.reference_channel in names else 0
        image = image.with_array(image.array[..., ref])
    return overlay_png(image, labels, base.parent / f"{base.name}.preview.png", dict(cfg.labels), cfg.colors)


def run_items(predictor: Predictor, items: list, base_of: Callable[[object], Path], formats: list[str] | None, *,
              dicom_options: dict | None = None, anonymize: bool = False, stats: str | None = None,
              preview: bool = False, statistics: bool = False,
              isolate: bool = False, hash_input: bool = False) -> Iterator[ItemResult]:
    """:func:`run_one` over ``items`` in order, each next item read while the current one is segmented."""
    def load(it) -> Loaded:
        return load_item(it, dicom_options, hash_input=hash_input, isolate=isolate)

    with prefetch(items, load) as loaded_items:
        for it, loaded in loaded_items:
            yield run_one(predictor, it, base_of(it), formats, loaded=loaded, anonymize=anonymize, stats=stats,
                          preview=preview, statistics=statistics, isolate=isolate)


def parse_channels(pairs: list[str] | None) -> dict[str, Path]:
    """``["flair=a.nii.gz", "t1c=b.nii.gz"]`` (``--channel NAME=FILE``) -> ``{"flair": Path("a.nii.gz"), ...}``."""
    out: dict[str, Path] = {}
    for pair in pairs or []:
        name, sep, path = str(pair).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError("bad --channel", expected="NAME=FILE, e.g. --channel flair=case/flair.nii.gz",
                              found=repr(pair), fix="give each sequence as NAME=FILE")
        if name.strip() in out:
            raise ConfigError(f"--channel {name.strip()} is given twice", found=repr(pair), fix="give it once")
        out[name.strip()] = Path(path.strip())
    return out


def discover_inputs(inputs: list, cfg, rules=None, *, channels: dict[str, Path] | None = None,
                    mirror_root: Path | None = None, recursive: bool = True, progress: bool = False) -> tuple[list, list]:
    """What to segment for a model with config ``cfg``: single volumes and series (one sequence), or cases of
    the model's sequences (case folders, nnU-Net files, 4D images, DICOM studies); ``channels`` gives one
    case's sequences explicitly (``--channel NAME=FILE``)."""
    from medseg.io.sources import case_item, discover, discover_cases

    names = cfg.channel_names
    if channels:
        if sorted(channels) != sorted(names):
            missing = [n for n in names if n not in channels]
            raise ConfigError("--channel must give every sequence of the model, by name",
                              expected=", ".join(f"{n}=FILE" for n in names), found=", ".join(channels) or "none",
                              fix=f"add --channel {missing[0]}=FILE" if missing else "use the model's sequence names "
                              "('medseg models' lists them)")
        if inputs:
            raise ConfigError("give the sequences with --channel or the inputs, not both", found=str(inputs[0]),
                              fix="drop the positional inputs")
        parts = {}
        for name in names:
            found, _ = discover([channels[name]], recursive=False)
            if len(found) != 1:
                raise InputNotFoundError(f"--channel {name} must name one volume or one DICOM series",
                                         path=channels[name], found=f"{len(found)} series/volumes",
                                         fix="point it at one file or one series folder")
            parts[name] = found[0]
        return [case_item(parts[cfg.reference_channel].name, parts, cfg.reference_channel)], []
    if not inputs:
        raise ConfigError("nothing to segment", expected="input files or folders, or --channel NAME=FILE",
                          fix="see medseg predict --help")
    if cfg.in_channels > 1:
        return discover_cases(inputs, cfg.data.channels, cfg.reference_channel, label_patterns=cfg.data.label_patterns,
                              rules=rules, mirror_root=mirror_root, recursive=recursive)
    return discover(inputs, rules, mirror_root=mirror_root, recursive=recursive, progress=progress)


@dataclass
class PredictResult:
    input: Path
    outputs: list[Path]
    seconds: float


def predict(inputs: list[str | Path], outdir: str | Path, *, model=None, device: str = "auto", progress: bool = True,
            overlap: float | None = None, rules: str | Path | None = None, dicom_options: dict | None = None,
            formats: list[str] | None = None, tta: bool | None = None, stats: str | None = None,
            anonymize: bool = False, runtime: dict | None = None,
            channels: dict[str, Path] | None = None, preview: bool = False,
            statistics: bool = False) -> list[PredictResult]:
    """Segment every input and write ``OUTDIR/<name>.<format>`` label files.

    Inputs are NIfTI/NRRD files, folders of them, DICOM series or study folders (series
    chosen by ``rules``, a YAML file; by default every image series). ``model``: a bundled
    name, a model file, or a :class:`~medseg.models.loading.LoadedModel`. ``formats``: any of
    ``nifti``, ``nrrd``, ``seg.nrrd``, ``dicom-seg`` (default: NIfTI, or NRRD for NRRD input).
    ``stats`` (``csv`` or ``json``) also writes ``<name>.lesions.<stats>``: one row per connected
    component of each label with its volume (mL), longest diameter (mm) and centroid (RAS and LPS).
    ``preview`` writes ``<name>.preview.png`` (the labels over the image); ``statistics`` writes
    ``<name>.statistics.csv`` and ``.json`` (per label: volume, and intensities per sequence).
    ``anonymize`` de-identifies DICOM SEG outputs (see :mod:`medseg.core.privacy`). ``runtime`` holds
    :class:`Predictor` options: ``backend``, ``amp``, ``amp_dtype``, ``compile``, ``threads``.
    A model that takes several sequences segments cases: case folders, nnU-Net-named files, 4D images,
    DICOM studies (``rules`` with ``sequences:``), or one case given as ``channels`` ``{name: file}``;
    each output lies on the reference sequence's grid.
    The next input is read on a worker thread while the current one is segmented.
    """
    from medseg.core.labels import infos_from_config
    from medseg.core.progress import progress_bar
    from medseg.io.rules import load_rules
    from medseg.io.writers import check_formats, write_color_tables

    outdir = Path(outdir)
    check_writable_folder(outdir)
    formats = check_formats(formats) if formats else None
    if stats not in (None, "csv", "json"):
        raise ConfigError("unknown --stats format", expected="csv or json", found=repr(stats), fix="use --stats csv")
    from medseg.models.loading import load_model

    loaded = load_model(model)
    items, skipped = discover_inputs(inputs, loaded.cfg, load_rules(rules), channels=channels, recursive=False)
    if not items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise InputNotFoundError("no series passed the selection rules", path=inputs[0] if inputs else None, found=reasons,
                                 fix="check the rules (medseg inspect PATH shows every decision)")
    plan_outputs(items, outdir, formats)
    from medseg.io.writers import DICOM_FORMATS

    if formats and set(formats) & set(DICOM_FORMATS):
        not_dicom = [it for it in items if it.kind != "dicom"]
        if not_dicom:
            what = " and ".join({"dicom-seg": "DICOM SEG", "rtstruct": "RTSTRUCT"}[f] for f in formats
                                 if f in DICOM_FORMATS)
            raise UnsupportedInputError(f"{what} output needs a DICOM input series", path=not_dicom[0].path,
                                        expected="DICOM series inputs only", found="a NIfTI/NRRD volume",
                                        fix="use --format nifti, nrrd or seg.nrrd for NIfTI/NRRD inputs")
    predictor = Predictor(loaded, device=device, overlap=overlap, tta=tta, **(runtime or {}))
    results = []
    with progress_bar("predict", total=len(items), enabled=progress) as advance:
        for res in run_items(predictor, items, lambda it: outdir / it.name, formats, dicom_options=dicom_options,
                             anonymize=anonymize, stats=stats, preview=preview, statistics=statistics):
            results.append(PredictResult(Path(res.item.path), res.outputs, res.seconds - res.load_s))
            advance(res.item.name)
    # colour tables only once labels exist: a failed run leaves no output behind
    write_color_tables(outdir, formats or sorted({default_format(it) for it in items}), infos_from_config(predictor.cfg))
    return results
