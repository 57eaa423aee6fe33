"""Finding the cases of a dataset and splitting them.

A case is its image (one file, a 4D file of every sequence, or one file per sequence) and its label.
Layouts: MSD/nnU-Net folders (``imagesTr``/``labelsTr``; nnU-Net's ``CASE_0000``, ``CASE_0001``... are the
sequences of one case), one folder per case (files matched to sequences by ``data.channels`` patterns), and
datalist JSON. Splits are by case, so a patient's sequences never land on both sides."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import ConfigError, DataError, InputNotFoundError, MedsegError
from medseg.io.sequences import group_nnunet, match_case_folder, nnunet_key, ordered_group
from medseg.io.volume import case_name, volume_suffix


@dataclass(frozen=True)
class Case:
    name: str
    image: str | tuple[str, ...]
    """One file (a 3D image, or a 4D image holding every sequence), or one file per sequence in the
    config's ``data.channels`` order."""
    label: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.image,) if isinstance(self.image, str) else tuple(self.image)

    def as_dict(self) -> dict:
        d = {"name": self.name, "image": self.image if isinstance(self.image, str) else list(self.image)}
        if self.label is not None:
            d["label"] = self.label
        return d


def volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and volume_suffix(p))


def image_key(path: Path) -> str:
    """``case_0000.nii.gz`` (nnU-Net sequence number) and ``case.nii.gz`` both belong to case ``case``."""
    key = nnunet_key(path)
    return key[0] if key else case_name(path)


class _Collect:
    """Raise the first problem (training), or collect them all and go on (``verify-data``)."""

    def __init__(self, problems: list | None) -> None:
        self.problems = problems

    def __call__(self, exc: MedsegError) -> None:
        if self.problems is None:
            raise exc
        self.problems.append(exc)


def _names(data_cfg) -> list[str]:
    return [c.name for c in getattr(data_cfg, "channels", None) or []] or ["image"]


def discover_msd(root: str | Path, data_cfg=None, problems: list | None = None) -> list[Case]:
    """Cases from ``root/imagesTr`` and ``root/labelsTr``, matched by name: ``case.nii.gz`` (one image, or a 4D
    image of every sequence) or nnU-Net's ``case_0000.nii.gz``, ``case_0001.nii.gz``... (one file per sequence,
    numbered in ``data.channels`` order), each with ``labelsTr/case.nii.gz``.

    ``problems``: collect every problem there instead of raising the first (``verify-data``); without a config
    (``data_cfg`` None) the number of sequences is read from the files."""
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not root.is_dir():
        raise InputNotFoundError("dataset folder not found", path=root,
                                 expected="a folder with imagesTr/ and labelsTr/, or one folder per case",
                                 fix="set data.root in the config or pass --set data.root=PATH")
    if not images_dir.is_dir() or not labels_dir.is_dir():
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "an empty folder"
        raise InputNotFoundError("not an MSD-style dataset folder", path=root,
                                 expected="subfolders imagesTr/ and labelsTr/", found=found,
                                 fix="arrange images and labels that way or use a datalist JSON (data.datalist)")
    report = _Collect(problems)
    labels = {case_name(p): p for p in volume_files(labels_dir)}
    files = volume_files(images_dir)
    singles = [f for f in files if case_name(f) in labels]  # a label of the same name: one file per case
    groups, rest = group_nnunet([f for f in files if case_name(f) not in labels])
    names = _names(data_cfg) if data_cfg is not None else \
        [f"{i:04d}" for i in range(max([len(g) for g in groups.values()] or [1]))]
    cases, unpaired = [], list(rest)
    for f in singles:
        cases.append(Case(case_name(f), str(f), str(labels[case_name(f)])))
    for key, group in sorted(groups.items()):
        if key not in labels:
            unpaired += [p for _, p in sorted(group.items())]
            continue
        try:
            if len(names) == 1 and len(group) > 1:
                raise DataError(f"case {key} has {len(group)} sequences, the config names one", path=images_dir,
                                expected=f"one image per case, or data.channels naming {len(group)} sequences",
                                found=", ".join(p.name for _, p in sorted(group.items())),
                                fix="name the sequences in order under data.channels, e.g. channels: [flair, t1c]")
            ordered = ordered_group(key, group, names, images_dir)
        except MedsegError as exc:
            report(exc)
            continue
        cases.append(Case(key, str(ordered[0]) if len(ordered) == 1 else tuple(map(str, ordered)), str(labels[key])))
    seen: dict[str, Case] = {}
    for c in cases:
        if c.name in seen:
            report(DataError(f"two images claim case {c.name}", path=images_dir,
                             found=f"{Path(seen[c.name].files[0]).name} and {Path(c.files[0]).name}",
                             fix="keep one naming: CASE.nii.gz, or CASE_0000.nii.gz, CASE_0001.nii.gz..."))
        seen[c.name] = c
    if unpaired and problems is not None:
        for p in unpaired:
            report(DataError("no label file with the same name in labelsTr/", path=p,
                             fix="add the label or move the image out of imagesTr/"))
    elif unpaired:
        report(DataError(f"{len(unpaired)} image(s) have no label with the same name", path=labels_dir,
                         expected="one label file per case (labelsTr/CASE.nii.gz for CASE_0000.nii.gz...)",
                         found=", ".join(p.name for p in unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""),
                         fix="add the missing labels or move those images out of imagesTr/"))
    if not cases and problems is None:
        raise DataError("no image/label pairs found", path=root, expected="NIfTI or NRRD files in imagesTr/ and labelsTr/",
                        fix="check the dataset folder")
    return sorted(seen.values(), key=lambda c: c.name)


def discover_case_folders(root: str | Path, data_cfg, problems: list | None = None, *,
                          need_label: bool = True) -> list[Case]:
    """Cases from one sub-folder per case (BraTS style), each file matched to a sequence by the patterns of
    ``data.channels`` and the label by ``data.label_patterns``."""
    root = Path(root)
    channels = list(getattr(data_cfg, "channels", None) or [])
    if not channels:
        raise ConfigError("case folders need named sequences", path=root,
                          expected="data.channels with file patterns, e.g. [{name: flair, patterns: ['*flair*']}]",
                          found="no data.channels", fix="name the sequences of a case in the config (--config)")
    report = _Collect(problems)
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not volume_files(folder):
            continue
        try:
            found, label = match_case_folder(folder, channels, data_cfg.label_patterns, need_label=need_label)
        except MedsegError as exc:
            report(exc)
            continue
        files = tuple(str(found[c.name]) for c in channels)
        cases.append(Case(folder.name, files[0] if len(files) == 1 else files, str(label) if label else None))
    if not cases and problems is None:
        raise DataError("no case folders found", path=root, expected="sub-folders holding one file per sequence",
                        fix="check data.root")
    return cases


def is_case_folder_dataset(root: str | Path) -> bool:
    """A folder of case folders (BraTS style) rather than an MSD/nnU-Net folder."""
    root = Path(root)
    return root.is_dir() and not (root / "imagesTr").is_dir() and any(
        p.is_dir() and not p.name.startswith(".") and volume_files(p) for p in root.iterdir())


def load_datalist(path: str | Path, base: str | Path | None = None, data_cfg=None) -> list[Case]:
    """Pairs from a JSON datalist: ``{"training": [{"image": ..., "label": ...}]}`` or a bare list. With several
    sequences, ``"image"`` is a list of files in ``data.channels`` order, or a mapping from sequence name to file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("datalist file not found", path=path, expected="a JSON file", fix="check data.datalist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError("datalist is not valid JSON", path=path, found=str(exc), fix="fix the JSON syntax") from None
    items = data.get("training") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError("datalist has no training entries", path=path,
                          expected='{"training": [{"image": ..., "label": ...}, ...]}', fix="add entries")
    base = Path(base) if base is not None else path.parent
    names = _names(data_cfg)
    cases = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ConfigError(f"datalist entry {i} lacks 'image' or 'label'", path=path, found=repr(item)[:120],
                              fix="give every entry an image and a label path")
        image = item["image"]
        if isinstance(image, dict):
            missing = [n for n in names if n not in image]
            if missing:
                raise DataError(f"datalist entry {i} has no {missing[0]} sequence", path=path,
                                expected=", ".join(names), found=", ".join(image), fix="add it to the entry's image")
            image = [image[n] for n in names]
        paths = [image] if isinstance(image, str) else list(image)
        if len(paths) > 1 and len(paths) != len(names):
            raise DataError(f"datalist entry {i} has {len(paths)} sequence files, the config names {len(names)}",
                            path=path, expected=f"{len(names)} ({', '.join(names)})", found=str(len(paths)),
                            fix="list one file per sequence in data.channels order, or name them under data.channels")
        imgs = [(base / p).resolve() for p in paths]
        lab = (base / item["label"]).resolve()
        for p in (*imgs, lab):
            if not p.is_file():
                raise InputNotFoundError(f"datalist entry {i} points to a missing file", path=p, fix="correct the datalist")
        name = item.get("name") or image_key(imgs[0])
        cases.append(Case(name, str(imgs[0]) if len(imgs) == 1 else tuple(map(str, imgs)), str(lab)))
    dup = sorted({c.name for c in cases if sum(d.name == c.name for d in cases) > 1})
    if dup:
        raise DataError(f"datalist names {len(dup)} case(s) twice", path=path, found=", ".join(dup[:5]),
                        fix="give each entry its own \"name\" (one entry per case, all its sequences in its image list)")
    return cases


def dataset_cases(data_cfg, problems: list | None = None) -> list[Case]:
    if data_cfg.datalist:
        return load_datalist(data_cfg.datalist, base=data_cfg.root, data_cfg=data_cfg)
    if data_cfg.root:
        if is_case_folder_dataset(data_cfg.root):
            return discover_case_folders(data_cfg.root, data_cfg, problems)
        return discover_msd(data_cfg.root, data_cfg, problems)
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
        raise DataError("invalid cross-validation fold", expected="0 <= fold < folds, folds >= 2",
                        found=f"fold {fold} of {folds}", fix="e.g. --folds 5")
    if len(ordered) < folds:
        raise DataError("too few cases for cross-validation", expected=f"at least {folds} cases",
                        found=str(len(ordered)), fix="lower the number of folds or add cases")
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(order[fold::folds].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val
