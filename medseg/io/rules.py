"""Series selection rules: which series of a study a model should read.

A rules file is YAML, for example::

    modality: [MR]
    description_include: "t1|mprage"      # regex, case-insensitive
    description_exclude: "localizer|scout|survey"
    body_part: [BRAIN, HEAD]
    orientation: [axial, sagittal, coronal, oblique]
    min_slices: 20
    slice_thickness: [0.5, 3.0]            # mm, inclusive
    contrast: any                          # any | with | without
    pick: largest                          # when several series of a study pass: largest | first | all

Each series gets a decision (selected or not) and the reasons, so ``medseg inspect``
can show why a series was or was not taken.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.core.errors import ConfigError, InputNotFoundError

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")


@dataclass
class SelectionRules:
    modality: list[str] | None = None
    description_include: str | None = None
    description_exclude: str | None = "localizer|localiser|scout|survey|topogram|dose report"
    body_part: list[str] | None = None
    orientation: list[str] | None = None
    min_slices: int = 3
    slice_thickness: list[float] | None = None
    contrast: str = "any"
    pick: str = "all"
    sequences: dict[str, dict] | None = None
    """Models that take several sequences: per sequence name, rules (the keys above) that pick its series in
    each study, over the shared ones; e.g. ``{flair: {description_include: flair}, t1c: {contrast: with}}``."""

    def validate(self, source: str = "rules") -> None:
        for name in ("description_include", "description_exclude"):
            pattern = getattr(self, name)
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"'{name}' is not a valid regular expression", path=source,
                                      found=f"{pattern!r} ({exc})", fix="fix the pattern") from None
        if self.orientation and not set(self.orientation) <= set(ORIENTATIONS):
            raise ConfigError("unknown orientation in rules", path=source, expected=" | ".join(ORIENTATIONS),
                              found=str(self.orientation), fix="use those names")
        if self.contrast not in ("any", "with", "without"):
            raise ConfigError("bad 'contrast' in rules", path=source, expected="any | with | without",
                              found=repr(self.contrast), fix="use one of those")
        if self.pick not in ("largest", "first", "all"):
            raise ConfigError("bad 'pick' in rules", path=source, expected="largest | first | all",
                              found=repr(self.pick), fix="use one of those")
        for name, overrides in (self.sequences or {}).items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"rules for sequence '{name}' must be a mapping", path=source,
                                  found=repr(overrides), fix="e.g. sequences: {flair: {description_include: flair}}")
            rules_for_sequence(self, name).validate(f"{source} (sequences.{name})")
        if self.slice_thickness is not None and len(self.slice_thickness) != 2:
            raise ConfigError("'slice_thickness' must be [min, max] in mm", path=source,
                              found=str(self.slice_thickness), fix="e.g. slice_thickness: [0.5, 3.0]")


def load_rules(path: str | Path | None) -> SelectionRules:
    if path is None:
        return SelectionRules()
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("rules file not found", path=path, expected="a YAML file", fix="check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("rules file is not valid YAML", path=path, found=str(exc).splitlines()[0],
                          fix="fix the YAML syntax") from None
    from medseg.core.config import dataclass_from_dict

    if not isinstance(data, dict):
        raise ConfigError("rules file must be a mapping", path=path, found=type(data).__name__,
                          fix="write keys such as 'modality: [MR]'")
    for key in ("modality", "body_part", "orientation"):
        if isinstance(data.get(key), str):  # 'modality: MR' means [MR]
            data[key] = [data[key]]
    rules = dataclass_from_dict(SelectionRules, data, str(path))
    rules.validate(str(path))
    return rules


def rules_for_sequence(rules: SelectionRules, name: str) -> SelectionRules:
    """The rules that pick sequence ``name``'s series: ``rules.sequences[name]`` over the shared rules; one
    series per study (``pick: all`` becomes ``largest``)."""
    from medseg.core.config import dataclass_from_dict

    shared = {k: v for k, v in dataclasses.asdict(rules).items() if k != "sequences"}
    own = dict((rules.sequences or {}).get(name) or {})
    for key in ("modality", "body_part", "orientation"):
        if isinstance(own.get(key), str):
            own[key] = [own[key]]
    out = dataclass_from_dict(SelectionRules, {**shared, **own}, f"rules (sequences.{name})")
    if out.pick == "all":
        out.pick = "largest"
    return out


def orientation_name(iop: Any, tol_deg: float = 20.0) -> str:
    """axial / coronal / sagittal / oblique from ImageOrientationPatient (slice normal direction)."""
    if iop is None or len(iop) != 6:
        return "unknown"
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    n = np.linalg.norm(normal)
    if n == 0:
        return "unknown"
    normal = np.abs(normal / n)
    axis = int(np.argmax(normal))
    if np.degrees(np.arccos(min(1.0, normal[axis]))) > tol_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class Decision:
    series: Any
    selected: bool
    reasons: list[str] = field(default_factory=list)


def _attr(series: Any, name: str, default=None):
    return getattr(series, name, default)


def check_series(series: Any, rules: SelectionRules) -> list[str]:
    """Reasons to reject ``series`` (empty when it passes every rule)."""
    reasons = []
    skip = _attr(series, "skip_reason")
    if skip:
        return [skip]
    modality = (_attr(series, "modality") or "").upper()
    if rules.modality and modality not in {m.upper() for m in rules.modality}:
        reasons.append(f"modality {modality or '?'} not in {rules.modality}")
    desc = _attr(series, "series_description") or ""
    if rules.description_include and not re.search(rules.description_include, desc, re.IGNORECASE):
        reasons.append(f"description does not match /{rules.description_include}/")
    if rules.description_exclude and re.search(rules.description_exclude, desc, re.IGNORECASE):
        reasons.append(f"description matches excluded /{rules.description_exclude}/")
    body = (_attr(series, "body_part") or "").upper()
    if rules.body_part and body not in {b.upper() for b in rules.body_part}:
        reasons.append(f"body part {body or '?'} not in {rules.body_part}")
    orient = orientation_name(_attr(series, "orientation"))
    if rules.orientation and orient not in rules.orientation:
        reasons.append(f"orientation {orient} not in {rules.orientation}")
    n = int(_attr(series, "n_slices", None) or _attr(series, "n_files", 0) or 0)
    if n < rules.min_slices:
        reasons.append(f"{n} slice(s) < min_slices {rules.min_slices}")
    thick = _attr(series, "slice_thickness")
    if rules.slice_thickness is not None:
        lo, hi = rules.slice_thickness
        if thick is None or not lo <= float(thick) <= hi:
            reasons.append(f"slice thickness {thick} mm outside [{lo}, {hi}]")
    has_contrast = bool((_attr(series, "contrast") or "").strip())
    if rules.contrast == "with" and not has_contrast:
        reasons.append("no contrast agent recorded")
    if rules.contrast == "without" and has_contrast:
        reasons.append("contrast agent recorded")
    return reasons


def select_series(series_list: list, rules: SelectionRules) -> list[Decision]:
    """Decide for every series; per study, keep one (``largest``/``first``) or ``all`` that pass."""
    decisions = [Decision(s, not (r := check_series(s, rules)), r) for s in series_list]
    if rules.pick == "all":
        for d in decisions:
            if d.selected:
                d.reasons = ["passes all rules"]
        return decisions
    by_study: dict[str, list[Decision]] = {}
    for d in decisions:
        if d.selected:
            by_study.setdefault(str(_attr(d.series, "study_uid", "")), []).append(d)
    for passing in by_study.values():
        if rules.pick == "largest":
            passing.sort(key=lambda d: -int(_attr(d.series, "n_slices", None) or _attr(d.series, "n_files", 0) or 0))
        winner, others = passing[0], passing[1:]
        winner.reasons = ["passes all rules" + (f"; chosen over {len(others)} other(s) ({rules.pick})" if others else "")]
        for d in others:
            d.selected = False
            d.reasons = [f"passes rules but another series of the study was chosen ({rules.pick})"]
    return decisions


def rules_to_dict(rules: SelectionRules) -> dict:
    return dataclasses.asdict(rules)
