"""Finding image/label pairs (MSD folders or datalist JSON) and splitting them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import ConfigError, DataError, InputNotFoundError
from medseg.io.volume import case_name, volume_suffix


@dataclass(frozen=True)
class Case:
    name: str
    image: str
    label: str | None = None

    def as_dict(self) -> dict:
        d = {"name": self.name, "image": self.image}
        if self.label is not None:
            d["label"] = self.label
        return d


def volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and volume_suffix(p))


def image_key(path: Path) -> str:
    """``case_0000.nii.gz`` (nnU-Net channel suffix) and ``case.nii.gz`` both pair with label ``case``."""
    name = case_name(path)
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        return name[:-5]
    return name


def discover_msd(root: str | Path) -> list[Case]:
    """Pairs from ``root/imagesTr`` and ``root/labelsTr``, matched by file name."""
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not root.is_dir():
        raise InputNotFoundError("dataset folder not found", path=root,
                                 expected="a folder with imagesTr/ and labelsTr/",
                                 fix="set data.root in the config or pass --set data.root=PATH")
    if not images_dir.is_dir() or not labels_dir.is_dir():
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "an empty folder"
        raise InputNotFoundError("not an MSD-style dataset folder", path=root,
                                 expected="subfolders imagesTr/ and labelsTr/", found=found,
                                 fix="arrange images and labels that way or use a datalist JSON (data.datalist)")
    labels = {case_name(p): p for p in volume_files(labels_dir)}
    cases, unpaired = [], []
    for img in volume_files(images_dir):
        key = image_key(img)
        lab = labels.get(key) or labels.get(case_name(img))
        if lab is None:
            unpaired.append(img.name)
            continue
        cases.append(Case(key, str(img), str(lab)))
    if unpaired:
        raise DataError(f"{len(unpaired)} image(s) have no label with the same name", path=labels_dir,
                        expected="one label file per image", found=", ".join(unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""),
                        fix="add the missing labels or move those images out of imagesTr/")
    if not cases:
        raise DataError("no image/label pairs found", path=root, expected="NIfTI or NRRD files in imagesTr/ and labelsTr/",
                        fix="check the dataset folder")
    return cases


def load_datalist(path: str | Path, base: str | Path | None = None) -> list[Case]:
    """Pairs from a JSON datalist: ``{"training": [{"image": ..., "label": ...}]}`` or a bare list."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("datalist file not found", path=path, expected="a JSON file", fix="check data.datalist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("datalist is not valid JSON", path=path, found=str(exc), fix="fix the JSON syntax") from None
    items = data.get("training") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError("datalist has no training entries", path=path,
                          expected='{"training": [{"image": ..., "label": ...}, ...]}', fix="add entries")
    base = Path(base) if base is not None else path.parent
    cases = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ConfigError(f"datalist entry {i} lacks 'image' or 'label'", path=path, found=repr(item)[:120],
                              fix="give every entry an image and a label path")
        img, lab = (base / item["image"]).resolve(), (base / item["label"]).resolve()
        for p in (img, lab):
            if not p.is_file():
                raise InputNotFoundError(f"datalist entry {i} points to a missing file", path=p, fix="correct the datalist")
        cases.append(Case(item.get("name") or case_name(img), str(img), str(lab)))
    return cases


def dataset_cases(data_cfg) -> list[Case]:
    if data_cfg.datalist:
        return load_datalist(data_cfg.datalist, base=data_cfg.root)
    if data_cfg.root:
        return discover_msd(data_cfg.root)
    raise ConfigError("no training data configured", expected="data.root or data.datalist",
                      fix="set one in the config or with --set data.root=PATH")


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split: the same names and seed give the same split on any machine."""
    ordered = sorted(cases, key=lambda c: c.name)
    if val_fraction <= 0:
        return ordered, []
    n_val = max(1, int(round(len(ordered) * val_fraction)))
    if n_val >= len(ordered):
        raise DataError("too few cases to split", expected=f"more than {n_val} cases", found=f"{len(ordered)}",
                        fix="add cases or lower data.val_fraction")
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def holdout_split(data_cfg) -> tuple[list[Case], list[Case]]:
    """The cases training and cross-validation may use, and the ``data.test_fraction`` set aside.

    The set-aside cases are the validation side of ``split_cases(cases, test_fraction, seed)``, so a
    cross-validation with ``test_fraction: 0.2`` never sees the cases a single run with
    ``val_fraction: 0.2`` and the same seed validates on: both can be scored on the same unseen set.
    """
    cases = dataset_cases(data_cfg)
    if data_cfg.test_fraction <= 0:
        return cases, []
    return split_cases(cases, data_cfg.test_fraction, data_cfg.seed)


def training_pool(data_cfg) -> list[Case]:
    """All cases less those ``data.test_fraction`` sets aside."""
    return holdout_split(data_cfg)[0]


def holdout_cases(data_cfg) -> list[Case]:
    """The cases ``data.test_fraction`` sets aside (empty when it is 0)."""
    return holdout_split(data_cfg)[1]


def kfold_split(cases: list[Case], folds: int, fold: int, seed: int) -> tuple[list[Case], list[Case]]:
    """Fold ``fold`` of a deterministic ``folds``-way split: every case is validated in exactly one fold."""
    ordered = sorted(cases, key=lambda c: c.name)
    if folds < 2 or not 0 <= fold < folds:
        raise DataError("invalid cross-validation fold", expected=f"0 <= fold < folds, folds >= 2",
                        found=f"fold {fold} of {folds}", fix="e.g. --folds 5")
    if len(ordered) < folds:
        raise DataError("too few cases for cross-validation", expected=f"at least {folds} cases",
                        found=str(len(ordered)), fix="lower the number of folds or add cases")
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(order[fold::folds].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val
