"""``medseg verify-data``: check every image/label pair and report all problems at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.preprocessing.datasets import image_key, volume_files
from medseg.core.errors import InputNotFoundError, MedsegError
from medseg.io.volume import case_name, load_volume


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.message}"


def verify_dataset(root: str | Path, labels: dict[int, str] | None = None, *, progress: bool = True,
                   atol: float = 1e-3) -> tuple[int, list[Problem]]:
    """Return (number of pairs checked, problems). Never stops at the first problem."""
    from medseg.core.progress import progress_bar

    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise InputNotFoundError("not an MSD-style dataset folder", path=root,
                                 expected="subfolders imagesTr/ and labelsTr/", fix="check the path")
    problems: list[Problem] = []
    label_files = {case_name(p): p for p in volume_files(labels_dir)}
    pairs, used = [], set()
    for img in volume_files(images_dir):
        key = image_key(img)
        lab = label_files.get(key) or label_files.get(case_name(img))
        if lab is None:
            problems.append(Problem(str(img), "no label file with the same name in labelsTr/"))
            continue
        used.add(case_name(lab))
        pairs.append((img, lab))
    for key, lab in label_files.items():
        if key not in used:
            problems.append(Problem(str(lab), "label has no image in imagesTr/"))
    allowed = set(labels) if labels else None
    with progress_bar("verify", total=len(pairs), enabled=progress) as advance:
        for img_path, lab_path in pairs:
            problems.extend(check_pair(img_path, lab_path, allowed, atol))
            advance(img_path.name)
    return len(pairs), problems


def check_pair(img_path: Path, lab_path: Path, allowed: set[int] | None, atol: float = 1e-3) -> list[Problem]:
    out: list[Problem] = []
    try:
        img = load_volume(img_path)
    except MedsegError as exc:
        return [Problem(str(img_path), exc.problem + (f" ({exc.found})" if exc.found else ""))]
    try:
        lab = load_volume(lab_path)
    except MedsegError as exc:
        return [Problem(str(lab_path), exc.problem + (f" ({exc.found})" if exc.found else ""))]
    if img.shape != lab.shape:
        out.append(Problem(str(lab_path), f"shape {lab.shape} differs from image shape {img.shape}"))
    elif not np.allclose(img.affine, lab.affine, atol=atol):
        diff = float(np.abs(img.affine - lab.affine).max())
        out.append(Problem(str(lab_path), f"geometry (affine) differs from the image by up to {diff:.4g} mm; "
                                          "resample the label onto the image grid"))
    arr = np.asarray(img.array)
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            out.append(Problem(str(img_path), f"{bad} NaN/Inf voxels"))
    lv = np.asarray(lab.array)
    if lv.dtype.kind == "f":
        if not np.all(np.isfinite(lv)):
            out.append(Problem(str(lab_path), "label contains NaN/Inf"))
            return out
        if not np.all(lv == np.round(lv)):
            out.append(Problem(str(lab_path), "label has non-integer values; labels must be integer classes"))
            return out
    values = set(np.unique(lv).astype(np.int64).tolist())
    if allowed is not None and not values <= allowed:
        out.append(Problem(str(lab_path), f"label values {sorted(values - allowed)} are not in the configured "
                                          f"labels {sorted(allowed)}"))
    if values <= {0}:
        out.append(Problem(str(lab_path), "label is empty (background only)", severity="warning"))
    return out


def check_training_inputs(cfg, output_dir: str | Path) -> None:
    """Refuse, before anything is written, training data that would fail or mislead part-way.

    Every image/label pair is read once: unreadable files, NaN/Inf voxels, 2D or 4D images,
    image/label geometry mismatch and label values outside ``cfg.labels`` are errors that name
    the file. The output folder must be writable and may not be (or lie inside) a data folder.
    """
    from medseg.preprocessing.datasets import dataset_cases
    from medseg.core.errors import DataError, OutputError
    from medseg.io.volume import check_writable_folder

    out = Path(output_dir)
    check_writable_folder(out, "train.output_dir")
    cases = dataset_cases(cfg.data)
    data_dirs = {Path(p).resolve().parent for c in cases for p in (c.image, c.label) if p}
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
            continue
        errors = [p for p in check_pair(Path(case.image), Path(case.label), allowed) if p.severity == "error"]
        if errors:
            more = f" ({len(errors) - 1} more problem(s) in this pair)" if len(errors) > 1 else ""
            raise DataError(errors[0].message + more, path=errors[0].file,
                            fix="repair or remove this case; 'medseg verify-data DATASET --config CONFIG' lists every problem")
