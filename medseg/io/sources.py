"""Turn what the user points at into things to segment.

An input may be a NIfTI/NRRD file, a folder of them, a DICOM series folder, a whole
study or archive folder (all series found, chosen by selection rules), or a mix. Each
becomes an :class:`InputItem` with a stable name that holds no patient information.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.core.errors import InputNotFoundError, MedsegError, UnreadableFileError, UnsupportedInputError
from medseg.io.rules import SelectionRules, select_series
from medseg.io.volume import Volume, case_name, load_volume, volume_suffix

log = logging.getLogger("medseg.io.dicom")


def short_hash(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


@dataclass
class InputItem:
    key: str
    """Stable identifier used in manifests (no patient data)."""
    name: str
    """Output base name, e.g. ``case`` for ``case.nii.gz`` or ``series-011-3f2a9c1b20``."""
    kind: str
    """``volume`` (NIfTI/NRRD file) or ``dicom`` (a series stack)."""
    path: Path
    """The file, or the folder holding the series (for messages)."""
    group: str = ""
    """Sub-folder of the output (study for DICOM, relative folder for files in a tree)."""
    series: Any = None
    files: list[Path] = field(default_factory=list)
    output_suffix: str = ".nii.gz"
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    """DICOM files beside the series whose header is damaged: one may be a lost slice of it."""
    parts: dict[str, "InputItem"] | None = None
    """Several sequences of one case: an item per sequence, in the model's order (``kind``, ``path`` and
    ``series`` are then the reference sequence's, ``files`` all of them)."""
    reference: str = ""
    """With ``parts``: the sequence whose grid the others are resampled onto and the output lies on."""
    channels: int = 1
    """A 4D file holding this many sequences (MSD layout)."""

    def load(self, **dicom_options) -> Volume:
        if self.parts:
            from medseg.io.sequences import load_sequences

            vols = {name: part.load(**dicom_options) for name, part in self.parts.items()}
            return load_sequences(vols, self.reference, self.name)
        if self.kind == "dicom":
            from medseg.io.dicom import load_dicom_series

            # a damaged file beside the series may have been one of its slices: then the slice is missing, and the
            # uneven rule decides; it is named in the volume's record either way
            return load_dicom_series(self.series, damaged=self.damaged, **dicom_options)
        return load_volume(self.path, channels=self.channels > 1)

    def input_hash(self) -> str:
        """SHA-256 over the input bytes (and relative names, for DICOM)."""
        h = hashlib.sha256()
        files = self.files or [self.path]
        for f in sorted(files):
            h.update(Path(f).name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def output_relpath(self) -> Path:
        return Path(self.group) / f"{self.name}{self.output_suffix}" if self.group else Path(f"{self.name}{self.output_suffix}")

    def mirrored_base(self, outdir: Path) -> Path:
        """``outdir/<study group>/<name>``: where ``batch`` writes this item's outputs (suffixes added per format)."""
        return Path(outdir) / self.output_relpath().with_name(self.name)


@dataclass
class Skipped:
    key: str
    path: Path
    reason: str
    series: Any = None


def _volume_item(path: Path, root: Path | None) -> InputItem:
    suffix = volume_suffix(path) or ".nii.gz"
    out_suffix = ".nrrd" if suffix in (".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd") else ".nii.gz"
    group = ""
    if root is not None:
        rel = path.parent.relative_to(root)
        group = "" if str(rel) == "." else str(rel)
    key = f"file:{(Path(group) / path.name).as_posix()}"
    return InputItem(key=key, name=case_name(path), kind="volume", path=path, group=group, output_suffix=out_suffix)


def dicom_item(series: Any) -> InputItem:
    uid = str(series.series_uid)
    stack = str(getattr(series, "stack_key", "") or "")
    number = getattr(series, "series_number", None)
    number_txt = f"{int(number):03d}" if isinstance(number, (int, float)) or str(number).isdigit() else "000"
    name = f"series-{number_txt}-{short_hash(uid + '|' + stack)}"
    group = f"study-{short_hash(str(series.study_uid))}"
    files = [Path(f) for f in series.files]
    folder = Path(files[0]).parent if files else Path(".")
    return InputItem(key=f"dicom:{short_hash(uid + '|' + stack, 16)}", name=name, kind="dicom", path=folder,
                     group=group, series=series, files=files)


def _is_volume_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and volume_suffix(p) is not None


def discover(inputs: list[str | Path], rules: SelectionRules | None = None, *, mirror_root: Path | None = None,
             recursive: bool = True, progress: bool = False) -> tuple[list[InputItem], list[Skipped]]:
    """Everything to segment under ``inputs``, and what was skipped with the reason (headers only are read;
    ``progress`` draws a bar over the files)."""
    from medseg.io.dicom import scan_path

    rules = rules or SelectionRules()
    items: list[InputItem] = []
    skipped: list[Skipped] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file():
            if p.stat().st_size == 0:
                raise UnreadableFileError("file is empty (0 bytes)", path=p, fix="re-export or re-copy the file")
            if volume_suffix(p):
                items.append(_volume_item(p, mirror_root))
                continue
            p_dir, dicom_roots = p.parent, [p.parent]  # a single DICOM file: its series folder
        elif p.is_dir():
            p_dir, dicom_roots = p, [p]
        else:
            raise InputNotFoundError("input not found", path=p, expected="a NIfTI/NRRD file, a DICOM folder or a folder of them",
                                     fix="check the path")
        vols = sorted(f for f in (p_dir.rglob("*") if recursive else p_dir.iterdir()) if _is_volume_file(f))
        base = mirror_root if mirror_root is not None else p_dir
        items.extend(_volume_item(f, base if f.is_relative_to(base) else f.parent) for f in vols)
        series, damaged = [], []
        for root in dicom_roots:
            found, broken = scan_path(root, progress)
            series += found
            damaged += broken
        folders = set()
        for decision in select_series(series, rules):
            item = dicom_item(decision.series)
            item.damaged = [(f, why) for f, why in damaged if f.parent == item.path]
            folders.add(item.path)
            if decision.selected:
                items.append(item)
            else:
                skipped.append(Skipped(item.key, item.path, "; ".join(decision.reasons), decision.series))
        lone: dict[Path, list[tuple[Path, str]]] = {}
        for path, why in damaged:
            if path.parent not in folders:  # those beside a series are named in its record
                lone.setdefault(path.parent, []).append((path, why))
        if vols or series:  # a folder of nothing but damaged files: recorded as skipped, never silently dropped
            for folder, files in sorted(lone.items()):
                log.warning("%s: %d damaged DICOM file(s) and no readable series", folder, len(files))
                more = f" ({len(files)} damaged files)" if len(files) > 1 else ""
                skipped.append(Skipped("damaged:" + short_hash(str(folder), 16), folder,
                                       f"cannot read DICOM header of {files[0][0].name}: {files[0][1]}{more}"))
        if not vols and not series:
            if damaged:
                raise UnreadableFileError("cannot read DICOM header", path=damaged[0][0], expected="a complete DICOM file",
                                          found=damaged[0][1] + (f" ({len(damaged)} damaged files)" if len(damaged) > 1 else ""),
                                          fix="re-export or re-copy the files")
            empty = [f for f in (p_dir.rglob("*") if recursive else p_dir.iterdir()) if f.is_file() and f.stat().st_size == 0]
            raise InputNotFoundError("no images found", path=p, expected="NIfTI/NRRD files or DICOM image series",
                                     found=f"{len(empty)} empty (0-byte) file(s), e.g. {empty[0].name}" if empty else None,
                                     fix="re-copy the files" if empty else "check the folder")
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            unique.append(it)
    if not unique and not skipped:
        raise UnsupportedInputError("nothing to segment", path=inputs[0] if inputs else None, fix="check the inputs")
    return unique, skipped


# ---------------------------------------------------------------------------
# cases of several sequences


def case_item(name: str, parts: dict[str, InputItem], reference: str, group: str = "") -> InputItem:
    """One case made of one item per sequence (files or DICOM series)."""
    ref = parts[reference]
    files = [Path(f) for part in parts.values() for f in (part.files or [part.path])]
    key = "case:" + short_hash("|".join(part.key for part in parts.values()), 16)
    return InputItem(key=key, name=name, kind=ref.kind, path=ref.path, group=group, series=ref.series, files=files,
                     output_suffix=ref.output_suffix, parts=dict(parts), reference=reference,
                     damaged=[d for part in parts.values() for d in part.damaged])


def _group_of(folder: Path, root: Path | None) -> str:
    if root is None or not folder.is_relative_to(root):
        return ""
    rel = folder.relative_to(root)
    return "" if str(rel) == "." else str(rel)


def discover_cases(inputs: list[str | Path], channels, reference: str, *, label_patterns=None,
                   rules: SelectionRules | None = None, mirror_root: Path | None = None,
                   recursive: bool = True) -> tuple[list[InputItem], list[Skipped]]:
    """The cases under ``inputs`` for a model that takes several sequences (``channels``, in order, each with
    ``name`` and ``file_patterns()``): 4D files, case folders (files matched by the sequences' patterns),
    nnU-Net-named files (``CASE_0000``... grouped by case), and DICOM studies whose series the rules'
    ``sequences:`` pick, one per sequence. Folders that hold image files but no complete case are skipped
    with the reason; an input given by name that holds no case is an error saying what was expected."""
    from medseg.io.dicom import scan_path
    from medseg.io.sequences import group_nnunet, match_case_folder, matches, ordered_group
    from medseg.io.sequences import volume_files as case_files

    rules = rules or SelectionRules()
    names = [c.name for c in channels]
    items: list[InputItem] = []
    skipped: list[Skipped] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and volume_suffix(p):
            item = _volume_item(p, mirror_root)
            item.channels = len(names)
            items.append(item)
            continue
        if not p.exists():
            raise InputNotFoundError("input not found", path=p, expected="a case folder, a 4D image, nnU-Net-named "
                                     "files or a DICOM study", fix="check the path")
        top = p if p.is_dir() else p.parent
        root = mirror_root if mirror_root is not None else top.parent
        folders = [top] + sorted(d for d in (top.rglob("*") if recursive else top.iterdir())
                                 if d.is_dir() and not d.name.startswith("."))
        found_before = len(items)
        reasons = []
        for folder in folders:
            files = [f for f in case_files(folder) if not (label_patterns and matches(f.name, label_patterns))]
            if not files:
                continue
            groups, rest = group_nnunet(files)
            complete = {k: g for k, g in groups.items() if len(g) == len(names)}
            if complete and not rest:
                for key, group in sorted(complete.items()):
                    ordered = ordered_group(key, group, names, folder)
                    parts = {n: _volume_item(f, root) for n, f in zip(names, ordered)}
                    items.append(case_item(key, parts, reference, _group_of(folder, root)))
                for key, group in sorted(groups.items()):
                    if key not in complete:
                        skipped.append(Skipped(f"case:{short_hash(str(folder / key), 16)}", folder,
                                               f"case {key}: {len(group)} of {len(names)} sequence files"))
                continue
            try:
                found, _ = match_case_folder(folder, channels, label_patterns)
            except MedsegError as exc:
                reasons.append(f"{folder.name}: {exc.problem}")
                if folder != top:
                    skipped.append(Skipped(f"case:{short_hash(str(folder), 16)}", folder, exc.problem))
                continue
            parts = {n: _volume_item(found[n], root) for n in names}
            items.append(case_item(folder.name, parts, reference, _group_of(folder.parent, root)))
        series, damaged = scan_path(top, recursive)
        if series:
            items_d, skipped_d = _dicom_cases(series, damaged, names, reference, rules)
            items += items_d
            skipped += skipped_d
        if len(items) == found_before and not any(s.path.is_relative_to(top) for s in skipped):
            patterns = "; ".join(f"{c.name}: {' | '.join(c.file_patterns())}" for c in channels)
            raise InputNotFoundError("no case found", path=p,
                                     expected=f"one file per sequence ({patterns}), nnU-Net files CASE_0000.. "
                                              f"CASE_{len(names) - 1:04d}, a 4D image, or a DICOM study",
                                     found="; ".join(reasons[:3]) or "no image files",
                                     fix="check the folder, or give each sequence with --channel NAME=FILE")
    seen: set[str] = set()
    unique = [it for it in items if not (it.key in seen or seen.add(it.key))]
    return unique, skipped


def _dicom_cases(series: list, damaged: list, names: list[str], reference: str,
                 rules: SelectionRules) -> tuple[list[InputItem], list[Skipped]]:
    """Per study, one series per sequence, picked by ``rules.sequences[NAME]`` (over the shared rules)."""
    from medseg.io.rules import rules_for_sequence

    items, skipped = [], []
    by_study: dict[str, list] = {}
    for s in series:
        by_study.setdefault(str(s.study_uid), []).append(s)
    for study, members in sorted(by_study.items()):
        key = f"case:{short_hash(study, 16)}"
        folder = Path(members[0].files[0]).parent if members[0].files else Path(".")
        if not rules.sequences:
            skipped.append(Skipped(key, folder, "the rules name no series per sequence (add 'sequences:' with one "
                                                f"rule set each for {', '.join(names)})"))
            continue
        parts, why = {}, []
        for name in names:
            chosen = [d for d in select_series(members, rules_for_sequence(rules, name)) if d.selected]
            if not chosen:
                why.append(f"no series for sequence {name}")
                continue
            item = dicom_item(chosen[0].series)
            item.damaged = [(f, w) for f, w in damaged if f.parent == item.path]
            parts[name] = item
        if why:
            skipped.append(Skipped(key, folder, "; ".join(why)))
            continue
        ref = parts[reference]
        items.append(case_item(f"case-{short_hash(study)}", parts, reference, ref.group))
    return items, skipped
