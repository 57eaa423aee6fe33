"""``medseg verify-data``: check every case of a dataset and report all problems at once.

A case is checked as a whole: every sequence is there and readable, the sequences lie on one
grid or can be resampled onto the reference sequence's grid (they overlap), the label lies on
the reference grid and holds only configured label values, and no two files claim one case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import InputNotFoundError, MedsegError
from medseg.io.volume import Volume, case_name, load_volume, same_grid


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    severity: str = "error"  # or "warning"
    case: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        where = f"case {self.case}: " if self.case else ""
        return f"{self.severity}: {where}{self.file}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


def _from_error(exc: MedsegError, case: str | None = None) -> Problem:
    return Problem(str(exc.path or ""), exc.problem + (f" ({exc.found})" if exc.found else ""), case=case,
                   fix=getattr(exc, "fix", None))


def verify_dataset(root: str | Path, labels: dict[int, str] | None = None, *, config=None, progress: bool = True,
                   atol: float = 1e-3) -> tuple[int, list[Problem]]:
    """Return (number of cases checked, problems). Never stops at the first problem.

    ``config`` (a :class:`~medseg.core.config.Config`) names the sequences and their file patterns and gives
    the allowed label values; without it a case is one image, or nnU-Net's numbered files of one case."""
    from medseg.core.config import DataConfig
    from medseg.core.progress import progress_bar
    from medseg.preprocessing.datasets import (
        discover_case_folders,
        discover_msd,
        image_key,
        is_case_folder_dataset,
        volume_files,
    )

    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError("dataset folder not found", path=root,
                                 expected="a folder with imagesTr/ and labelsTr/, or one folder per case",
                                 fix="check the path")
    data_cfg = copy.deepcopy(config.data) if config is not None else None
    if data_cfg is not None:
        data_cfg.root, data_cfg.datalist = str(root), None
    errors: list[MedsegError] = []
    if is_case_folder_dataset(root):
        cases = discover_case_folders(root, data_cfg or DataConfig(), errors)
    elif (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        cases = discover_msd(root, data_cfg, errors)
    else:
        raise InputNotFoundError("not a dataset folder", path=root,
                                 expected="subfolders imagesTr/ and labelsTr/, or one folder per case",
                                 fix="check the path")
    problems = [_from_error(e) for e in errors]
    if (root / "labelsTr").is_dir() and (root / "imagesTr").is_dir():
        keys = {image_key(p) for p in volume_files(root / "imagesTr")} | \
            {case_name(p) for p in volume_files(root / "imagesTr")}
        for lab in volume_files(root / "labelsTr"):
            if case_name(lab) not in keys:
                problems.append(Problem(str(lab), "label has no image in imagesTr/"))
    if config is not None:
        names, reference = config.channel_names, config.reference_channel
        allowed = set(int(k) for k in config.labels)
    else:
        names = None
        reference = None
        allowed = set(labels) if labels else None
    with progress_bar("verify", total=len(cases), enabled=progress) as advance:
        for case in cases:
            case_names = names or ([f"{i:04d}" for i in range(len(case.files))] if len(case.files) > 1 else ["image"])
            problems.extend(check_case(case, case_names, reference or case_names[0], allowed, atol))
            advance(case.name)
    return len(cases), problems


def check_case(case, names: list[str], reference: str, allowed: set[int] | None,
               atol: float = 1e-3) -> list[Problem]:
    """Every problem of one case: its sequences, their grids, its label."""
    from medseg.io.sequences import MIN_OVERLAP, coverage

    out: list[Problem] = []
    vols: dict[str, Volume] = {}
    if len(case.files) == 1:  # one file: a 3D image, or a 4D image of every sequence
        try:
            vol = load_volume(case.files[0], channels=len(names) > 1)
        except MedsegError as exc:
            return [_from_error(exc, case.name)]
        if vol.channels != len(names):
            return [Problem(case.files[0], f"{vol.channels} sequence(s) on the fourth axis, expected {len(names)} "
                                           f"({', '.join(names)})", case=case.name)]
        vols = {reference: vol}
    else:
        for name, path in zip(names, case.files):
            try:
                vols[name] = load_volume(path)
            except MedsegError as exc:
                out.append(_from_error(exc, case.name))
        if len(vols) < len(names):
            return out
    ref = vols[reference]
    for name, vol in vols.items():
        arr = np.asarray(vol.array)
        if arr.dtype.kind == "f":
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                out.append(Problem(str(vol.source), f"{bad} NaN/Inf voxels in sequence {name}", case=case.name))
        if name == reference or same_grid(vol, ref, atol):
            continue
        cov = coverage(vol, ref)
        if cov < MIN_OVERLAP:
            out.append(Problem(str(vol.source), f"sequence {name} does not overlap the {reference} grid "
                                                f"({cov:.0%} of it covered)", case=case.name))
        else:
            out.append(Problem(str(vol.source), f"sequence {name} lies on another grid than {reference}; it is "
                                                f"resampled onto it ({cov:.0%} covered)", severity="warning",
                               case=case.name))
    if case.label is None:
        return out
    try:
        lab = load_volume(case.label)
    except MedsegError as exc:
        return out + [_from_error(exc, case.name)]
    lab_path = str(case.label)
    if lab.shape != ref.shape:
        out.append(Problem(lab_path, f"shape {lab.shape} differs from image shape {ref.shape}", case=case.name))
    elif not np.allclose(lab.affine, ref.affine, atol=atol):
        diff = float(np.abs(lab.affine - ref.affine).max())
        out.append(Problem(lab_path, f"geometry (affine) differs from the image by up to {diff:.4g} mm; "
                                     "resample the label onto the image grid", case=case.name))
    lv = np.asarray(lab.array)
    if lv.dtype.kind == "f":
        if not np.all(np.isfinite(lv)):
            out.append(Problem(lab_path, "label contains NaN/Inf", case=case.name))
            return out
        if not np.all(lv == np.round(lv)):
            out.append(Problem(lab_path, "label has non-integer values; labels must be integer classes", case=case.name))
            return out
    values = set(np.unique(lv).astype(np.int64).tolist())
    if allowed is not None and not values <= allowed:
        out.append(Problem(lab_path, f"label values {sorted(values - allowed)} are not in the configured "
                                     f"labels {sorted(allowed)}", case=case.name))
    if values <= {0}:
        out.append(Problem(lab_path, "label is empty (background only)", severity="warning", case=case.name))
    return out


def check_training_inputs(cfg, output_dir: str | Path) -> None:
    """Refuse, before anything is written, training data that would fail or mislead part-way.

    Every case is read once: unreadable files, a missing sequence, NaN/Inf voxels, sequences that do not
    overlap, image/label geometry mismatch and label values outside ``cfg.labels`` are errors that name
    the case and the file. The output folder must be writable and may not be (or lie inside) a data folder.
    """
    from medseg.core.errors import DataError, OutputError
    from medseg.io.volume import check_writable_folder
    from medseg.preprocessing.datasets import dataset_cases

    out = Path(output_dir)
    check_writable_folder(out, "train.output_dir")
    cases = dataset_cases(cfg.data)
    data_dirs = {Path(p).resolve().parent for c in cases for p in (*c.files, c.label) if p}
    if cfg.data.root and not cfg.data.datalist:
        data_dirs.add(Path(cfg.data.root).resolve())
    o = out.resolve()
    for d in sorted(data_dirs):
        if o == d or o.is_relative_to(d):
            raise OutputError("train.output_dir is a data folder", path=out, found=f"inside {d}",
                              fix="write checkpoints outside the training data, e.g. --set train.output_dir=runs/NAME")
    allowed = set(int(k) for k in cfg.labels)
    for case in cases:
        if case.label is None:
            raise DataError(f"case {case.name} has no label", path=case.files[0], fix="add its label file")
        errors = [p for p in check_case(case, cfg.channel_names, cfg.reference_channel, allowed)
                  if p.severity == "error"]
        if errors:
            more = f" ({len(errors) - 1} more problem(s) in this case)" if len(errors) > 1 else ""
            raise DataError(f"case {case.name}: " + errors[0].message + more, path=errors[0].file,
                            fix="repair or remove this case; 'medseg verify-data DATASET --config CONFIG' lists every problem")
