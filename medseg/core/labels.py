"""Label descriptions shared by every output format: value, name, colour and coded terminology.

Codes follow DICOM's segmentation conventions (category, type and optional type modifier,
each a (scheme, value, meaning) triple, SNOMED CT where one exists). 3D Slicer's
``.seg.nrrd`` and DICOM SEG writers both take :class:`LabelInfo` lists built here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Fallback colours for labels without one in the config (label 1 gets the first).
PALETTE = [
    (230, 80, 60), (60, 150, 240), (80, 200, 90), (240, 200, 40), (170, 90, 220), (40, 210, 210),
    (250, 140, 30), (220, 90, 160), (140, 110, 60), (120, 160, 40), (30, 110, 160), (200, 200, 200),
]


def label_colors(labels: dict[int, str], colors: dict[int, list[int]] | None = None) -> dict[int, tuple[int, int, int]]:
    out = {}
    for i, lab in enumerate(sorted(k for k in labels if k != 0)):
        c = (colors or {}).get(lab)
        out[lab] = tuple(int(v) for v in c) if c else PALETTE[i % len(PALETTE)]
    return out


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str


SCT = "SCT"
ANATOMICAL_STRUCTURE = Code(SCT, "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = Code(SCT, "49755003", "Morphologically Altered Structure")
TISSUE = Code(SCT, "85756007", "Tissue")

#: term key -> (category, type, modifier). Keys are what configs use in ``terminology``.
KNOWN_TERMS: dict[str, tuple[Code, Code, Code | None]] = {
    "hippocampus": (ANATOMICAL_STRUCTURE, Code(SCT, "5001000", "Hippocampus"), None),
    "hippocampus:anterior": (ANATOMICAL_STRUCTURE, Code(SCT, "5001000", "Hippocampus"), Code(SCT, "255549009", "Anterior")),
    "hippocampus:posterior": (ANATOMICAL_STRUCTURE, Code(SCT, "5001000", "Hippocampus"), Code(SCT, "255551008", "Posterior")),
    "tumor": (ALTERED_STRUCTURE, Code(SCT, "108369006", "Neoplasm"), None),
    "tumour": (ALTERED_STRUCTURE, Code(SCT, "108369006", "Neoplasm"), None),
    "lesion": (ALTERED_STRUCTURE, Code(SCT, "52988006", "Lesion"), None),
    "brain": (ANATOMICAL_STRUCTURE, Code(SCT, "12738006", "Brain"), None),
    "liver": (ANATOMICAL_STRUCTURE, Code(SCT, "10200004", "Liver"), None),
    "spleen": (ANATOMICAL_STRUCTURE, Code(SCT, "78961009", "Spleen"), None),
    "kidney": (ANATOMICAL_STRUCTURE, Code(SCT, "64033007", "Kidney"), None),
    "lung": (ANATOMICAL_STRUCTURE, Code(SCT, "39607008", "Lung"), None),
    "heart": (ANATOMICAL_STRUCTURE, Code(SCT, "80891009", "Heart"), None),
    "pancreas": (ANATOMICAL_STRUCTURE, Code(SCT, "15776009", "Pancreas"), None),
    "prostate": (ANATOMICAL_STRUCTURE, Code(SCT, "41216001", "Prostate"), None),
    "bone": (TISSUE, Code(SCT, "3138006", "Bone tissue"), None),
}
GENERIC = (TISSUE, TISSUE, None)


@dataclass(frozen=True)
class LabelInfo:
    value: int
    name: str
    color: tuple[int, int, int]
    category: Code
    type: Code
    modifier: Code | None = None
    term_key: str | None = None
    """The :data:`KNOWN_TERMS` key used, or None when the generic 'Tissue' code was assumed."""


def _term_for(value: int, name: str, model_name: str | None, terminology: dict | None):
    candidates = []
    if terminology and value in terminology:
        candidates.append(str(terminology[value]).lower())
    key = name.lower().strip()
    if model_name:
        candidates.append(f"{model_name.lower()}:{key}")
    candidates.append(key)
    for cand in candidates:
        if cand in KNOWN_TERMS:
            return cand, KNOWN_TERMS[cand]
    return None, GENERIC


def label_infos(labels: dict[int, str], colors: dict | None = None, terminology: dict | None = None,
                model_name: str | None = None) -> list[LabelInfo]:
    """Foreground labels (value > 0) with names, colours and codes, sorted by value."""
    cols = label_colors(labels, colors)
    out = []
    for value in sorted(v for v in labels if v != 0):
        key, (cat, typ, mod) = _term_for(value, labels[value], model_name, terminology)
        out.append(LabelInfo(int(value), labels[value], cols[value], cat, typ, mod, key))
    return out


def infos_from_config(cfg) -> list[LabelInfo]:
    return label_infos(dict(cfg.labels), cfg.colors, getattr(cfg, "terminology", None), cfg.name)
