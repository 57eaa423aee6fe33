"""The ``medseg`` command line: a thin layer over the Python API.

Heavy modules (torch, MONAI) are imported inside the commands, so ``--help`` is fast.
Every :class:`~medseg.core.errors.MedsegError` is printed as one line, without a
traceback, and the process exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: train, predict, evaluate. Outputs keep the input's exact geometry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console(stderr: bool = True):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # tables stay readable when piped to a file or a log
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/hippocampus.yaml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key: --set train.epochs=10 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from last.pt in train.output_dir."),
    folds: int = typer.Option(0, "--folds", help="K-fold cross-validation: train K models into "
                              "train.output_dir/fold_I, pool their out-of-fold Dice, choose postprocessing."),
    fold: Optional[int] = typer.Option(None, "--fold", help="With --folds: train only this fold (for job arrays)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="With --folds: also keep each "
                                            "held-out case's class probabilities (fold_I/validation/CASE.probs.npz), "
                                            "so the run can be ensembled with another later without its weights."),
) -> None:
    """Train a model; writes best.pt and last.pt (weights + resolved config) to train.output_dir."""
    from medseg.planning import load_planned_config
    from medseg.training.trainer import train as run_train

    cfg = load_planned_config(config, set_)  # plan: auto / plan: FILE is filled in here, not when loading
    con = _console(stderr=False)
    if cfg.task == "image2d":
        from medseg.seg2d.train import train_2d

        if folds or fold is not None or save_probabilities:
            from medseg.core.errors import ConfigError

            raise ConfigError("--folds and --save-probabilities are for volume tasks", path=config,
                              found="task: image2d", fix="train 2D image models without them")
        res2d = train_2d(cfg, resume=resume)
        con.print(f"best mean validation IoU {res2d.best_metric:.4f} at epoch {res2d.best_epoch}; "
                  f"{res2d.epochs_run} epoch(s) in {res2d.seconds:.0f} s")
        con.print(f"best checkpoint: {res2d.best_checkpoint}")
        return
    if folds or fold is not None:
        from medseg.training.crossval import train_folds

        cv = train_folds(cfg, folds, only=fold, resume=resume, log=lambda m: _console().print(m, highlight=False),
                         save_probabilities=save_probabilities)
        for f, d in cv.fold_dice.items():
            con.print(f"fold {f}: " + ", ".join(f"{k} {v:.4f}" for k, v in d.items()))
        if cv.complete:
            con.print("pooled out-of-fold Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in cv.pooled.items()))
            con.print(f"postprocessing chosen: {cv.postprocess or 'none'}; after it: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in cv.pooled_postprocessed.items()))
            con.print(f"ensemble model: medseg pack-model {cv.output_dir} model.pt")
        else:
            con.print(f"{len(cv.folds_done)} of {folds} folds done; the summary is written when all are")
        return
    if save_probabilities:
        from medseg.core.errors import ConfigError

        raise ConfigError("--save-probabilities keeps out-of-fold probabilities", path=config,
                          expected="--folds K", found="no --folds", fix="add --folds 5, or drop --save-probabilities")
    res = run_train(cfg, resume=resume)
    from medseg.training.distributed import DistContext

    if not DistContext.from_env().is_main:  # under torchrun, rank 0 reports
        return
    if res.best_metric is None or res.best_metric < 0:  # no validation split: the final weights are kept
        con.print(f"no validation cases; kept the final weights; {res.epochs_run} epoch(s) in {res.seconds:.0f} s")
    elif cfg.train.keep == "last":
        con.print(f"kept the final weights (epoch {res.best_epoch}, mean validation Dice {res.best_metric:.4f}); "
                  f"{res.epochs_run} epoch(s) in {res.seconds:.0f} s")
    else:
        con.print(f"best mean validation Dice {res.best_metric:.4f} at epoch {res.best_epoch}; "
                  f"{res.epochs_run} epoch(s) in {res.seconds:.0f} s")
    con.print(f"best checkpoint: {res.best_checkpoint}")


UNEVEN_HELP = "Uneven or missing DICOM slices: resample (to even spacing) | error."
PHILIPS_HELP = ("Philips images with a private scale slope: precise (Philips' floating-point values, as dcm2niix "
                "writes by default) | display (RescaleSlope/Intercept, as viewers show; dcm2niix -p n).")
TILT_HELP = "CT gantry tilt: resample (de-tilt like dcm2niix) | error."
RULES_HELP = "Series selection rules (YAML) for DICOM study folders; default: every image series."
CREDENTIALS_HELP = ('JSON file {"username": ..., "password": ...}; default: MEDSEG_DICOMWEB_USER and '
                    'MEDSEG_DICOMWEB_PASSWORD from the environment. Never pass passwords on the command line.')
PREVIEW_HELP = ("Also write <name>.preview.png: axial, coronal and sagittal slices through the labels over the "
                "image, with a legend.")
STATISTICS_HELP = ("Also write <name>.statistics.csv and .json: per label its volume (mL) and, per sequence, the "
                   "intensity mean, std, min, 5/25/50/75/95th percentiles and max inside it.")
ANONYMIZE_HELP = ("De-identify DICOM SEG outputs: patient name/ID/accession become keyed pseudonyms "
                  "(MEDSEG_ANON_KEY), birth date, dates, physicians and institution are removed; UIDs are kept.")
FORMAT_HELP = ("Output format: nifti | nrrd | seg.nrrd (3D Slicer) | dicom-seg | rtstruct (DICOM input only); "
               "repeat for several. Default: nifti (nrrd for NRRD input).")
BACKEND_HELP = ("Inference backend: auto (from the model file: .pt torch, .onnx onnxruntime, .ts torchscript) | torch | "
                "onnxruntime | torchscript (a .pt model is exported once and cached).")
AMP_HELP = ("Mixed precision: auto | fp16 | bf16 | off. auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AMX or "
            "AVX-512 BF16: about twice as fast, same labels), fp32 on other CPUs. fp16 is CUDA only (the CPU then "
            "runs fp32); bf16 on a CPU without native bf16 is emulated and slow.")


def _dicom_options(uneven: str, tilt: str, philips: str = "precise") -> dict:
    return {"uneven": uneven, "tilt": tilt, "philips": philips}


def _runtime(backend: str, amp: str, compile_: bool, threads: Optional[int], crop_body: Optional[bool]) -> dict:
    """Predictor options for --backend, --amp, --compile, --threads and --crop-body."""
    from medseg.core.runtime import amp_options

    return {"backend": backend, **amp_options(amp), "compile": compile_, "threads": threads,
            "crop_to_body": crop_body}


CROP_BODY_HELP = ("Run the sliding window on the body's bounding box only (air planes cut where that saves windows; "
                  "background outside it). Default: the model's inference.crop_to_body (on for bundled models).")


@app.command()
def predict(
    inputs: Optional[List[Path]] = typer.Argument(None, help="NIfTI/NRRD files, DICOM series or study folders, or "
                                                  "folders of volumes; for a model of several sequences: case folders, "
                                                  "nnU-Net-named files, 4D images or DICOM studies."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (created; never an input folder)."),
    channel: Optional[List[str]] = typer.Option(None, "--channel", help="One case's sequence as NAME=FILE (a volume "
                                                "or DICOM series), repeated for every sequence the model takes, "
                                                "e.g. --channel flair=f.nii.gz --channel t1c=t.nii.gz."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundled model name or .pt checkpoint (default: hippocampus)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="Sliding-window overlap in [0, 1) (default from the model)."),
    rules: Optional[Path] = typer.Option(None, "--rules", help=RULES_HELP),
    uneven: str = typer.Option("resample", "--uneven", help=UNEVEN_HELP),
    tilt: str = typer.Option("resample", "--tilt", help=TILT_HELP),
    philips: str = typer.Option("precise", "--philips", help=PHILIPS_HELP),
    formats: Optional[List[str]] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Mirror test-time augmentation along the axes the model "
                                       "was trained to mirror (about 2x the time; default: the model's inference.tta)."),
    anonymize: bool = typer.Option(False, "--anonymize", help=ANONYMIZE_HELP),
    stats: Optional[str] = typer.Option(None, "--stats", help="Also write <name>.lesions.csv|json: per-lesion volume (mL), "
                                        "longest diameter and RECIST long/short axes (mm), centroid (RAS and LPS); "
                                        "per region for region models, with a case summary."),
    preview: bool = typer.Option(False, "--preview", help=PREVIEW_HELP),
    statistics: bool = typer.Option(False, "--statistics", help=STATISTICS_HELP),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    amp: str = typer.Option("auto", "--amp", help=AMP_HELP),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (torch backend; pays off on GPUs)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for inference (default: the cores this process may use)."),
    crop_body: Optional[bool] = typer.Option(None, "--crop-body/--no-crop-body", help=CROP_BODY_HELP),
) -> None:
    """Segment volumes; OUTDIR/<name> is an integer label volume on the input's exact grid.

    NIfTI/NRRD inputs keep their name (case.nii.gz -> OUTDIR/case.nii.gz); a DICOM series
    becomes OUTDIR/series-<number>-<hash>.nii.gz (no patient data in file names). A case of
    several sequences is named after its folder (or nnU-Net case name) and lies on the grid of
    the model's reference sequence.
    """
    from medseg.models.loading import load_model
    from medseg.seg2d.predict import is_image_file

    loaded = load_model(model)  # read once: it says whether the model segments images or volumes
    if loaded.cfg.task == "image2d":  # PNG/JPEG in: OUTDIR/<stem>.png index masks, OUTDIR/overlays/<stem>.png
        from medseg.seg2d.predict import predict_images

        if formats or tta or stats or rules or channel or preview or statistics:
            from medseg.core.errors import ConfigError

            raise ConfigError("--format, --tta, --stats, --preview, --statistics, --rules and --channel are for "
                              "volume models", path=model,
                              found="a 2D image model", fix="drop those options for PNG/JPEG images")
        con = _console(stderr=False)
        for res in predict_images(inputs or [], output, model=loaded, device=device):
            con.print(f"{res.input} -> {', '.join(map(str, res.outputs))} ({res.seconds:.2f} s)")
        return
    if inputs and all(is_image_file(p) for p in inputs):
        from medseg.core.errors import UnsupportedInputError

        raise UnsupportedInputError("PNG/JPEG images need a 2D image model", path=inputs[0],
                                    expected="--model a .pt trained with task: image2d",
                                    found=f"model {model or 'hippocampus'} (volumes)",
                                    fix="train one with a task: image2d config (see configs/shapes_2d.yaml)")
    from medseg.apps.run import predict as run_predict

    from medseg.apps.run import parse_channels

    results = run_predict(inputs or [], output, model=loaded, device=device, overlap=overlap, rules=rules,
                          channels=parse_channels(channel),
                          dicom_options=_dicom_options(uneven, tilt, philips), formats=formats, tta=tta, stats=stats,
                          anonymize=anonymize, runtime=_runtime(backend, amp, compile_, threads, crop_body),
                          preview=preview,
                          statistics=statistics)
    con = _console(stderr=False)
    for res in results:
        con.print(f"{res.input} -> {', '.join(map(str, res.outputs))} ({res.seconds:.1f} s)")


@app.command()
def evaluate(
    pred_dir: Path = typer.Argument(..., help="Folder of predicted label volumes."),
    ref_dir: Path = typer.Argument(..., help="Folder of reference label volumes (same file names)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write all scores to this JSON file."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config or model whose label names to show; one with "
                                          "regions (e.g. the glioma model) is scored per region."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Surface Dice tolerance in mm."),
) -> None:
    """Per class (or region): Dice, HD95, surface Dice, ASSD, volumes, lesion detection, and per region the
    BraTS 2023 lesion-wise Dice and HD95; per case and mean."""
    from rich.table import Table

    from medseg.evaluation.metrics import evaluate as run_evaluate
    from medseg.seg2d.evaluation import is_mask_folder

    if is_mask_folder(ref_dir):  # PNG masks: per-class IoU and mean IoU
        from medseg.seg2d.evaluation import evaluate_masks, settings_from

        names2d, ignore = settings_from(config)
        ev = evaluate_masks(pred_dir, ref_dir, names=names2d, ignore_index=ignore, json_path=json_out)
        table = Table(title=f"IoU over {len(ev.cases)} image(s), pooled (ignore value {ignore})")
        for col in ("class", "IoU", "share of pixels"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for c, v in ev.iou.items():
            table.add_row(f"{c} {ev.names.get(c, '')}".strip(), "n/a" if v != v else f"{v:.4f}", f"{100 * ev.share(c):.1f}%")
        table.add_section()
        table.add_row("[bold]mean IoU", f"{ev.mean_iou:.4f}", "")
        table.add_row("pixel accuracy", f"{ev.pixel_accuracy:.4f}", "")
        _console(stderr=False).print(table)
        return
    cfg = _config_of(config) if config else None
    names = dict(cfg.labels) if cfg else None
    res = run_evaluate(pred_dir, ref_dir, names=names, json_path=json_out, tolerance_mm=tolerance,
                       regions=cfg.regions if cfg else None)
    metrics = [("dice", "Dice", 4), ("hd95", "HD95 mm", 2), ("surface_dice", f"sDice@{tolerance:g}mm", 4),
               ("assd", "ASSD mm", 2), ("rvd_pct", "vol diff %", 1)]
    if res.regions:
        metrics += [("lesionwise_dice", "lesion-wise Dice", 4), ("lesionwise_hd95", "lesion-wise HD95", 2)]

    def fmt(v: float, digits: int) -> str:
        return "n/a" if v != v or v in (float("inf"), float("-inf")) else f"{v:.{digits}f}"

    con = _console(stderr=False)
    for c in res.classes:
        n = res.names.get(c, str(c))
        what = f"region of labels {', '.join(map(str, res.regions[c]))}" if res.regions else f"label {c}"
        table = Table(title=f"{n} ({what}), {len(res.cases)} case(s)")
        table.add_column("case")
        for _, head, _ in metrics:
            table.add_column(head, justify="right")
        table.add_column("mL pred/ref", justify="right")
        table.add_column("lesions found/ref", justify="right")
        for cs in res.cases:
            m = cs.lesions.get(c) if cs.lesions else None
            found = f"{m.detected}/{m.n_ref} ({m.n_pred - m.true_positive} FP)" if m else ""
            vol = f"{cs.pred_volume_ml.get(c, float('nan')):.2f}/{cs.ref_volume_ml.get(c, float('nan')):.2f}"
            table.add_row(cs.case, *[fmt(cs.value(k, c), d) for k, _, d in metrics], vol, found)
        table.add_section()
        tot = res.lesion_totals(c)
        table.add_row("[bold]mean", *[fmt(res.mean(k, c), d) for k, _, d in metrics], "",
                      f"sens {fmt(tot['sensitivity'], 2)} prec {fmt(tot['precision'], 2)}" if tot else "")
        con.print(table)
    con.print(f"mean Dice over {'regions' if res.regions else 'classes'}: {res.mean_dice:.4f}")


def _config_of(ref) -> "Config":  # noqa: F821 - imported lazily
    """The config of a YAML file, or of a model (bundled name, .pt, .onnx, .ts)."""
    from medseg.models.loading import EXPORT_SUFFIXES, known_models, model_config

    path = Path(str(ref))
    if path.suffix == ".pt" or path.suffix.lower() in EXPORT_SUFFIXES or str(ref) in known_models():
        return model_config(ref)
    from medseg.core.config import load_config

    return load_config(path)


def _label_names(path: Path) -> dict[int, str]:
    return dict(_config_of(path).labels)


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_output"), "-o", "--output", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Another hippocampus model (.pt) instead of the bundled one."),
) -> None:
    """Segment the bundled real hippocampus MRI with the bundled model: labels, overlay PNG, volumes in mL."""
    from rich.table import Table

    from medseg.apps.demo import run_demo

    res = run_demo(output, device=device, model=model)
    con = _console(stderr=False)
    table = Table(title="hippocampus_001 (bundled sample, not used in training)")
    table.add_column("label")
    table.add_column("volume (mL)", justify="right")
    table.add_column("Dice vs reference", justify="right")
    for name, ml in res.volumes_ml.items():
        table.add_row(name, f"{ml:.3f}", f"{res.reference_dice[name]:.3f}")
    con.print(table)
    con.print(f"labels:  {res.labels_path}\noverlay: {res.overlay_path}\nvolumes: {res.table_path}")
    con.print(f"done in {res.seconds:.1f} s")


@app.command("verify-data")
def verify_data(
    dataset: Path = typer.Argument(..., help="Dataset folder: imagesTr/ and labelsTr/ (MSD, nnU-Net names), or one "
                                   "folder per case."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config or model: its sequences (data.channels, file "
                                          "patterns) and labels (the allowed label values)."),
) -> None:
    """Check every case: all sequences present and readable, grids agree or can be resampled, label geometry and
    values, NaNs, empty labels, duplicate cases; report all problems."""
    from medseg.preprocessing.verify import verify_dataset

    n, problems = verify_dataset(dataset, config=_config_of(config) if config else None)
    con = _console(stderr=False)
    for p in problems:
        con.print(str(p), markup=False, soft_wrap=True)  # one line per problem, also when piped
    errors = [p for p in problems if p.severity == "error"]
    con.print(f"{n} case(s) checked: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    if errors:
        raise typer.Exit(1)


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help="Dataset folder: imagesTr/ and labelsTr/ (MSD, nnU-Net names), or one "
                                   "folder per case (needs --config naming the sequences)."),
    output: Path = typer.Option(Path("plan.yaml"), "-o", "--output", help="Where to write the plan (YAML)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config naming the sequences of a case "
                                          "(data.channels) and the modality."),
    modality: str = typer.Option("MR", "--modality", help="CT (clip to foreground percentiles, z-score) or MR/other (z-score)."),
    device: str = typer.Option("cpu", "--device", help="Plan for cpu or cuda."),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Memory budget for training (default 4 CPU / 8 GPU)."),
    model: Optional[str] = typer.Option(None, "--model", help="Network to plan: dynunet3d (deep supervision; the "
                                        "default on CPU and GPU) or unet3d."),
    precision: str = typer.Option("auto", "--precision", help="CPU training precision to plan for: auto (bf16 where "
                                  "the CPU has AMX or AVX-512 BF16, else fp32), fp32 or bf16."),
) -> None:
    """Fingerprint a dataset and write a training plan; use it with 'plan: FILE' (or 'plan: auto') in a config."""
    import copy

    from medseg.core.config import DataConfig
    from medseg.planning import fingerprint, make_plan
    from medseg.preprocessing.datasets import dataset_cases

    data = copy.deepcopy(_config_of(config).data) if config else DataConfig()
    data.root, data.datalist = str(dataset), None
    fp = fingerprint(dataset_cases(data), modality=modality.upper())
    result = make_plan(fp, device=device, memory_gb=memory_gb, network=model, precision=precision)
    out = result.save(output)
    con = _console(stderr=False)
    for key, why in result.reasons.items():
        con.print(f"{key}: {why}", markup=False)
    con.print(f"wrote {out}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="DICOM series folder (or a study folder with --rules selecting one), or a NIfTI/NRRD file."),
    output: Path = typer.Argument(..., help="OUT.nii.gz, OUT.nii or OUT.nrrd."),
    rules: Optional[Path] = typer.Option(None, "--rules", help=RULES_HELP),
    uneven: str = typer.Option("resample", "--uneven", help=UNEVEN_HELP),
    tilt: str = typer.Option("resample", "--tilt", help=TILT_HELP),
    philips: str = typer.Option("precise", "--philips", help=PHILIPS_HELP),
) -> None:
    """Convert one series to NIfTI/NRRD with its patient geometry (agrees with dcm2niix)."""
    from medseg.io.convert import convert as run_convert

    out, vol = run_convert(source, output, rules=rules, uneven=uneven, tilt=tilt, philips=philips)
    notes = [k for k in ("resampled_uneven", "detilted") if vol.meta.get(k)]
    extra = f" ({', '.join(notes)})" if notes else ""
    _console(stderr=False).print(f"wrote {out}: {vol.shape} voxels, spacing {tuple(round(float(s), 4) for s in vol.spacing)} mm{extra}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A DICOM file, series, study or archive folder."),
    rules: Optional[Path] = typer.Option(None, "--rules", help=RULES_HELP),
) -> None:
    """List the studies and series found (headers only) and what the rules decide, with reasons."""
    from rich.table import Table

    from medseg.io.dicom import scan_dicom
    from medseg.io.rules import load_rules, orientation_name, select_series
    from medseg.io.sources import short_hash

    decisions = select_series(scan_dicom(path, progress=True), load_rules(rules))
    con = _console(stderr=False)
    if not decisions:
        con.print(f"no DICOM series found under {path}")
        raise typer.Exit(1)
    table = Table(title=f"{len(decisions)} stack(s) under {path}")
    for col in ("study", "series", "description", "mod", "orientation", "size", "thick mm", "decision"):
        table.add_column(col, overflow="fold")
    for d in sorted(decisions, key=lambda d: (d.series.study_uid, d.series.series_number or 0, d.series.stack_index)):
        s = d.series
        # what sets this stack apart within its series (echo, image type, acquisition), and copies set aside
        parts = [p for p in (s.stack_key or "").split("; ") if p and not p.startswith("orientation")]
        if s.duplicates:
            parts.append(f"+{sum(len(c) for _, c in s.duplicates)} duplicate copies")
        from rich.markup import escape

        description = escape((s.series_description or "") + (f" [{'; '.join(parts)}]" if parts else ""))
        table.add_row(f"study-{short_hash(s.study_uid)}", str(s.series_number if s.series_number is not None else "?"),
                      description, s.modality or "?", orientation_name(s.orientation),
                      f"{s.cols}x{s.rows}x{s.n_slices}", "" if s.slice_thickness is None else f"{s.slice_thickness:g}",
                      ("[green]selected[/]: " if d.selected else "[yellow]not selected[/]: ") + "; ".join(d.reasons))
    con.print(table)
    con.print(f"{sum(d.selected for d in decisions)} selected")


@app.command()
def batch(
    root: Optional[Path] = typer.Argument(None, help="Root folder of patients/studies/series (any nesting; DICOM and NIfTI/NRRD)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (outside ROOT); holds manifest.jsonl."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundled model name or .pt checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    rules: Optional[Path] = typer.Option(None, "--rules", help=RULES_HELP),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process only shard I of N (0-based), e.g. for job arrays."),
    retry_failed: bool = typer.Option(True, "--retry-failed/--no-retry-failed", help="Re-run series that failed before."),
    anonymize: bool = typer.Option(False, "--anonymize", help=ANONYMIZE_HELP),
    record_paths: bool = typer.Option(False, "--record-paths", help="Write input paths (relative to ROOT) into the "
                                      "manifest and messages; by default a hash of each path is recorded, since "
                                      "folder names can hold patient names."),
    uneven: str = typer.Option("resample", "--uneven", help=UNEVEN_HELP),
    tilt: str = typer.Option("resample", "--tilt", help=TILT_HELP),
    philips: str = typer.Option("precise", "--philips", help=PHILIPS_HELP),
    formats: Optional[List[str]] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    from_dicomweb: Optional[str] = typer.Option(None, "--from-dicomweb", help="DICOMweb root URL to pull studies from instead of ROOT."),
    query: Optional[List[str]] = typer.Option(None, "--query", help="With --from-dicomweb: QIDO filter KEY=VALUE (repeatable)."),
    credentials: Optional[Path] = typer.Option(None, "--credentials", help=CREDENTIALS_HELP),
    store: bool = typer.Option(True, "--store/--no-store", help="With --from-dicomweb: store each DICOM SEG back."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    amp: str = typer.Option("auto", "--amp", help=AMP_HELP),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (torch backend)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for inference."),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="Sliding-window overlap in [0, 1) (default from the model)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Mirror test-time augmentation (default: the model's inference.tta)."),
    crop_body: Optional[bool] = typer.Option(None, "--crop-body/--no-crop-body", help=CROP_BODY_HELP),
    engine: str = typer.Option("local", "--engine", help="local (one process; --shard for job arrays) | ray "
                               "(Ray actors, one model each, on a local or running Ray cluster)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --engine ray: cluster address "
                                              "(e.g. auto or ray://head:10001); default: start a local one."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --engine ray: number of actors "
                                          "(default: one per CPU of the cluster)."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="With --engine ray: GPUs per actor (e.g. 1 or 0.5)."),
    preview: bool = typer.Option(False, "--preview", help=PREVIEW_HELP),
    statistics: bool = typer.Option(False, "--statistics", help=STATISTICS_HELP + " The batch also writes "
                                    "statistics.csv: one table over every finished series."),
) -> None:
    """Segment every series under ROOT (or pulled from a PACS); resumable, failures recorded, never fatal."""
    from medseg.apps.batch import run_batch

    con = _console()
    say = lambda msg: con.print(msg, markup=False)  # noqa: E731
    on_done = None
    if from_dicomweb:
        from medseg.apps.pacs import DicomWeb, download_studies, load_credentials, parse_query

        root = output / ".dicomweb"
        download_studies(from_dicomweb, parse_query(query), root, credentials=credentials, log=say)
        if store:
            if not set(formats or []) & {"dicom-seg", "rtstruct"}:
                formats = [*(formats or []), "dicom-seg"]
            web = DicomWeb(from_dicomweb, load_credentials(credentials))

            def on_done(item, written):
                web.store([p for p in written if p.suffix == ".dcm"])
                return {"stored": True}
    elif root is None:
        from medseg.core.errors import ConfigError

        raise ConfigError("no input given", expected="ROOT or --from-dicomweb URL", fix="see medseg batch --help")
    res = run_batch(root, output, model=model, device=device, rules_path=rules, shard=shard,
                    retry_failed=retry_failed, dicom_options=_dicom_options(uneven, tilt, philips), formats=formats,
                    on_done=on_done, log=say, anonymize=anonymize, record_paths=record_paths,
                    runtime={**_runtime(backend, amp, compile_, threads, crop_body), "overlap": overlap, "tta": tta},
                    engine=engine, ray_address=ray_address,
                    workers=workers, gpus_per_worker=gpus_per_worker, preview=preview, statistics=statistics)
    out = _console(stderr=False)
    out.print(f"done {res.done}, failed {res.failed}, skipped {res.skipped}, already done {res.already_done} "
              f"in {res.seconds:.1f} s; manifest: {res.manifest}")
    for inp, reason in res.failures:
        out.print(f"failed: {inp}: {reason}", markup=False)


pacs_app = typer.Typer(help="Work with a PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).", no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("predict")
def pacs_predict_cmd(
    url: str = typer.Option(..., "--url", help="DICOMweb root URL, e.g. http://pacs:8042/dicom-web."),
    study: str = typer.Option(..., "--study", help="StudyInstanceUID."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID (default: series chosen by --rules)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundled model name or .pt checkpoint."),
    rules: Optional[Path] = typer.Option(None, "--rules", help=RULES_HELP),
    credentials: Optional[Path] = typer.Option(None, "--credentials", help=CREDENTIALS_HELP),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also keep the DICOM SEG files here."),
    store: bool = typer.Option(True, "--store/--no-store", help="Store the DICOM SEG back in the PACS."),
    formats: Optional[List[str]] = typer.Option(None, "--format", "-f", help="dicom-seg | rtstruct: what to store "
                                                "back (repeat for both; default dicom-seg)."),
) -> None:
    """Pull a series, segment it and store the DICOM SEG back."""
    from medseg.apps.pacs import pacs_predict

    con = _console()
    results = pacs_predict(url, study, series_uid=series, model=model, rules=rules, credentials=credentials,
                           device=device, outdir=output, store=store, log=lambda m: con.print(m, markup=False),
                           formats=formats)
    out = _console(stderr=False)
    for r in results:
        where = f", kept at {r.seg_path}" if r.seg_path else ""
        out.print(f"series {r.series_uid}: SEG {r.seg_sop_uid} {'stored' if r.stored else 'not stored'}{where}")


@pacs_app.command("list")
def pacs_list_cmd(
    url: str = typer.Option(..., "--url", help="DICOMweb root URL."),
    query: Optional[List[str]] = typer.Option(None, "--query", help="QIDO filter KEY=VALUE (repeatable)."),
    credentials: Optional[Path] = typer.Option(None, "--credentials", help=CREDENTIALS_HELP),
) -> None:
    """List studies (UID, date, modalities; no patient names or IDs)."""
    from rich.table import Table

    from medseg.apps.pacs import DicomWeb, load_credentials, parse_query

    web = DicomWeb(url, load_credentials(credentials))
    studies = web.studies(parse_query(query))
    table = Table(title=f"{len(studies)} studies")
    for col in ("StudyInstanceUID", "date", "modalities", "series"):
        table.add_column(col, overflow="fold")

    def val(entry, tag):
        v = entry.get(tag, {}).get("Value", [""])
        return " ".join(map(str, v))

    for e in studies:
        table.add_row(val(e, "0020000D"), val(e, "00080020"), val(e, "00080061"), val(e, "00201206"))
    _console(stderr=False).print(table)


@app.command("import-annotations")
def import_annotations_cmd(
    source: Path = typer.Argument(..., help="Labelme JSON file or folder, COCO JSON (CVAT 'COCO 1.0') or CVAT XML "
                                  "('CVAT for images 1.1')."),
    output: Path = typer.Option(..., "-o", "--output", help="Dataset folder to write: masks/, images/, classes.json."),
    fmt: str = typer.Option("auto", "--format", help="auto | labelme | coco | cvat-xml."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class list (one name a line, first = class 0, "
                                           "or a classes.json) fixing the class indices."),
) -> None:
    """Turn polygon/mask annotations into index mask PNGs and a class list (a 2D training set)."""
    from medseg.seg2d.annotations import import_annotations, read_class_list

    res = import_annotations(source, output, fmt=fmt, classes=read_class_list(classes) if classes else None)
    con = _console(stderr=False)
    for note in res.skipped:
        con.print(f"skipped: {note}", markup=False)
    con.print(f"{len(res.masks)} mask(s), {len(res.images)} image(s) copied; classes: "
              + ", ".join(f"{k} {v}" for k, v in res.classes.items()), markup=False)
    con.print(f"wrote {res.outdir / 'masks'} and {res.outdir / 'classes.json'}", markup=False)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print the trained models as JSON (name, kind, file, inputs, "
                                 "outputs), for programs such as the 3D Slicer module."),
) -> None:
    """List registry architectures, bundled trained models and the models installed by 'medseg import-model'."""
    import json

    from rich.table import Table

    from medseg.models.loading import model_summaries, user_models_dir
    from medseg.models.registry import MODELS

    summaries = model_summaries()
    con = _console(stderr=False)
    if as_json:
        print(json.dumps(summaries, indent=1))
        return
    t = Table(title="architectures (model.name in a config)")
    for col in ("name", "dims", "description"):
        t.add_column(col)
    for spec in MODELS.values():
        t.add_row(spec.name, f"{spec.dims}D", spec.description)
    con.print(t)
    for kind, title in (("bundled", "bundled trained models (--model NAME)"),
                        ("installed", f"installed models (--model NAME; {user_models_dir()})")):
        rows = [m for m in summaries if m["kind"] == kind]
        if kind == "installed" and not rows:
            con.print(f"no installed models in {user_models_dir()} ('medseg import-model' puts them there)")
            continue
        b = Table(title=title)
        for col in ("name", "inputs (in order)", "outputs", "size", "file"):
            b.add_column(col)
        for m in rows:
            inputs = ", ".join(f"{n}{' (reference grid)' if n == m['reference'] and len(m['inputs']) > 1 else ''}"
                               for n in m["inputs"]) if m["sequences"] else f"one {m['modality']} image"
            outputs = ("regions: " if m["regions"] else "labels: ") + ", ".join(m["outputs"])
            b.add_row(m["name"] + (" (default)" if m.get("default") else ""), inputs, outputs,
                      f"{m['size_mb']:.1f} MB", m["path"])
        con.print(b)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Bundled model name or .pt checkpoint (an ensemble exports all its members)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="File to write (default: MODEL.onnx or MODEL.ts "
                                          "in the current folder)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript."),
) -> None:
    """Export a model to ONNX or TorchScript, with its config inside: it predicts on its own.

    medseg predict scans/ -o out/ --model MODEL.onnx runs it with ONNX Runtime (often much faster on CPUs).
    """
    from medseg.inference.export import FORMATS, export_model
    from medseg.models.loading import resolve_model

    fmt = fmt.lower()
    if output is None:
        output = Path(resolve_model(model).stem + FORMATS.get(fmt, ".onnx"))
    out = export_model(model, output, fmt)
    _console(stderr=False).print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@app.command("pack-model")
def pack_model(
    paths: List[Path] = typer.Argument(..., help="SOURCE... OUTPUT: a best.pt/last.pt written by 'medseg train', "
                                       "several to ensemble (networks may differ if labels, preprocessing and patch "
                                       "size match), or a 'train --folds' folder (all folds and its chosen "
                                       "postprocessing); the last path is the model file to write."),
    int8: bool = typer.Option(False, "--int8", help="Store convolution weights as int8 with one scale per output "
                              "channel: about half the size of float16, labels nearly unchanged (check with "
                              "'medseg evaluate')."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Change a prediction setting of the packed config: "
                                   "--set inference.overlap=0.25 (repeatable; inference.* keys only)."),
) -> None:
    """Write a compact predict-only model: float16 (or int8) weights and config, no optimizer state."""
    from medseg.core.errors import MedsegError
    from medseg.models.checkpoint import pack, pack_sources

    if len(paths) < 2:
        raise MedsegError("pack-model needs sources and an output", expected="SOURCE... OUTPUT.pt",
                          found=" ".join(map(str, paths)), fix="e.g. medseg pack-model runs/x/best.pt model.pt")
    *checkpoint, output = paths
    sources, postprocess = pack_sources(checkpoint)
    out = pack(sources, output, postprocess=postprocess, int8=int8, inference=set_)
    _console(stderr=False).print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@app.command("import-model")
def import_model(
    kind: str = typer.Argument(..., help="nnunet (an nnU-Net v2 results folder) | monai-bundle (a MONAI bundle "
                               "folder)."),
    source: Path = typer.Argument(..., help="nnunet: nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION "
                                  "(or the dataset folder with --configuration); monai-bundle: the bundle's root "
                                  "folder (configs/inference.json, models/model.pt)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Model file to write (.pt); default: "
                                          "NAME.pt in the installed models' folder ($MEDSEG_MODELS_DIR or "
                                          "~/.medseg/models), so that --model NAME finds it."),
    configuration: Optional[str] = typer.Option(None, "--configuration", "-c", help="nnunet: 3d_fullres or "
                                                "3d_lowres (default: the folder's)."),
    folds: Optional[List[int]] = typer.Option(None, "--folds", "-f", help="nnunet: folds to ensemble (repeatable; "
                                              "default: every fold_N with a checkpoint, as nnU-Net's 0-4)."),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="nnunet: checkpoint file in each "
                                   "fold folder."),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="Reorient inputs first, e.g. RAS, for a "
                                              "model trained on reoriented images (default: the voxel order as "
                                              "stored, as nnU-Net takes it)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: dataset and configuration)."),
) -> None:
    """Bring a model trained elsewhere into medseg: every input, output format and batch path then works with it."""
    from medseg.core.errors import ConfigError

    kind = kind.lower()
    if output is None:
        import re

        from medseg.models.loading import user_models_dir

        default = (source.parent.name + "_" + source.name.rsplit("__", 1)[-1]) if kind == "nnunet" else source.name
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or default).strip("_.") or "imported"
        output = user_models_dir() / f"{stem}.pt"
        output.parent.mkdir(parents=True, exist_ok=True)
        name = name or stem
    if kind == "monai-bundle":
        from medseg.models.monai_bundle import import_bundle

        out = import_bundle(source, output, name=name)
    elif kind == "nnunet":
        from medseg.models.nnunet import import_nnunet

        out = import_nnunet(source, output, configuration=configuration, folds=folds or None, checkpoint=checkpoint,
                            orientation=orientation, name=name)
    else:
        raise ConfigError("unknown model kind to import", expected="nnunet | monai-bundle", found=repr(kind),
                          fix="medseg import-model nnunet RESULTS_DIR -o model.pt")
    _console(stderr=False).print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    from medseg.core.errors import MedsegError

    import os

    from rich.markup import escape

    def fail(text: str, code: int) -> None:  # one line, no traceback; file names may hold '[' (no markup)
        _console().print(f"[bold red]error:[/] {escape(' '.join(text.split()))}", markup=True, soft_wrap=True,
                         highlight=False)
        sys.exit(code)

    try:
        app()
    except MedsegError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _console().print("interrupted")
        sys.exit(130)
    except OSError as exc:  # disk full, permission denied...: the environment, not medseg
        if os.environ.get("MEDSEG_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or type(exc).__name__}; fix: check permissions and free disk space", 2)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line; MEDSEG_DEBUG=1 shows the traceback
        if os.environ.get("MEDSEG_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        fail(f"internal error: {type(exc).__name__}: {first}; fix: this is a bug in medseg, please report it; "
             "MEDSEG_DEBUG=1 shows the traceback", 1)


if __name__ == "__main__":
    main()
