"""3D Slicer segmentation files (``.seg.nrrd``) and colour tables (``.ctbl``, ``.csv``).

Both directions go through slicerio (Slicer's own Python package for these files). The ``.seg.nrrd``
writer reproduces what Slicer 5 writes for a labelmap segmentation whose
segments do not overlap: one 3D layer holding the label values, LPS geometry, and the
``SegmentN_*`` / ``Segmentation_*`` key/value fields (see Slicer's
``vtkMRMLSegmentationStorageNode``). Every segment gets the extent of the shared layer, as
Slicer writes it: Slicer's reader crops the whole layer to the extent of the layer's *first*
segment, so a tighter per-segment extent (or ``0 -1 0 -1 0 -1`` for an empty segment) would
lose the voxels of the other segments. The reader also takes the files of several layers that Slicer
writes when segments overlap.
"""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError, InputNotFoundError, OutputError, UnreadableFileError, UnsupportedInputError
from medseg.io.volume import LPS_TO_RAS, Volume, atomic_write, check_same_grid
from medseg.core.labels import GENERIC, KNOWN_TERMS, Code, LabelInfo

SEGMENT_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
EMPTY_EXTENT = (0, -1, 0, -1, 0, -1)
TERM_COLUMNS = [f"{part}_{field}" for part in ("Category", "Type", "TypeModifier", "Region", "RegionModifier")
                for field in ("CodingScheme", "CodeValue", "CodeMeaning")]
CSV_COLUMNS = ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A", *TERM_COLUMNS]
# Slicer 5's default conversion parameters, name|value|description ("Reference image geometry" is set per file)
_CONVERSION = (
    ("Collapse labelmaps|1|Merge the labelmaps into as few shared labelmaps as possible 1 = created labelmaps will "
     "be shared if possible without overwriting each other."),
    ("Compute surface normals|1|Compute surface normals. 1 (default) = surface normals are computed. 0 = surface "
     "normals are not computed (slightly faster but produces less smooth surface display)."),
    ("Crop to reference image geometry|0|Crop the model to the extent of reference geometry. 0 (default) = created "
     "labelmap will contain the entire model. 1 = created labelmap extent will be within reference image extent."),
    ("Decimation factor|0.0|Desired reduction in the total number of polygons. Range: 0.0 (no decimation) to 1.0 (as "
     "much simplification as possible). Value of 0.8 typically reduces data set size by 80% without losing too much "
     "details."),
    "Default slice thickness|0.0|Default thickness for contours if slice spacing cannot be calculated.",
    ("End capping|1|Create end cap to close surface inside contours on the top and bottom of the structure.\\n0 = "
     "leave contours open on surface exterior.\\n1 (default) = close surface by generating smooth end caps.\\n2 = "
     "close surface by generating straight end caps."),
    ("Fractional labelmap oversampling factor|1|Determines the oversampling of the reference image geometry. All "
     "segments are oversampled with the same value (value of 1 means no oversampling)."),
    "Joint smoothing|0|Perform joint smoothing.",
    ("Oversampling factor|1|Determines the oversampling of the reference image geometry. If it's a number, then all "
     "segments are oversampled with the same value (value of 1 means no oversampling). If it has the value \"A\", then "
     "automatic oversampling is calculated."),
    ("Reference image geometry|{geometry}|Image geometry description string determining the geometry of the labelmap "
     "that is created in course of conversion. Can be copied from a volume, using the button."),
    "Smoothing factor|-0.5|Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing).",
    ("Threshold fraction|0.5|Determines the threshold that the closed surface is created at as a fractional value "
     "between 0 and 1."),
)


def _num(v: float) -> str:
    return repr(float(v) + 0.0).removesuffix(".0")  # + 0.0 turns -0.0 into 0.0


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines())


def _header_text(text: str) -> str:
    """ASCII on one line (NRRD key/value lines; pynrrd writes ASCII only)."""
    return unicodedata.normalize("NFKD", _one_line(text)).encode("ascii", "ignore").decode("ascii")


def _code(code: Code | None) -> str:
    return f"{code.scheme}^{code.value}^{code.meaning}" if code else "^^"


def terminology_tags(info: LabelInfo) -> str:
    """``SegmentN_Tags`` value: Slicer's TerminologyEntry tag, ``|``-terminated."""
    codes = [_code(c) for c in (info.category, info.type, info.modifier)]
    parts = [SEGMENT_CONTEXT, *codes, ANATOMIC_CONTEXT, "^^", "^^"]
    return "TerminologyEntry:" + "~".join(_header_text(p) for p in parts) + "|"


def _foreground_extent(array: np.ndarray) -> tuple[int, ...]:
    """Bounding box (i0 i1 j0 j1 k0 k1) of all non-zero voxels, or Slicer's empty extent."""
    fg = array != 0
    out = []
    for axis in range(3):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return EMPTY_EXTENT
        out += [int(hit[0]), int(hit[-1])]
    return tuple(out)


def _checked(infos: list[LabelInfo], path: Path) -> list[LabelInfo]:
    """Foreground labels sorted by value; refuses none, duplicates and values <= 0."""
    values = [int(i.value) for i in infos]
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise DataError("label values must be positive and unique", path=path, found=str(values),
                        fix="describe each foreground value once; 0 is the background")
    return sorted(infos, key=lambda i: int(i.value))


def _label_array(labels: Volume, values: list[int], path: Path) -> np.ndarray:
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise DataError("label map is not 3D", path=path, expected="a 3D array", found=f"shape {array.shape}",
                        fix="write one 3D label map per file")
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise DataError("label map has non-integer values", path=path, expected="integer label values",
                        fix="write the argmax label map, not probabilities")
    unknown = sorted(set(np.unique(array).astype(np.int64).tolist()) - set(values) - {0})
    if unknown:
        raise DataError("label map has values without a label description", path=path,
                        expected=f"values in {sorted(values)}", found=str(unknown[:10]),
                        fix="add a LabelInfo for every value or set those voxels to 0")
    top = max(values)
    dtype = np.uint8 if top < 2 ** 8 else np.uint16 if top < 2 ** 16 else np.int32
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def write_seg_nrrd(labels: Volume, path, infos: list[LabelInfo], *, reference: Volume | None = None) -> Path:
    """Write ``labels`` as a 3D Slicer segmentation (one layer, label value per segment), with slicerio."""
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise OutputError("a Slicer segmentation file name must end with .seg.nrrd", path=path,
                          found=repr(path.name), fix="name the output <case>.seg.nrrd")
    if reference is not None:
        check_same_grid(labels, reference)
        if reference.source and Path(reference.source).resolve() == path.resolve():
            raise OutputError("output path equals the input path", path=path,
                              fix="write to another folder; inputs are never overwritten")
    infos = _checked(infos, path)
    array = _label_array(labels, [int(i.value) for i in infos], path)
    seg = slicerio.create_segmentation(array.shape, LPS_TO_RAS @ labels.affine)  # diag(-1,-1,1): RAS <-> LPS
    seg["voxels"] = array
    extent = list(_foreground_extent(array))
    geometry = "".join(f"{_num(v)};" for v in labels.affine.reshape(-1))
    geometry += "".join(f"0;{n - 1};" for n in array.shape)
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    # as Slicer writes it, with the closing "&" (slicerio's own field would drop it); header fields pass through
    seg["Segmentation_ConversionParameters"] = "&".join(p.replace("{geometry}", geometry) for p in _CONVERSION) + "&"
    for info in infos:
        entry = terminology_tags(info).removeprefix("TerminologyEntry:").removesuffix("|")
        seg["segments"].append({
            "id": f"Segment_{int(info.value)}", "labelValue": int(info.value), "layer": 0,
            "name": _header_text(info.name) or f"Segment_{int(info.value)}",
            "color": [float(f"{c / 255.0:.6g}") for c in info.color],
            "colorAutoGenerated": False, "nameAutoGenerated": False, "extent": extent,
            "tags": {"TerminologyEntry": entry}})
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), seg, compression_level=6))


def _term_key(codes: tuple) -> str | None:
    def key(cs):
        return [c and (c.scheme, c.value) for c in cs]
    return next((name for name, term in KNOWN_TERMS.items() if key(term) == key(codes)), None)


def read_seg_nrrd(path) -> tuple[Volume, list[LabelInfo]]:
    """Read a Slicer ``.seg.nrrd`` (with slicerio): a label map in (i, j, k) order with its RAS affine, and the
    segments. A file of several layers (Slicer writes one when segments overlap) becomes one label map: each
    segment gets a value of its own (its label value when no other segment uses it), and where segments overlap
    the one listed later wins, as Slicer's own export to a label map does."""
    import slicerio

    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("file not found", path=path, expected="an existing .seg.nrrd file",
                                 fix="check the path")
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd and slicerio raise several types for broken files
        raise UnreadableFileError("cannot read NRRD file", path=path, expected="a complete .seg.nrrd file",
                                  found=f"{type(exc).__name__}: {exc}"[:200],
                                  fix="re-export it from 3D Slicer") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim not in (3, 4):
        raise UnsupportedInputError("segmentation is not a 3D volume", path=path, expected="3D voxels, one or "
                                    "more layers", found=f"shape {voxels.shape}", fix="re-export it from 3D Slicer")
    affine = LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)
    segments = seg.get("segments", [])
    values = _merged_values(segments) if voxels.ndim == 4 else [int(s.get("labelValue", 1)) for s in segments]
    if voxels.ndim == 4:
        top = max(values, default=1)
        array = np.zeros(voxels.shape[1:], dtype=np.uint8 if top < 256 else np.uint16)
        for s, value in zip(segments, values):
            array[voxels[int(s.get("layer", 0))] == int(s.get("labelValue", 1))] = value
    else:
        array = voxels
    infos = []
    for s, value in zip(segments, values):
        color = tuple(round(float(c) * 255) for c in (s.get("color") or [0.5, 0.5, 0.5])[:3])
        codes = _codes(s.get("terminology")) or GENERIC
        infos.append(LabelInfo(value, str(s.get("name") or s.get("id")), color, *codes, term_key=_term_key(codes)))
    return Volume(array, affine, source=str(path), meta={"format": "seg.nrrd"}), infos


def _merged_values(segments: list[dict]) -> list[int]:
    """A distinct value per segment of a multi-layer file: its own label value unless an earlier segment took it,
    else the next free one."""
    own = [int(s.get("labelValue", 1)) for s in segments]
    used, out = set(), []
    for v in own:
        if v in used:
            v = max([*own, *used]) + 1
        used.add(v)
        out.append(v)
    return out


def _codes(term: dict | None) -> tuple[Code, Code, Code | None] | None:
    """(category, type, modifier) from slicerio's terminology entry."""
    if not term:
        return None

    def code(key: str) -> Code | None:
        c = term.get(key)
        return Code(*[str(x) for x in (list(c) + ["", "", ""])[:3]]) if c and any(c) else None

    cat, typ = code("category"), code("type")
    return (cat, typ, code("typeModifier")) if cat and typ else None


def _write_ctbl(tmp: Path, target: Path, infos: list[LabelInfo]) -> None:
    rows = [(0, "Background", (0, 0, 0, 0))] + [(i.value, i.name, (*i.color, 255)) for i in infos]
    lines = [f"# Color table file {target}", f"# {rows[-1][0] + 1} values"]
    for value, name, rgba in rows:  # the format separates by spaces, so names have "_" for " "
        name = "_".join(_one_line(name).split(" ")) or "_"
        lines.append(f"{int(value)} {name} " + " ".join(str(int(c)) for c in rgba))
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_csv(tmp: Path, infos: list[LabelInfo]) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(CSV_COLUMNS)
        for i in infos:  # Slicer lists no row for the background 0
            codes = (i.category, i.type, i.modifier, None, None)
            terms = [x for c in codes for x in ((c.scheme, c.value, c.meaning) if c else ("", "", ""))]
            row = [int(i.value), _one_line(i.name), *(int(c) for c in i.color), 255, *terms]
            out.writerow([str(v).replace('"', "'") for v in row])  # Slicer's reader cannot unquote '"'


def write_color_table(path, infos: list[LabelInfo]) -> Path:
    """Slicer colour table for a plain label map: ``.ctbl``/``.txt`` (space separated) or ``.csv`` (with codes)."""
    path = Path(path)
    infos = _checked(infos, path)
    suffix = path.suffix.lower()
    if suffix in (".ctbl", ".txt"):
        return atomic_write(path, lambda tmp: _write_ctbl(tmp, path, infos))
    if suffix == ".csv":
        return atomic_write(path, lambda tmp: _write_csv(tmp, infos))
    raise OutputError("unknown colour table format", path=path, expected=".ctbl, .txt or .csv",
                      found=repr(path.suffix), fix="name the colour table <name>.csv or <name>.ctbl")
